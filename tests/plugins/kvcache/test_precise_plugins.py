"""The precise prefix-cache plugins route on what the engines' KV events say they hold: loaded
from configs as upstream writes them, fed by real ZMQ publishers with vLLM's protocol, in both
topologies."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from epp.framework import ConfigError, Endpoint, ServiceContext
from epp.scheduling.scheduler import Scheduler
from epp.testing import build, load_scheduler, make_endpoint, make_request, route
from epp_scorers.datasources.endpoint_notification import EndpointNotificationSource
from epp_scorers.kvcache.keys import block_hashes
from epp_scorers.kvcache.tokenize import load_tokenizer
from epp_scorers.producers.precise_prefix import PreciseBase, PrecisePrefixCacheProducer
from epp_scorers.scorers.precise_prefix import PrecisePrefixCacheScorer
from tests.plugins.kvcache import vllm_events as v
from tests.plugins.kvcache.conftest import words

SPLIT = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters:
    modelName: {tokenizer}
    vllm: {{url: "http://localhost:8000"}}
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {{blockSize: 4, hashSeed: "42"}}
    kvEventsConfig: {{zmqEndpoint: "tcp://127.0.0.1:*"}}
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
- type: queue-scorer
- type: max-score-picker
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
  - {{pluginRef: queue-scorer, weight: 1}}
  - {{pluginRef: max-score-picker}}
"""

SCORER = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: tokenizer
  parameters: {{modelName: {tokenizer}}}
- type: endpoint-notification-source
- type: precise-prefix-cache-scorer
  parameters:
    tokenProcessorConfig: {{blockSize: 4, hashSeed: "42", hashAlgo: sha256_cbor}}
    kvEventsConfig: {{discoverPods: true, podDiscoveryConfig: {{socketPort: {port}}}}}
- type: max-score-picker
- type: single-profile-handler
dataLayer:
  sources:
  - pluginRef: endpoint-notification-source
    extractors: [{{pluginRef: precise-prefix-cache-scorer}}]
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: tokenizer}}
  - {{pluginRef: precise-prefix-cache-scorer, weight: 2}}
  - {{pluginRef: max-score-picker}}
"""


class Pool:
    """The pool as epp's datastore shows it to a BackgroundService."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = list(endpoints)
        self.listeners: list[tuple[Callable[[Endpoint], None], Callable[[Endpoint], None]]] = []
        self.tasks: list[asyncio.Task[None]] = []

    def context(self) -> ServiceContext:
        def spawn(task: str, factory: Callable[[], object], detail: str) -> asyncio.Task[None]:
            t: asyncio.Task[None] = asyncio.ensure_future(factory())  # type: ignore[arg-type]
            self.tasks.append(t)
            return t

        return ServiceContext(lambda: self.endpoints, lambda a, r: self.listeners.append((a, r)), spawn)

    def remove(self, ep: Endpoint) -> None:
        self.endpoints.remove(ep)
        for _, removed in self.listeners:
            removed(ep)


@contextlib.asynccontextmanager
async def serving(scheduler: Scheduler, pool: Pool) -> AsyncIterator[None]:
    """Run the config's background services, as epp's app does."""
    from epp.framework import BackgroundService

    for plugin in scheduler.plugins:
        if isinstance(plugin, BackgroundService):
            pool.tasks.append(asyncio.ensure_future(plugin.run(pool.context())))
    try:
        yield
    finally:
        for task in pool.tasks:
            task.cancel()
        for task in pool.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _plugin(scheduler: Scheduler, kind: type[PreciseBase]) -> PreciseBase:
    return next(p for p in scheduler.plugins if isinstance(p, kind))


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


def engine_hashes(tokenizer_dir: Path, prompt: str, algo: str = "sha256") -> tuple[list[int], list[bytes]]:
    """What an engine with the same tokenizer, block size 4 and PYTHONHASHSEED=42 stores."""
    ids = load_tokenizer(str(tokenizer_dir)).encode(prompt)
    return ids, block_hashes(ids, block_size=4, hash_seed="42", algo=algo)


