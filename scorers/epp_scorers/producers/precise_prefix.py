"""`precise-prefix-cache-producer`: how many of the prompt's leading blocks each endpoint really
holds in its KV cache, from the engines' KV events (docs/kv-events.md).

It keeps a block index fed by vLLM's KV events (`BlockStored`, `BlockRemoved`,
`AllBlocksCleared`, over ZMQ: a SUB socket epp binds at `kvEventsConfig.zmqEndpoint`, and/or one
SUB socket per endpoint of the pool at `tcp://<pod-ip>:<socketPort>` with `discoverPods`), and
for each request computes the block keys of its token ids exactly as vLLM hashes its blocks
(`tokenProcessorConfig.blockSize`, `hashSeed` = the engines' PYTHONHASHSEED, `hashAlgo` = their
`--prefix-caching-hash-algo`) and looks them up: the result is the same `PrefixMatch` that
`approx-prefix-cache-producer` publishes, so `prefix-cache-scorer` (with
`prefixMatchInfoProducerName: precise-prefix-cache-producer`) scores it.

The token ids come from the configured `tokenizer` / `token-producer` plugin, else from a
tokenizer loaded from `indexerConfig.tokenizersPoolConfig.modelName`. Without token ids (no
tokenizer, an API without a prompt) the match is empty.

Consumes: nothing. Produces: `prefix-cache-match` (a `PrefixMatch`: matched blocks per endpoint).
Parameters (upstream's; see docs/kv-events.md#configuring-it): `tokenProcessorConfig` (`blockSize`
or `blockSizeTokens`, default 16; `hashSeed`, default ""; `hashAlgo`, epp's, default sha256),
`indexerConfig` (`tokenizersPoolConfig.modelName`; `kvBlockIndexConfig`: `inMemoryConfig.size`
(block keys, default 1,000,000), `inMemoryConfig.podCacheSize` (pods per key, default 10),
`valkeyConfig.address` / `redisConfig.address` (a shared index), `enableMetrics`),
`kvEventsConfig` (`zmqEndpoint`, `topicFilter` default `kv@`, `concurrency`, `discoverPods`
(default: true without zmqEndpoint), `podDiscoveryConfig.socketPort` (default 5557),
`replayPort` (epp's, default 0: no replay)), `speculativeIndexing` (default false: after each
pick the chosen pod counts as holding the request's blocks for `speculativeTTL`, default 2s, so
the requests that follow do not wait for its events).

    plugins:
    - type: tokenizer
      parameters: {modelName: /models/tokenizer}
    - type: precise-prefix-cache-producer
      parameters:
        tokenProcessorConfig: {blockSize: 16, hashSeed: "42"}
        kvEventsConfig: {zmqEndpoint: "tcp://*:5557"}
    - type: prefix-cache-scorer
      parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import Any, Self

from epp.framework import (
    BackgroundService,
    CycleState,
    DataKey,
    DataProducer,
    Endpoint,
    InferenceRequest,
    ParamDoc,
    Params,
    PluginHandle,
    PreRequest,
    SchedulingResult,
    ServiceContext,
)
from epp_scorers.data import PREFIX_MATCH, PrefixMatch
from epp_scorers.kvcache.precise import PreciseConfig, PreciseIndexer
from epp_scorers.kvcache.tokenize import TokenizerError, load_tokenizer
from epp_scorers.producers.tokenizer import TokenizerPlugin

PRECISE_PARAMETERS = (
    ParamDoc(
        "tokenProcessorConfig",
        "mapping",
        "",
        'blockSize (16), hashSeed ("": the engines\' PYTHONHASHSEED), hashAlgo (sha256).',
    ),
    ParamDoc(
        "indexerConfig",
        "mapping",
        "",
        "tokenizersPoolConfig.modelName; kvBlockIndexConfig: inMemoryConfig {size, podCacheSize}, "
        "valkeyConfig / redisConfig {address}.",
    ),
    ParamDoc(
        "kvEventsConfig",
        "mapping",
        "",
        "zmqEndpoint (bind), topicFilter (kv@), discoverPods, podDiscoveryConfig.socketPort (5557), "
        "replayPort (0).",
    ),
    ParamDoc(
        "speculativeIndexing",
        "bool",
        "false",
        "Count the picked pod as holding the request's blocks until its events confirm them.",
    ),
    ParamDoc("speculativeTTL", "duration", "2s", "How long a speculative entry counts (a Go duration)."),
)


class PreciseBase(BackgroundService, PreRequest):
    """What the precise producer and scorer share: the index, its event subscribers, and the
    request's tokens (from the configured tokenizer plugin, else one of its own)."""

    def __init__(
        self, name: str = "", *, config: PreciseConfig | None = None, indexer: PreciseIndexer | None = None
    ) -> None:
        super().__init__(name)
        self.config = config or PreciseConfig()
        self.indexer = indexer or PreciseIndexer(self.config)
        self.tokenizer: TokenizerPlugin | None = None
        self.discover = self.config.discover_pods
        self.keys_key: DataKey[list[int]] = DataKey("precise-block-keys", self.name)
        self.notified = False  # an endpoint-notification-source tells this plugin of the pool's pods

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        config = PreciseConfig.from_params(params)
        plugin = cls(name, config=config)
        plugin.indexer.register_metrics(handle)
        return plugin

    def bind(self, handle: PluginHandle) -> list[str]:
        remarks: list[str] = []
        self.tokenizer = next((p for p in handle.plugins.values() if isinstance(p, TokenizerPlugin)), None)
        if self.tokenizer is None:
            own = TokenizerPlugin(f"{self.name}-tokenizer")
            if self.config.tokenizer:
                try:
                    own.tokenizer = load_tokenizer(self.config.tokenizer)
                except TokenizerError as exc:
                    remarks.append(f"{exc}; precise prefix-cache scoring matches nothing")
            else:
                remarks.append(
                    "no tokenizer plugin and no indexerConfig.tokenizersPoolConfig.modelName: "
                    "precise prefix-cache scoring matches nothing"
                )
            self.tokenizer = own
        return remarks

    async def run(self, context: ServiceContext) -> None:
        await self.indexer.run(context, discover=self.discover, follow_pool=not self.notified)

    def endpoint_added(self, endpoint: Endpoint) -> None:
        """From an endpoint-notification-source: a pod joined the pool."""
        self.indexer.endpoint_added(endpoint)

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        """From an endpoint-notification-source: a pod left the pool."""
        self.indexer.endpoint_removed(endpoint)

    def matched(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> tuple[dict[str, int], int]:
        """(endpoint key -> leading blocks held, the prompt's full blocks)."""
        tokens = self.tokenizer.tokens(cycle, request) if self.tokenizer is not None else ()
        keys = self.indexer.keys(tokens, request)
        if self.config.speculative:
            cycle.write(self.keys_key, keys)
        return self.indexer.match(keys, endpoints), len(keys)

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        """speculativeIndexing: the picked pod is about to store the request's blocks; they count
        as its own for speculativeTTL, closing the gap until its BlockStored events arrive."""
        keys = cycle.read(self.keys_key) if self.config.speculative else None
        if keys and result.primary.endpoints:
            pod = result.primary.endpoints[0].key
            self.indexer.index.add_speculative(pod, keys, time.monotonic() + self.config.speculative_ttl_s)


class PrecisePrefixCacheProducer(PreciseBase, DataProducer):
    """Publishes how many of the prompt's leading blocks each endpoint holds, from the engines'
    KV events (a `PrefixMatch`, for `prefix-cache-scorer`)."""

    type_name = "precise-prefix-cache-producer"
    parameters = PRECISE_PARAMETERS

    def __init__(
        self, name: str = "", *, config: PreciseConfig | None = None, indexer: PreciseIndexer | None = None
    ) -> None:
        super().__init__(name, config=config, indexer=indexer)
        self.key = PREFIX_MATCH.for_producer(self.name)

    def produces(self) -> Collection[DataKey[Any]]:
        return (self.key,)

    def produce(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        matched, total = self.matched(cycle, request, endpoints)
        cycle.write(self.key, PrefixMatch(matched, total, self.config.block_size))
