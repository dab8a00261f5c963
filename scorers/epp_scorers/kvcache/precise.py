"""The engine behind `precise-prefix-cache-scorer` and `precise-prefix-cache-producer`: upstream's
parameters parsed, the block index fed by the KV-event subscribers, and a request's match.

Parameters (upstream's names; epp's additions marked):

    tokenProcessorConfig: {blockSize | blockSizeTokens (16), hashSeed (""), hashAlgo* (sha256)}
    indexerConfig:
      tokenizersPoolConfig: {modelName, local: {...}, hf: {...}, uds: {...}, workersCount}
      kvBlockIndexConfig: {inMemoryConfig: {size, podCacheSize}, redisConfig | valkeyConfig:
                           {address}, enableMetrics, metricsLoggingInterval}
    kvEventsConfig: {zmqEndpoint, topicFilter ("kv@"), concurrency, discoverPods, engineType,
                     podDiscoveryConfig: {socketPort (5557), podLabelSelector, podNamespace},
                     replayPort* (0: no replay)}
    speculativeIndexing (false), speculativeTTL ("2s")

`zmqEndpoint` set: epp binds a SUB socket there and engines connect to it. `discoverPods` (default
true when no zmqEndpoint is set, as upstream defaults it) connects a SUB socket to
`tcp://<pod-ip>:<socketPort>` of every endpoint in the pool, following the pool as it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from epp.framework import ConfigError, Endpoint, InferenceRequest, Params, PluginHandle, ServiceContext
from epp_scorers.datasources.metrics import parse_go_duration
from epp_scorers.kvcache.consumer import EventConsumer
from epp_scorers.kvcache.index import DEFAULT_CAPACITY, DEFAULT_PODS_PER_KEY, BlockIndex, MemoryBlockIndex
from epp_scorers.kvcache.keys import DEFAULT_BLOCK_SIZE, DEFAULT_HASH_ALGO, HASH_ALGOS, block_keys
from epp_scorers.kvcache.subscriber import bound_subscriber, connected_subscriber, pod_host
from epp_scorers.kvcache.valkey_index import ValkeyBlockIndex

log = logging.getLogger(__name__)

DEFAULT_TOPIC_FILTER: Final = "kv@"
DEFAULT_SOCKET_PORT: Final = 5557  # llm-d's podDiscoveryConfig.socketPort default
DEFAULT_SPECULATIVE_TTL_S: Final = 2.0  # upstream's speculativeTTL default


@dataclass(frozen=True, slots=True)
class PreciseConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    hash_seed: str = ""
    hash_algo: str = DEFAULT_HASH_ALGO
    zmq_endpoint: str = ""
    topic_filter: str = DEFAULT_TOPIC_FILTER
    discover_pods: bool = True
    socket_port: int = DEFAULT_SOCKET_PORT
    replay_port: int = 0
    capacity: int = DEFAULT_CAPACITY
    pods_per_key: int = DEFAULT_PODS_PER_KEY
    valkey_address: str = ""
    tokenizer: str = ""  # indexerConfig.tokenizersPoolConfig: a directory or a cached hub name
    speculative: bool = False  # speculativeIndexing
    speculative_ttl_s: float = DEFAULT_SPECULATIVE_TTL_S

    @classmethod
    def from_params(cls, params: Params) -> PreciseConfig:
        tp = params.sub("tokenProcessorConfig")
        block_size = tp.get_int("blockSize", 0, minimum=0) or tp.get_int("blockSizeTokens", 0, minimum=0)
        hash_seed = tp.get_str("hashSeed", "")
        algo = tp.get_str("hashAlgo", DEFAULT_HASH_ALGO, choices=HASH_ALGOS)

        indexer = params.sub("indexerConfig")
        pool = indexer.sub("tokenizersPoolConfig")
        tokenizer = pool.get_str("modelName", "")
        local = pool.sub("local")
        tokenizer = local.get_str("tokenizersCacheDir", "") or local.get_str("path", "") or tokenizer
        local.unimplemented("autoDiscoveryDir", "autoDiscoveryTokenizerFileName", "modelTokenizerMap")
        pool.sub("hf").unimplemented("enabled", "huggingFaceToken", "tokenizersCacheDir")
        pool.sub("uds").unimplemented("socketFile", reason="epp tokenizes in-process (modelName)")
        pool.unimplemented("workersCount", reason="epp tokenizes in-process")
        kv_index = indexer.sub("kvBlockIndexConfig")
        memory = kv_index.sub("inMemoryConfig")
        capacity = memory.get_int("size", DEFAULT_CAPACITY, minimum=1)
        pods_per_key = memory.get_int("podCacheSize", DEFAULT_PODS_PER_KEY, minimum=1)
        address = ""
        for backend in ("valkeyConfig", "redisConfig"):
            if backend in kv_index:
                sub = kv_index.sub(backend)
                address = address or sub.get_str("address", "")
                sub.unimplemented("backendType", "enableRDMA")
                if not address:
                    raise ConfigError(f"indexerConfig.kvBlockIndexConfig.{backend}.address is required")
        kv_index.get_bool("enableMetrics", False)  # epp always exports its index metrics
        kv_index.unimplemented("metricsLoggingInterval", "costAwareMemoryConfig")

        events = params.sub("kvEventsConfig")
        zmq_endpoint = events.get_str("zmqEndpoint", "")
        topic_filter = events.get_str("topicFilter", DEFAULT_TOPIC_FILTER)
        events.get_int("concurrency", 4, minimum=1)  # one task per socket applies in order
        events.get_str("engineType", "vllm", choices=("vllm",))
        discover = events.get_bool("discoverPods", not zmq_endpoint)
        discovery = events.sub("podDiscoveryConfig")
        socket_port = discovery.get_int("socketPort", DEFAULT_SOCKET_PORT, minimum=1)
        discovery.unimplemented(
            "podLabelSelector", "podNamespace", reason="epp subscribes to the endpoints of its pool"
        )
        replay_port = events.get_int("replayPort", 0, minimum=0)
        # Upstream reads speculativeIndexing at the top level; one of its guides puts it in indexerConfig.
        speculative = params.get_bool("speculativeIndexing", False) or indexer.get_bool(
            "speculativeIndexing", False
        )
        ttl_text = params.get_str("speculativeTTL", "2s")
        try:
            ttl = parse_go_duration(ttl_text)
        except ValueError as exc:
            raise ConfigError(f"speculativeTTL: {exc}") from None
        if ttl <= 0:
            raise ConfigError(f"speculativeTTL must be positive, got {ttl_text!r}")
        if not zmq_endpoint and not discover:
            params.warn("kvEventsConfig has neither zmqEndpoint nor discoverPods: no KV events will arrive")
        return cls(
            block_size=block_size or DEFAULT_BLOCK_SIZE,
            hash_seed=hash_seed,
            hash_algo=algo,
            zmq_endpoint=zmq_endpoint,
            topic_filter=topic_filter,
            discover_pods=discover,
            socket_port=socket_port,
            replay_port=replay_port,
            capacity=capacity,
            pods_per_key=pods_per_key,
            valkey_address=address,
            tokenizer=tokenizer,
            speculative=speculative,
            speculative_ttl_s=ttl,
        )


class PreciseIndexer:
    """The block index, fed by KV events, and the lookup of a request's blocks in it."""

    def __init__(self, config: PreciseConfig, index: BlockIndex | None = None) -> None:
        self.config = config
        if index is None and config.valkey_address:
            index = ValkeyBlockIndex(
                config.valkey_address, capacity=config.capacity, pods_per_key=config.pods_per_key
            )
        if index is None:  # (not `or`: an empty index is falsy)
            index = MemoryBlockIndex(config.capacity, config.pods_per_key)
        self.index: BlockIndex = index
        self.consumer = EventConsumer(self.index)
        self._context: ServiceContext | None = None
        self._discover = False
        self._pending: dict[str, Endpoint] = {}
        self._pod_tasks: dict[str, tuple[str, asyncio.Task[None]]] = {}  # key -> (zmq endpoint, task)
        self.bound_endpoint = ""  # where the SUB socket got bound (zmqEndpoint may name port 0 / *)

    def register_metrics(self, handle: PluginHandle) -> None:
        """Gauges read at scrape time (nothing on the event path), summed over the precise plugins."""
        stats = self.consumer.stats
        handle.gauge_sum(
            "epp_kv_index_blocks", "Block keys held in epp's KV-event block index.", lambda: len(self.index)
        )
        for name, read, what in (
            ("batches", lambda: stats.batches, "KV-event batches applied"),
            ("malformed", lambda: stats.malformed, "KV-event messages or batches dropped as malformed"),
            ("gaps", lambda: stats.gaps, "jumps in a publisher's sequence numbers"),
            ("replayed", lambda: stats.replayed, "batches fetched from an engine's replay socket"),
            ("lost_batches", lambda: stats.lost_batches, "batches neither received nor replayed"),
            ("restarts", lambda: stats.restarts, "engine restarts seen (the sequence went back)"),
            ("clears", lambda: stats.clears, "AllBlocksCleared events"),
        ):
            handle.gauge_sum(f"epp_kv_events_{name}", f"{what.capitalize()} since epp started.", read)
        shared = self.index
        if isinstance(shared, ValkeyBlockIndex):
            for name, read, what in (
                ("writes", lambda: shared.written, "index changes written to the shared Valkey index"),
                ("dropped_writes", lambda: shared.dropped, "index changes dropped (write queue full)"),
                ("applied", lambda: shared.applied, "other replicas' index changes applied from the feed"),
                ("feed_gaps", lambda: shared.feed_gaps, "restarts that found the shared feed trimmed"),
            ):
                help_text = f"{what.capitalize()} since epp started."
                handle.gauge_sum(f"epp_kv_index_valkey_{name}", help_text, read)

    def keys(self, tokens: Sequence[int], request: InferenceRequest) -> list[int]:
        lora = request.target_model if request.target_model in self.consumer.lora_names else None
        salt = request.body.get("cache_salt")
        return block_keys(
            tokens,
            block_size=self.config.block_size,
            hash_seed=self.config.hash_seed,
            algo=self.config.hash_algo,
            lora_name=lora,
            cache_salt=salt if isinstance(salt, str) and salt else None,
        )

    def match(self, keys: Sequence[int], endpoints: Sequence[Endpoint]) -> dict[str, int]:
        """Endpoint key -> leading blocks of `keys` it holds (absent: none)."""
        if not keys:
            return {}
        # Only the candidates holding the first block (a handful) are matched further: one pass
        # of set lookups over the pool, not a walk of the blocks for every endpoint.
        first = self.index.first_holders(keys[0])
        if not first:
            return {}
        names: Mapping[str, Sequence[str]] = {
            ep.key: (ep.key, ep.address) for ep in endpoints if ep.key in first or ep.address in first
        }
        return self.index.match(keys, names) if names else {}

    # --- the event subscribers ------------------------------------------------------------------

    async def run(self, context: ServiceContext, *, discover: bool, follow_pool: bool = True) -> None:
        """Bind the SUB socket (zmqEndpoint) and, with `discover`, subscribe to every endpoint; a
        pod leaving the pool stops counting in either case. With `follow_pool` false, an
        endpoint-notification-source calls endpoint_added / endpoint_removed instead."""
        if self._context is None:  # once: a restart (after a failed bind) only binds again
            self._context = context
            self._discover = discover
            if isinstance(self.index, ValkeyBlockIndex):
                context.spawn("kv-index-valkey", self.index.run, self.index.address)
            if follow_pool:
                context.subscribe(self.endpoint_added, self.endpoint_removed)
                for ep in context.endpoints():
                    self.endpoint_added(ep)
            pending, self._pending = self._pending, {}
            for ep in pending.values():  # announced (by an endpoint-notification-source) before we ran
                self.endpoint_added(ep)
        if self.config.zmq_endpoint:
            await bound_subscriber(
                self.config.zmq_endpoint,
                self.config.topic_filter,
                self.consumer,
                self.config.replay_port,
                on_bound=self._bound,
                replay_allowed=self._in_pool,
            )
        else:
            await asyncio.Event().wait()  # the per-pod tasks run on their own

    def _bound(self, endpoint: str) -> None:
        self.bound_endpoint = endpoint

    def _in_pool(self, pod: str) -> bool:
        """A topic's pod is one of the pool's endpoints (asked before a replay, on a gap)."""
        context = self._context
        address = pod_host(pod)
        return context is not None and any(ep.address == address for ep in context.endpoints())

    def endpoint_added(self, endpoint: Endpoint) -> None:
        if self._context is None:
            self._pending[endpoint.key] = endpoint
            return
        if not self._discover or endpoint.key in self._pod_tasks:
            return
        host = f"[{endpoint.address}]" if ":" in endpoint.address else endpoint.address
        zmq_endpoint = f"tcp://{host}:{self.config.socket_port}"
        replay = f"tcp://{host}:{self.config.replay_port}" if self.config.replay_port else None
        factory = functools.partial(
            connected_subscriber, zmq_endpoint, endpoint.key, self.config.topic_filter, self.consumer, replay
        )
        task = self._context.spawn("kv-events-subscriber", factory, endpoint.key)
        self._pod_tasks[endpoint.key] = (zmq_endpoint, task)

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        """The pod left: its subscriber stops and its blocks stop counting (a pod coming back at
        that address is a new engine, with an empty cache)."""
        self._pending.pop(endpoint.key, None)
        entry = self._pod_tasks.pop(endpoint.key, None)
        if entry is not None:
            zmq_endpoint, task = entry
            task.cancel()
            self.consumer.forget(zmq_endpoint)
        self.index.clear_pod(endpoint.key)
        self.index.clear_pod(endpoint.address)

    async def close(self) -> None:
        tasks = [task for _, task in self._pod_tasks.values()]
        self._pod_tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