async def test_pods_publishing_to_epps_socket_steer_the_split_pipeline(tokenizer_dir: Path) -> None:
    scheduler = load_scheduler(SPLIT.format(tokenizer=tokenizer_dir))
    producer = _plugin(scheduler, PrecisePrefixCacheProducer)
    a = make_endpoint("a", address="10.0.0.1")
    b = make_endpoint("b", address="10.0.0.2", waiting=2)  # busier: without a match, a wins
    prompt = words(0, 40)
    ids, hashes = engine_hashes(tokenizer_dir, prompt)
    assert route(scheduler, [a, b], make_request(prompt)).primary.endpoints[0] is a
    async with serving(scheduler, Pool([a, b])):
        await _until(lambda: bool(producer.indexer.bound_endpoint))
        pub = v.Publisher(producer.indexer.bound_endpoint, "kv@10.0.0.2@model")
        try:
            async with asyncio.timeout(5):  # ZMQ's slow joiner: send until it arrives
                while not producer.indexer.consumer.stats.batches:
                    await pub.publish(v.encode([v.stored(hashes, ids)]))
                    await asyncio.sleep(0.05)
            result = route(scheduler, [a, b], make_request(prompt))
            assert result.primary.endpoints[0] is b
            assert list(result.primary.scorer_scores["prefix-cache-scorer"]) == [0.0, 1.0]
            # Another prompt: no pod holds it, load decides.
            assert route(scheduler, [a, b], make_request(words(100, 40))).primary.endpoints[0] is a
            # b evicts the blocks: the match goes.
            await pub.publish(v.encode([v.BlockRemoved(list(hashes), "GPU")]))
            await _until(lambda: route(scheduler, [a, b], make_request(prompt)).primary.endpoints[0] is a)
        finally:
            await pub.close()


async def test_epp_subscribes_to_each_pod_and_forgets_a_pod_that_leaves(tokenizer_dir: Path) -> None:
    # Each pod publishes on its own loopback address, at the same port, as pods do.
    probe = v.Publisher("tcp://127.0.0.2:*", "kv@x@m")
    port = int(probe.endpoint.rsplit(":", 1)[1])
    await probe.close()
    scheduler = load_scheduler(SCORER.format(tokenizer=tokenizer_dir, port=port))
    scorer = _plugin(scheduler, PrecisePrefixCacheScorer)
    source = next(p for p in scheduler.plugins if isinstance(p, EndpointNotificationSource))
    assert source.listeners == [scorer] and scorer.notified
    a = make_endpoint("a", address="127.0.0.2")
    b = make_endpoint("b", address="127.0.0.3")
    c = make_endpoint("c", address="127.0.0.4")
    prompt = words(0, 40)
    chat = make_request(messages=[{"role": "user", "content": prompt}])
    tokenizer = load_tokenizer(str(tokenizer_dir))
    ids = tokenizer.encode(tokenizer.render_chat(chat.body), special_tokens=False)
    hashes = block_hashes(ids, block_size=4, hash_seed="42", algo="sha256_cbor")
    pubs = [v.Publisher(f"tcp://{ep.address}:{port}", f"kv@{ep.address}@m", bind=True) for ep in (a, b, c)]
    pool = Pool([a, b, c])
    try:
        async with serving(scheduler, pool):
            stats = scorer.indexer.consumer.stats
            async with asyncio.timeout(5):
                while len(stats.sources) < 3:
                    await pubs[0].publish(v.encode([v.stored(hashes[:2], ids[:8])]))  # a: 2 blocks
                    await pubs[1].publish(v.encode([v.stored(hashes, ids)]))  # b: all of them
                    await pubs[2].publish(v.encode([v.stored(hashes[:1], ids[:4])]))  # c: 1 block
                    await asyncio.sleep(0.05)
            result = route(scheduler, [a, b, c], chat)
            assert result.primary.endpoints[0] is b
            # upstream's min-max normalization over the pods holding any block
            assert result.primary.scorer_scores["precise-prefix-cache-scorer"] == pytest.approx(
                [1 / (len(hashes) - 1), 1.0, 0.0]
            )
            pool.remove(b)
            assert route(scheduler, [a, c], chat).primary.endpoints[0] is a
            assert scorer.indexer.match(scorer.indexer.keys(ids, chat), [b]) == {}
    finally:
        for pub in pubs:
            await pub.close()


