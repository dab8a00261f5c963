"""The memory block index: longest consecutive match per candidate, bounded in keys and in pods
per key, clearing a pod at once."""

from __future__ import annotations

import pytest

from epp_scorers.kvcache.index import MemoryBlockIndex

A = {"a": ["10.0.0.1", "10.0.0.1:8000"]}
AB = {**A, "b": ["10.0.0.2"]}


def test_the_match_is_the_leading_run_of_blocks_each_candidate_holds() -> None:
    index = MemoryBlockIndex()
    index.add("10.0.0.1", [1, 2, 3], "gpu")
    index.add("10.0.0.2", [1, 2], "gpu")
    index.add("10.0.0.2", [4], "gpu")  # block 4 without 3: no use for a request 1,2,3,4
    assert index.match([1, 2, 3, 4], AB) == {"a": 3, "b": 2}
    assert index.match([2, 3], AB) == {"a": 2, "b": 1}
    assert index.match([9, 1], AB) == {}
    index.add("10.0.0.1:8000", [7], "gpu")  # a pod named by ip:port (several pods on one IP)
    assert index.match([7], AB) == {"a": 1}


def test_removal_is_per_tier_and_clearing_a_pod_is_immediate() -> None:
    index = MemoryBlockIndex()
    index.add("10.0.0.1", [1, 2], "gpu")
    index.remove("10.0.0.1", [2], "cpu")  # another tier's copy went away: the GPU one stays
    assert index.match([1, 2], A) == {"a": 2}
    index.remove("10.0.0.1", [2], "gpu")
    assert index.match([1, 2], A) == {"a": 1}
    index.clear_pod("10.0.0.1")
    assert index.match([1, 2], A) == {}
    index.add("10.0.0.1", [1], "gpu")  # stored again after the clear: counts again
    assert index.match([1, 2], A) == {"a": 1}


def test_bounds_in_keys_and_pods_per_key() -> None:
    index = MemoryBlockIndex(capacity=3, pods_per_key=2)
    index.add("p1", [1, 2, 3], "gpu")
    index.add("p1", [4], "gpu")  # the least recently stored key (1) goes
    assert len(index) == 3 and index.evictions == 1
    assert index.match([2, 3, 4], {"x": ["p1"]}) == {"x": 3}
    assert index.match([1], {"x": ["p1"]}) == {}
    for pod in ("p2", "p3"):
        index.add(pod, [4], "gpu")
    holders = {name: index.match([4], {name: [name]}) for name in ("p1", "p2", "p3")}
    assert holders == {"p1": {}, "p2": {"p2": 1}, "p3": {"p3": 1}}  # the oldest holder dropped


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        MemoryBlockIndex(capacity=0)


def test_speculative_entries_count_until_they_expire_or_the_pod_drops_them() -> None:
    import time

    index = MemoryBlockIndex()
    now = time.monotonic()
    index.add("10.0.0.1", [1], "gpu")
    index.add_speculative("10.0.0.1", [2, 3], now + 60)
    index.add_speculative("10.0.0.2", [1, 2], now - 1)  # expired
    assert index.match([1, 2, 3], {"a": ["10.0.0.1"], "b": ["10.0.0.2"]}) == {"a": 3}
    index.remove("10.0.0.1", [3], "gpu")  # the engine evicted it after all
    assert index.match([1, 2, 3], A) == {"a": 2}
    index.clear_pod("10.0.0.1")  # a restarted engine holds none of them
    assert index.match([1, 2, 3], A) == {}


@pytest.mark.parametrize("seed", range(3))
def test_the_indexer_matches_the_first_blocks_holders_as_it_would_match_the_whole_pool(seed: int) -> None:
    """PreciseIndexer.match looks only at the candidates holding (or predicted to hold) the
    prompt's first block; over random pools, names (an IP, an ip:port), predictions, clears and
    removals, that gives what matching every candidate gives."""
    import random
    import time

    from epp.framework import Endpoint
    from epp_scorers.kvcache.precise import PreciseConfig, PreciseIndexer

    rng = random.Random(seed)
    pool = [Endpoint(f"10.0.0.{i}", 8000 + i % 2) for i in range(120)]  # two ports on some IPs
    index = MemoryBlockIndex(pods_per_key=6)
    indexer = PreciseIndexer(PreciseConfig(), index)
    chains = [[rng.getrandbits(63) for _ in range(12)] for _ in range(5)]
    now = time.monotonic()
    for step in range(400):
        ep, chain = rng.choice(pool), rng.choice(chains)
        name = ep.key if rng.random() < 0.5 else ep.address
        blocks = chain[rng.randrange(3) : rng.randrange(4, 13)]
        action = rng.random()
        if action < 0.6:
            index.add(name, blocks, "gpu")
        elif action < 0.8:
            index.add_speculative(name, blocks, now + (60 if rng.random() < 0.7 else -1))
        elif action < 0.95:
            index.remove(name, blocks, "gpu")
        else:
            index.clear_pod(name)
        candidates = rng.sample(pool, rng.randrange(1, len(pool)))
        probe = rng.choice(chains)[: rng.randrange(1, 13)]
        everyone = {c.key: (c.key, c.address) for c in candidates}
        assert indexer.match(probe, candidates) == index.match(probe, everyone), step
    assert any(indexer.match(chain, pool) for chain in chains)
