"""Prompt hashing and the approximate prefix index, against the reference formulas."""

from __future__ import annotations

import logging
import random
import tracemalloc
from collections import OrderedDict

import pytest
import xxhash

from epp.framework import (
    Api,
    ConfigError,
    CycleState,
    Endpoint,
    InferenceRequest,
    Params,
    PluginHandle,
    ProfileResult,
    SchedulingResult,
)
from epp.testing import build, make_endpoint, make_request
from epp_scorers.producers.approx_prefix import EVICTIONS_METRIC, ApproxPrefixCacheProducer
from epp_scorers.producers.prefix_index import ENTRY_BYTES, PrefixIndex, PromptHasher


def reference_hashes(model: str, text: str, block: int, max_blocks: int, salt: str = "") -> list[int]:
    """h_0 = xxh64(model [+ salt]); h_i = xxh64(block_i, seed=h_{i-1})."""
    data = text.encode()[: block * max_blocks]
    prev = xxhash.xxh64_intdigest((model + salt).encode())
    out = []
    for i in range(0, len(data) - block + 1, block):
        prev = xxhash.xxh64_intdigest(data[i : i + block], seed=prev)
        out.append(prev)
    return out


def test_hashes_follow_the_chained_formula() -> None:
    hasher = PromptHasher()
    text = "The quick brown fox jumps over the lazy dog. " * 40
    assert hasher.block_hashes("llama", text, 64, 256) == reference_hashes("llama", text, 64, 256)
    assert len(hasher.block_hashes("llama", text, 64, 256)) == len(text) // 64
    # Blocks are cut as whole bytes: trailing NULs and multi-byte characters included.
    odd = ("é" * 20 + "\x00" * 24) * 9
    assert hasher.block_hashes("llama", odd, 64, 256) == reference_hashes("llama", odd, 64, 256)


def test_partial_block_ignored_short_prompt_gives_nothing_and_cap_applies() -> None:
    hasher = PromptHasher()
    assert hasher.block_hashes("m", "x" * 63, 64, 256) == []
    assert len(hasher.block_hashes("m", "x" * 130, 64, 256)) == 2
    assert len(hasher.block_hashes("m", "y" * 64 * 300, 64, 256)) == 256


def test_model_and_salt_change_every_hash_and_chain_covers_the_prefix() -> None:
    hasher = PromptHasher()
    text = "a" * 64 + "b" * 64
    base = hasher.block_hashes("m1", text, 64, 256)
    assert not set(base) & set(hasher.block_hashes("m2", text, 64, 256))
    assert not set(base) & set(hasher.block_hashes("m1", text, 64, 256, cache_salt="tenant"))
    assert hasher.block_hashes("m1", text, 64, 256, cache_salt="t") == reference_hashes(
        "m1", text, 64, 256, "t"
    )
    # Same second block, different first block: the second hash differs too (it is chained).
    other = hasher.block_hashes("m1", "c" * 64 + "b" * 64, 64, 256)
    assert other[1] != base[1]


def test_match_walks_until_a_block_no_endpoint_holds() -> None:
    index = PrefixIndex()
    index.add("a", [1, 2, 3])
    index.add("b", [1, 2])
    assert index.match([1, 2, 3, 4]) == {"a": 3, "b": 2}
    assert index.match([9, 1, 2]) == {}
    assert index.match([]) == {}


def test_lru_eviction_removes_reverse_entries() -> None:
    index = PrefixIndex(default_capacity=3)
    index.add("a", [1, 2, 3])
    index.add("a", [1])  # touch 1: now 2 is the oldest
    index.add("a", [4])
    assert index.match([2]) == {}
    assert index.match([1]) == {"a": 1}
    assert index.entries() == 3 and len(index) == 3


def test_capacity_from_server_shrinks_and_removal_purges() -> None:
    index = PrefixIndex()
    index.add("a", list(range(10)))
    index.add("b", list(range(5)))
    index.set_capacity("a", 4)
    assert index.entries() == 4 + 5
    assert index.match([6, 7, 8, 9]) == {"a": 4}
    index.remove_endpoint("b")
    assert index.match([0]) == {}
    assert len(index) == 4
    index.remove_endpoint("missing")  # harmless