def test_parameters_as_upstream_names_them_and_bad_ones_refused() -> None:
    producer = build(
        PrecisePrefixCacheProducer,
        {
            "tokenProcessorConfig": {"blockSizeTokens": 5},
            "indexerConfig": {"kvBlockIndexConfig": {"inMemoryConfig": {"size": 1000, "podCacheSize": 3}}},
            "kvEventsConfig": {"zmqEndpoint": "tcp://*:5557", "topicFilter": "kv@", "concurrency": 4},
        },
    )
    config = producer.config
    assert (config.block_size, config.capacity, config.pods_per_key) == (5, 1000, 3)
    assert (config.zmq_endpoint, config.discover_pods, config.socket_port) == ("tcp://*:5557", False, 5557)
    assert build(PrecisePrefixCacheProducer).config.discover_pods  # upstream's default
    with pytest.raises(ConfigError, match="hashAlgo"):
        build(PrecisePrefixCacheProducer, {"tokenProcessorConfig": {"hashAlgo": "md5"}})
    with pytest.raises(ConfigError, match=r"unknown parameter 'tokenProcessorConfig\.blocksize'"):
        build(PrecisePrefixCacheProducer, {"tokenProcessorConfig": {"blocksize": 16}})
    with pytest.raises(ConfigError, match=r"valkeyConfig\.address is required"):
        build(PrecisePrefixCacheScorer, {"indexerConfig": {"kvBlockIndexConfig": {"valkeyConfig": {}}}})


def test_speculative_indexing_keeps_a_burst_on_the_pod_picked_first(tokenizer_dir: Path) -> None:
    config = SPLIT.format(tokenizer=tokenizer_dir).replace(
        "    tokenProcessorConfig: {blockSize: 4",
        "    speculativeIndexing: true\n    speculativeTTL: 5s\n    tokenProcessorConfig: {blockSize: 4",
    )
    scheduler = load_scheduler(config)
    producer = _plugin(scheduler, PrecisePrefixCacheProducer)
    assert producer.config.speculative and producer.config.speculative_ttl_s == 5.0
    pods = [make_endpoint(name, address=f"10.0.0.{i}") for i, name in enumerate("abcd")]
    prompt = words(0, 40)
    first = route(scheduler, pods, make_request(prompt)).primary.endpoints[0]
    # No KV event yet: without speculation the ties would spread the burst at random.
    for _ in range(10):
        assert route(scheduler, pods, make_request(prompt)).primary.endpoints[0] is first
    with pytest.raises(ConfigError, match="speculativeTTL"):
        build(PrecisePrefixCacheProducer, {"speculativeTTL": "soon"})


async def test_a_failed_bind_is_retried_without_subscribing_twice(tokenizer_dir: Path) -> None:
    import zmq
    import zmq.asyncio

    squatter = zmq.asyncio.Context.instance().socket(zmq.SUB)
    squatter.bind("tcp://127.0.0.1:*")
    taken = bytes(squatter.getsockopt(zmq.LAST_ENDPOINT)).decode()
    config = SPLIT.format(tokenizer=tokenizer_dir).replace("tcp://127.0.0.1:*", taken)
    producer = _plugin(load_scheduler(config), PrecisePrefixCacheProducer)
    pool = Pool([make_endpoint("a", address="10.0.0.1")])
    with pytest.raises(zmq.ZMQError):  # the port is taken: the supervisor will start run() again
        await producer.run(pool.context())
    squatter.close(linger=0)  # ZMQ releases the port in its I/O thread, a moment later
    for _attempt in range(50):  # as the supervisor would: run() again until the bind succeeds
        task = asyncio.ensure_future(producer.run(pool.context()))

        def settled(attempt: asyncio.Future[None] = task) -> bool:
            return producer.indexer.bound_endpoint == taken or attempt.done()

        await _until(settled)
        if not task.done():
            break
        with pytest.raises(zmq.ZMQError):
            task.result()
        await asyncio.sleep(0.1)
    try:
        assert producer.indexer.bound_endpoint == taken
        assert len(pool.listeners) == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


WITH_NO_HIT_LRU = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters:
    tokenProcessorConfig: {{blockSize: 4, hashSeed: "42"}}
    indexerConfig: {{tokenizersPoolConfig: {{modelName: "{tokenizer}"}}}}
    kvEventsConfig: {{zmqEndpoint: "tcp://127.0.0.1:*"}}
- type: no-hit-lru-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-scorer}}
- type: max-score-picker
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: precise-prefix-cache-scorer, weight: 3}}
  - {{pluginRef: no-hit-lru-scorer, weight: 2}}
  - {{pluginRef: max-score-picker}}