def test_token_estimate_and_blocks_both_count_utf8_bytes() -> None:
    text = "模型" * 2000  # 4,000 characters, 12,000 UTF-8 bytes
    request = InferenceRequest("r", "m", Api.COMPLETIONS, text, {}, {})
    assert request.input_tokens_estimate == 3000
    blocks = PromptHasher().block_hashes("m", request.prompt_bytes, 256, 10_000)
    assert len(blocks) * 256 // 4 <= request.input_tokens_estimate < (len(blocks) + 1) * 256 // 4


# --- absolute cap (issue 13 #9): entries, approximate bytes, per-endpoint clamp, evictions --------


def test_several_holders_of_one_hash_match_and_leave_one_by_one() -> None:
    index = PrefixIndex()
    for key in ("a", "b", "c"):
        index.add(key, [1, 2])
    assert index.match([1, 2]) == {"a": 2, "b": 2, "c": 2}
    index.discard("b", [1])
    assert index.match([1, 2]) == {"a": 2, "b": 1, "c": 2}  # b still holds block 2
    index.remove_endpoint("a")
    assert index.match([1, 2]) == {"b": 1, "c": 2}
    index.remove_endpoint("c")
    assert index.match([1, 2]) == {} and index.match([2]) == {"b": 1}
    assert index.entries() == 1 and len(index) == 1


@pytest.mark.parametrize("blocks", [40, 200])  # the plain and the numpy match
def test_a_prefix_many_endpoints_hold_matches_per_run_of_holders(blocks: int) -> None:
    """match() walks a set of holders once per run of blocks they all hold: runs that begin,
    end and overlap at different blocks, holders that leave from the head, the middle and the
    tail of a hash's holders, give the counts the plain definition gives."""
    rng = random.Random(blocks)
    chain = [rng.getrandbits(64) for _ in range(blocks)]
    index, reference = PrefixIndex(10_000), ReferenceIndex(10_000)
    for e in range(60):  # each holds a stretch of the chain
        start, end = (e * 7) % (blocks // 2), blocks - (e * 3) % (blocks // 3)
        for target in (index, reference):
            target.add(f"10.0.0.{e}:8000", chain[start:end])
    assert index.match(chain) == reference.match(chain)
    for e in (59, 30, 0, 17):  # the newest holder (the list's head), middle ones, the oldest
        gone = chain[blocks // 4 : blocks // 2]
        index.discard(f"10.0.0.{e}:8000", gone)
        reference.discard(f"10.0.0.{e}:8000", gone)
        assert index.match(chain) == reference.match(chain)
    index.remove_endpoint("10.0.0.5:8000")
    reference.remove("10.0.0.5:8000")
    counts = index.match(chain)
    assert counts == reference.match(chain) and len(counts) == 59
    assert max(counts.values()) > min(counts.values())


def test_the_entry_cap_takes_from_the_endpoint_holding_most_and_counts_it() -> None:
    evicted: list[tuple[str, int]] = []
    index = PrefixIndex(1000, max_entries=100, on_evict=lambda reason, n: evicted.append((reason, n)))
    index.add("greedy", range(1000, 1090))
    index.add("modest", range(20))
    assert index.entries() == 100
    assert evicted == [("max_entries", 10)]
    assert index.match(range(20)) == {"modest": 20}  # the small endpoint kept all it had
    assert index.match([1000]) == {} and index.match(range(1010, 1090)) == {"greedy": 80}
    # Both keep sending: the cap ends up shared evenly.
    for i in range(10):
        index.add("greedy", range(2000 + 10 * i, 2010 + 10 * i))
        index.add("modest", range(3000 + 10 * i, 3010 + 10 * i))
    assert index.entries() == 100
    assert {len(index.match([h])) for h in range(3090, 3100)} == {1}  # modest's newest are held
    counts = {key: index.held(key) for key in ("greedy", "modest")}
    assert abs(counts["greedy"] - counts["modest"]) <= 10, counts


def test_the_byte_cap_bounds_the_estimate() -> None:
    evicted: dict[str, int] = {}

    def count(reason: str, n: int) -> None:
        evicted[reason] = evicted.get(reason, 0) + n

    index = PrefixIndex(10_000, max_bytes=100 * ENTRY_BYTES, on_evict=count)
    index.add("a", range(1000))
    assert index.approx_bytes() <= 100 * ENTRY_BYTES
    assert 0 < index.entries() < 100
    assert set(evicted) == {"max_bytes"} and evicted["max_bytes"] == 1000 - index.entries()
    assert index.match([999]) == {"a": 1} and index.match([0]) == {}  # the newest stay


def test_a_capacity_beyond_the_clamp_is_clamped() -> None:
    index = PrefixIndex(100, max_capacity=50)
    assert index.default_capacity == 50
    assert index.set_capacity("a", 10**9) == 50 and index.capacity("a") == 50
    assert index.set_capacity("a", 0) == 50  # ignored
    index.add("a", range(200))
    assert index.entries() == 50


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PrefixIndex(max_entries=0)
    with pytest.raises(ValueError):
        PrefixIndex(max_bytes=0)
    with pytest.raises(ValueError):
        PrefixIndex(max_capacity=0)


@pytest.mark.parametrize(("holders", "entries"), [(1, 20_000), (1, 45_000), (2, 45_000), (1, 200_000)])
def test_the_byte_estimate_follows_tracemalloc(holders: int, entries: int) -> None:
    """ENTRY_BYTES & co. against the memory the index really takes (hash ints made per request,
    as the hasher makes them; the index keeps none of them). The hash table grows by doubling, so
    the real figure swings with its fill; the estimate stays within 25 % of it, and an entry costs
    well under 100 bytes (dicts of ints took 140-210)."""
    blocks = entries // 64 // holders

    def request_hashes(i: int) -> list[int]:
        rng = random.Random(i)
        return [rng.getrandbits(64) | 1 << 63 for _ in range(64)]

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = PrefixIndex(10**9, max_entries=10**9, max_bytes=10**12)
        for e in range(holders):
            for i in range(blocks):
                index.add(f"10.0.0.{e}:8000", request_hashes(i))
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert index.entries() == holders * blocks * 64
    assert 0.75 * used <= index.approx_bytes() <= 1.25 * used, (index.approx_bytes(), used)
    assert used / index.entries() < 90


class ReferenceIndex:
    """The index's semantics in the plainest Python: per endpoint an OrderedDict LRU."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.lrus: dict[str, OrderedDict[int, None]] = {}

    def add(self, key: str, hashes: list[int]) -> list[int]:
        lru = self.lrus.setdefault(key, OrderedDict())
        added = []
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                added.append(h)
        while len(lru) > self.capacity:
            lru.popitem(last=False)
        return [h for h in added if h in lru]

    def match(self, hashes: list[int]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for h in hashes:
            holders = [key for key, lru in self.lrus.items() if h in lru]
            if not holders:
                break
            for key in holders:
                counts[key] = counts.get(key, 0) + 1
        return counts

    def discard(self, key: str, hashes: list[int]) -> None:
        for h in hashes:
            self.lrus.get(key, OrderedDict()).pop(h, None)

    def remove(self, key: str) -> None:
        self.lrus.pop(key, None)


@pytest.mark.parametrize("seed", range(4))
def test_the_compact_index_behaves_as_plain_lrus(seed: int) -> None:
    """Random adds (prefix chains shared between requests, small integers and 64-bit hashes),
    discards and removals against the reference: same matches (short and long hash lists, the
    numpy path), same LRU order, same counts, through many table rebuilds and slot shifts."""
    rng = random.Random(seed)
    index, reference = PrefixIndex(300), ReferenceIndex(300)
    keys = [f"10.0.0.{i}:8000" for i in range(6)]
    chains = [
        [rng.getrandbits(64) if seed % 2 else rng.randrange(5000) for _ in range(120)] for _ in range(12)
    ]
    for step in range(1500):
        key = rng.choice(keys)
        chain = rng.choice(chains)
        hashes = chain[: rng.randrange(1, len(chain))] + [
            rng.getrandbits(64) for _ in range(rng.randrange(3))
        ]
        action = rng.random()
        if action < 0.8:
            assert index.add(key, hashes) == reference.add(key, hashes), step
        elif action < 0.95:
            some = rng.sample(hashes, min(5, len(hashes)))
            index.discard(key, some)
            reference.discard(key, some)
        else:
            index.remove_endpoint(key)
            reference.remove(key)
        probe = rng.choice(chains)[: rng.choice((5, 60, 120))]
        assert index.match(probe) == reference.match(probe), step
    assert index.entries() == sum(len(lru) for lru in reference.lrus.values())
    assert len(index) == len({h for lru in reference.lrus.values() for h in lru})
    for key in keys:
        assert index.held(key) == len(reference.lrus.get(key, ()))


def test_a_pod_reporting_a_huge_kv_cache_cannot_grow_the_index_past_its_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The issue's reproduction, scaled down: a pod reports num_gpu_blocks=1e9 and receives
    distinct prompts; the index stays at its caps, evictions are counted, an honest pod keeps its
    blocks, and the clamp is logged once."""
    handle = PluginHandle()
    producer = build(
        ApproxPrefixCacheProducer,
        {"maxIndexEntries": 400, "maxLruCapacityPerServer": 1000, "autoTune": True},
        handle=handle,
    )
    liar = make_endpoint("liar", block_size=64, num_gpu_blocks=10**9)
    honest = make_endpoint("honest", block_size=64, num_gpu_blocks=40)
    caplog.set_level(logging.WARNING, logger="epp_scorers.producers.approx_prefix")
    for i in range(60):
        for endpoint in (liar, honest):
            prompt = f"{endpoint.key}-{i} " * 300  # about 8 blocks of 256 characters
            cycle = CycleState()
            request = make_request(prompt)
            producer.produce(cycle, request, [endpoint])
            producer.pre_request(cycle, request, SchedulingResult("d", {"d": ProfileResult("d", [endpoint])}))
            producer.response_complete(request, endpoint)
    assert producer.index.entries() <= 400
    assert producer.index.capacity(liar.key) == 1000 and producer.index.capacity(honest.key) == 40
    registry = handle.registry
    labels = {"plugin_name": producer.name, "plugin_type": producer.type_name}
    assert (
        registry.get_sample_value(f"{EVICTIONS_METRIC}_total", {**labels, "reason": "max_entries"}) or 0
    ) > 0
    assert (registry.get_sample_value(f"{EVICTIONS_METRIC}_total", {**labels, "reason": "capacity"}) or 0) > 0
    assert registry.get_sample_value(f"{EVICTIONS_METRIC}_total", {**labels, "reason": "max_bytes"}) == 0
    last = f"{honest.key}-59 " * 300
    assert match_on(producer, last, honest) > 0  # the honest pod's latest prompt still matches
    clamps = [r for r in caplog.records if "num_gpu_blocks" in r.getMessage()]
    assert len(clamps) == 1 and liar.key in clamps[0].getMessage()


def match_on(producer: ApproxPrefixCacheProducer, prompt: str, endpoint: Endpoint) -> int:
    cycle = CycleState()
    producer.produce(cycle, make_request(prompt), [endpoint])
    match = cycle.read(producer.key)
    assert match is not None
    return match.matched.get(endpoint.key, 0)


def test_cap_parameters_are_validated_and_documented() -> None:
    with pytest.raises(ConfigError):
        build(ApproxPrefixCacheProducer, {"maxIndexEntries": 0})
    with pytest.raises(ConfigError):
        build(ApproxPrefixCacheProducer, {"maxIndexBytes": -1})
    with pytest.raises(ConfigError):
        build(ApproxPrefixCacheProducer, {"maxLruCapacityPerServer": 0})
    params = Params({"lruCapacityPerServer": 5000, "maxLruCapacityPerServer": 100}, "p")
    producer = ApproxPrefixCacheProducer.from_params("p", params, PluginHandle())
    assert producer.index.default_capacity == 100
    assert any("maxLruCapacityPerServer" in w for w in params.warnings)
    documented = {doc.name for doc in ApproxPrefixCacheProducer.parameters}
    assert {"maxIndexEntries", "maxIndexBytes", "maxLruCapacityPerServer"} <= documented