"""


def test_the_scorer_publishes_its_match_for_no_hit_lru(tokenizer_dir: Path) -> None:
    """As upstream's scorer does, the precise scorer publishes its match: no-hit-lru-scorer judges
    a request cold from what the engines hold, not from a guess epp would add for it."""
    from epp_scorers.producers.approx_prefix import ApproxPrefixCacheProducer

    scheduler = load_scheduler(WITH_NO_HIT_LRU.format(tokenizer=tokenizer_dir))
    assert not any(isinstance(p, ApproxPrefixCacheProducer) for p in scheduler.plugins)
    scorer = _plugin(scheduler, PrecisePrefixCacheScorer)
    pods = [make_endpoint(name, address=f"10.0.0.{i}") for i, name in enumerate("abc")]
    held, cold = words(0, 40), words(100, 40)
    ids, _ = engine_hashes(tokenizer_dir, held)
    scorer.indexer.index.add("10.0.0.1", scorer.indexer.keys(ids, make_request(held)), "gpu")
    result = route(scheduler, pods, make_request(held))
    assert result.primary.endpoints[0] is pods[1]
    assert result.primary.scorer_scores["no-hit-lru-scorer"] == [0.5, 0.5, 0.5]  # warm: no preference
    # Cold prompts go round the pods that have gone longest without one.
    firsts = [route(scheduler, pods, make_request(cold + f" {i}")).primary.endpoints[0] for i in range(3)]
    assert sorted(ep.name for ep in firsts) == ["a", "b", "c"]


def test_scores_are_normalized_over_the_profiles_candidates(tokenizer_dir: Path) -> None:
    """The match covers every endpoint of the request; a profile that filtered some out scores
    its own candidates (min-max over those holding any block)."""
    from epp.framework import CycleState, PluginHandle

    scorer = build(
        PrecisePrefixCacheScorer,
        {
            "tokenProcessorConfig": {"blockSize": 4, "hashSeed": "42"},
            "indexerConfig": {"tokenizersPoolConfig": {"modelName": str(tokenizer_dir)}},
        },
    )
    assert scorer.bind(PluginHandle()) == []  # its own tokenizer, from modelName
    a, b, c = (make_endpoint(name, address=f"10.0.0.{i}") for i, name in enumerate("abc"))
    prompt = words(0, 40)
    request = make_request(prompt)
    ids, _ = engine_hashes(tokenizer_dir, prompt)
    keys = scorer.indexer.keys(ids, request)
    for pod, blocks in (("10.0.0.0", 2), ("10.0.0.1", len(keys)), ("10.0.0.2", 5)):
        scorer.indexer.index.add(pod, keys[:blocks], "gpu")
    cycle = CycleState()
    scorer.produce(cycle, request, [a, b, c])
    assert scorer.score(cycle, request, [a, b, c]) == pytest.approx([0.0, 1.0, 3 / (len(keys) - 2)])
    assert scorer.score(cycle, request, [a, c]) == pytest.approx([0.0, 1.0])  # b filtered out
    assert scorer.score(CycleState(), request, [c]) == [1.0]  # no produce: it matches itself


_HEAVY = ("jinja2", "tokenizers", "valkey", "zmq")
_IMPORTED = f"sorted({{m.split('.')[0] for m in sys.modules}} & {set(_HEAVY)!r})"


def test_the_precise_plugins_libraries_load_only_when_used(tokenizer_dir: Path) -> None:
    """tokenizers, jinja2, pyzmq and valkey (about 9 MB of epp's RSS) are imported by the
    precise plugins when they start, not with epp: the default config, loaded as epp loads it
    (every installed plugin registered), imports none of them; loading a tokenizer imports its
    two, and a subscriber's ZMQ context pyzmq."""
    code = f"""
import sys
from epp.framework.registry import installed_registry
from epp.scheduling.loader import DEFAULT_CONFIG, load_config
load_config(DEFAULT_CONFIG, installed_registry())
print({_IMPORTED})
from epp_scorers.kvcache.tokenize import load_tokenizer
load_tokenizer({str(tokenizer_dir)!r})
print({_IMPORTED})
from epp_scorers.kvcache.subscriber import zmq_context
zmq_context()
print({_IMPORTED})
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines() == ["[]", "['jinja2', 'tokenizers']", "['jinja2', 'tokenizers', 'zmq']"]
