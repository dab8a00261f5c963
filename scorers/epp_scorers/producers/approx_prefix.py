"""`approx-prefix-cache-producer`: which endpoint probably holds how much of a prompt's prefix.

The producer runs once per request, before the profiles: it cuts the prompt into blocks, hashes
them in a chain (see `epp_scorers.producers.prefix_index`), and walks the index of which endpoint
has recently been sent which blocks. It publishes a `PrefixMatch` (matched blocks per endpoint,
prompt blocks, block size) for `prefix-cache-scorer`, `no-hit-lru-scorer`, `token-load-scorer`,
`prefix-cache-affinity-filter` and `prefix-based-pd-decider`. After the pick it records the
prompt's blocks for the primary endpoint of every profile that chose one (for P/D, the decode and
the prefill pod), off the reply path.

Block size: with `autoTune`, the model server's own (`vllm:cache_config_info`), else
`blockSizeTokens`; never below 64 tokens (the Go EPP's floor: smaller blocks grow the index to
gigabytes). Blocks are 4 characters a token. The prompt is hashed up to `maxPrefixTokensToMatch`
tokens (0: up to `maxPrefixBlocksToMatch` blocks; both 0: unlimited). Each endpoint holds at most
`lruCapacityPerServer` blocks, or with `autoTune` what its KV cache holds (`num_gpu_blocks`),
never more than `maxLruCapacityPerServer` (a pod reporting an absurd `num_gpu_blocks` is clamped,
and logged once). The whole index holds at most `maxIndexEntries` (block, endpoint) entries and
about `maxIndexBytes` of memory (counted as about 72 bytes an entry; about 85 in RSS): past
either, the endpoint holding the most entries loses its oldest blocks, so the cap is shared
evenly among busy endpoints.

When Envoy reports that a fallback endpoint served the request instead of the planned primary,
the prompt's blocks are recorded for the fallback, and the blocks this request alone had added
to the planned endpoint are taken back.

Consumes: the prompt; with `autoTune`, the scraped `block_size` and `num_gpu_blocks`.
Produces: `prefix-cache-match` (a `PrefixMatch`). Hooks: pre-request (records the blocks),
served-elsewhere (moves them), response-complete (drops the request's record), endpoint removal
(purges the endpoint). Metrics, by `plugin_name` and `plugin_type`:
`llm_d_epp_prefix_indexer_size` (entries in the index), `llm_d_epp_prefix_indexer_hit_ratio`
(share of the prompt's blocks found on the chosen endpoint) and `llm_d_epp_prefix_indexer_hit_bytes`
(the matched prefix, at 4 bytes a token), the last two once per request whose prompt has a block;
each also under its deprecated unlabelled name `inference_extension_prefix_indexer_*` (the size
summed over producers); and `llm_d_epp_prefix_indexer_evictions_total` (entries evicted, by
`reason`: `capacity` for a full endpoint, `max_entries` / `max_bytes` for the index's cap; the
Go EPP has no such counter).

Parameters: `autoTune` (bool, true), `blockSizeTokens` (int, 16, raised to 64),
`maxPrefixBlocksToMatch` (int, 2048), `maxPrefixTokensToMatch` (int, 131072),
`lruCapacityPerServer` (int, 31250; below 1 falls back to the default),
`maxLruCapacityPerServer` (int, 262144), `maxIndexEntries` (int, 1000000), `maxIndexBytes` (int,
268435456); deprecated: `blockSize` (tokens) and `hashBlockSize` (characters). The loader adds
this producer (named after its type) when a plugin consumes its data and the config declares none;
older configs put these parameters on `prefix-cache-scorer`, which passes them on.

    plugins:
    - type: approx-prefix-cache-producer
      parameters:
        autoTune: false
        blockSizeTokens: 64
        lruCapacityPerServer: 50000
        maxIndexBytes: 134217728   # 128 MiB for the whole index
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Collection, Iterator, Sequence
from typing import Any, Self

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epp.framework import (
    ConfigError,
    CycleState,
    DataKey,
    DataProducer,
    Endpoint,
    EndpointListener,
    HistogramChild,
    InferenceRequest,
    ParamDoc,
    Params,
    PluginHandle,
    PreRequest,
    ResponseComplete,
    SchedulingResult,
    ServedElsewhere,
)
from epp_scorers.data import PREFIX_MATCH, PrefixMatch
from epp_scorers.producers.prefix_index import (
    CHARS_PER_TOKEN,
    DEFAULT_LRU_CAPACITY_PER_SERVER,
    DEFAULT_MAX_CAPACITY_PER_SERVER,
    DEFAULT_MAX_INDEX_BYTES,
    DEFAULT_MAX_INDEX_ENTRIES,
    REASON_CAPACITY,
    REASON_MAX_BYTES,
    REASON_MAX_ENTRIES,
    PrefixIndex,
    PromptHasher,
)

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE_TOKENS = 16
# The Go EPP never indexes blocks smaller than this (llm-d-router #1158): at vLLM's 16-token
# blocks the index grows to gigabytes. Matching is coarser; memory stays bounded.
MIN_BLOCK_SIZE_TOKENS = 64
DEFAULT_MAX_PREFIX_BLOCKS = 2048
DEFAULT_MAX_PREFIX_TOKENS = 131_072
_UNLIMITED_BLOCKS = 1 << 40

# llm-d-router's names (labelled by plugin_name, plugin_type) and their deprecated, unlabelled
# `inference_extension_*` twins, both written.
INDEXER_SIZE_METRIC = "llm_d_epp_prefix_indexer_size"
HIT_RATIO_METRIC = "llm_d_epp_prefix_indexer_hit_ratio"
HIT_BYTES_METRIC = "llm_d_epp_prefix_indexer_hit_bytes"
# epp's own (the Go EPP's index has no absolute cap, so no counter to follow): `_total` is added.
EVICTIONS_METRIC = "llm_d_epp_prefix_indexer_evictions"
OLD_INDEXER_SIZE_METRIC = "inference_extension_prefix_indexer_size"
OLD_HIT_RATIO_METRIC = "inference_extension_prefix_indexer_hit_ratio"
OLD_HIT_BYTES_METRIC = "inference_extension_prefix_indexer_hit_bytes"
HIT_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
HIT_BYTES_BUCKETS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
_PLUGIN_LABELS = ("plugin_name", "plugin_type")
_SIZE_HELP = "[ALPHA] Size of the prefix indexer."
_RATIO_HELP = "[ALPHA] Ratio of prefix length matched to total prefix length in the cache lookup."
_BYTES_HELP = "[ALPHA] Length of the prefix match in number of bytes in the cache lookup."
_EVICTIONS_HELP = (
    "[ALPHA] Prefix indexer entries evicted, by reason: capacity (an endpoint's LRU is full), "
    "max_entries / max_bytes (the whole index's cap)."
)

# Requests whose placement is remembered for a fallback report, at most (in flight, in practice).
MAX_OPEN_PLACEMENTS = 65_536
# Endpoints that left the pool, remembered (by identity) so that a late hook (a fallback reported
# after its endpoint left, a pre-request queued before) does not index blocks for one: nothing
# would remove them. A pod coming back is a new Endpoint.
MAX_DEPARTED = 1024


class PrefixIndexMetrics:
    """One producer's hit-ratio and hit-bytes children (canonical and deprecated), resolved once."""

    __slots__ = ("_bytes", "_evictions", "_ratio")

    def __init__(self, handle: PluginHandle, producer: ApproxPrefixCacheProducer) -> None:
        name, type_name = producer.name, producer.type_name

        def both(
            canonical: str, old: str, text: str, buckets: Sequence[float]
        ) -> tuple[HistogramChild, HistogramChild]:
            deprecated = text.replace("[ALPHA]", f"[ALPHA] [Deprecated: Use {canonical}]")
            return (
                handle.lean_histogram(canonical, text, _PLUGIN_LABELS, buckets).labels(name, type_name),
                handle.lean_histogram(old, deprecated, (), buckets).labels(),
            )

        self._ratio = both(HIT_RATIO_METRIC, OLD_HIT_RATIO_METRIC, _RATIO_HELP, HIT_RATIO_BUCKETS)
        self._bytes = both(HIT_BYTES_METRIC, OLD_HIT_BYTES_METRIC, _BYTES_HELP, HIT_BYTES_BUCKETS)
        evictions = handle.counter(EVICTIONS_METRIC, _EVICTIONS_HELP, (*_PLUGIN_LABELS, "reason"))
        # Every reason exported from the start (at 0), so rate() sees the first eviction.
        self._evictions = {
            reason: evictions.labels(name, type_name, reason)
            for reason in (REASON_CAPACITY, REASON_MAX_ENTRIES, REASON_MAX_BYTES)
        }
        _IndexSizes.of(handle).track(producer)
        handle.gauge_sum(
            OLD_INDEXER_SIZE_METRIC,
            f"[ALPHA] [Deprecated: Use {INDEXER_SIZE_METRIC}] Size of the prefix indexer (all producers).",
            producer.index.entries,
        )

    def evicted(self, reason: str, count: int) -> None:
        """The index's `on_evict`: `count` entries evicted for `reason`."""
        self._evictions[reason].inc(count)

    def observe(self, match: PrefixMatch, endpoint: Endpoint) -> None:
        """The match on the chosen endpoint: its share of the prompt's blocks, and its length in
        bytes (4 a token, as the Go EPP estimates it)."""
        matched = match.matched.get(endpoint.key, 0)
        length = float(matched * match.block_size_tokens * CHARS_PER_TOKEN)
        for histogram in self._bytes:
            histogram.observe(length)
        if match.total_blocks:
            ratio = matched / match.total_blocks
            for histogram in self._ratio:
                histogram.observe(ratio)


class _IndexSizes(Collector):
    """`llm_d_epp_prefix_indexer_size{plugin_name, plugin_type}`: each producer's index entries,
    read when /metrics is scraped; one collector per metrics registry."""

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _IndexSizes] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self._producers: dict[tuple[str, str], ApproxPrefixCacheProducer] = {}

    @classmethod
    def of(cls, handle: PluginHandle) -> _IndexSizes:
        sizes = cls._by_registry.get(handle.registry)
        if sizes is None:
            sizes = cls._by_registry[handle.registry] = cls()
            handle.registry.register(sizes)
        return sizes

    def track(self, producer: ApproxPrefixCacheProducer) -> None:
        self._producers[(producer.name, producer.type_name)] = producer

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(INDEXER_SIZE_METRIC, _SIZE_HELP, labels=_PLUGIN_LABELS)

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for (name, type_name), producer in self._producers.items():
            family.add_metric([name, type_name], producer.index.entries())
        yield family


class _Placement:
    """What one request put in the index: its blocks, the index block size, and per endpoint the
    blocks that were new there (the ones to take back if the request was served elsewhere)."""

    __slots__ = ("added", "block_size", "hashes")

    def __init__(self, hashes: list[int], block_size: int) -> None:
        self.hashes = hashes
        self.block_size = block_size
        self.added: dict[str, list[int]] = {}


class ApproxPrefixCacheProducer(
    DataProducer, PreRequest, ServedElsewhere, ResponseComplete, EndpointListener
):
    """Publishes, per request, how many of the prompt's leading blocks each endpoint probably holds
    (a `PrefixMatch`), from an index of the blocks recently sent to each endpoint; records the
    prompt's blocks for every profile's pick after scheduling."""

    type_name = "approx-prefix-cache-producer"
    parameters = (
        ParamDoc(
            "autoTune",
            "bool",
            "true",
            "Use the model server's block size and KV capacity (vllm:cache_config_info) when reported.",
        ),
        ParamDoc(
            "blockSizeTokens",
            "int",
            str(DEFAULT_BLOCK_SIZE_TOKENS),
            f"Tokens per block without autoTune; below {MIN_BLOCK_SIZE_TOKENS}, "
            f"{MIN_BLOCK_SIZE_TOKENS} is used. Must be > 0 when autoTune is false.",
        ),
        ParamDoc("blockSize", "int", "0", "Deprecated: use blockSizeTokens."),
        ParamDoc("hashBlockSize", "int", "0", "Deprecated (characters per block): use blockSizeTokens."),
        ParamDoc(
            "maxPrefixBlocksToMatch",
            "int",
            str(DEFAULT_MAX_PREFIX_BLOCKS),
            "Blocks of the prompt hashed when maxPrefixTokensToMatch is 0 (0: unlimited).",
        ),
        ParamDoc(
            "maxPrefixTokensToMatch",
            "int",
            str(DEFAULT_MAX_PREFIX_TOKENS),
            "Tokens of the prompt hashed (0: use maxPrefixBlocksToMatch).",
        ),
        ParamDoc(
            "lruCapacityPerServer",
            "int",
            str(DEFAULT_LRU_CAPACITY_PER_SERVER),
            "Blocks remembered per endpoint (without autoTune capacity); below 1 falls back to the default.",
        ),
        ParamDoc(
            "maxLruCapacityPerServer",
            "int",
            str(DEFAULT_MAX_CAPACITY_PER_SERVER),
            "The most blocks one endpoint may hold, whatever its num_gpu_blocks reports (an absurd "
            "value is clamped and logged once). Must be >= 1.",
        ),
        ParamDoc(
            "maxIndexEntries",
            "int",
            str(DEFAULT_MAX_INDEX_ENTRIES),
            "Absolute cap on the index's (block, endpoint) entries over all endpoints; past it the "
            "endpoint holding the most loses its oldest. Must be >= 1.",
        ),
        ParamDoc(
            "maxIndexBytes",
            "int",
            str(DEFAULT_MAX_INDEX_BYTES),
            "Absolute cap on the index's approximate memory in bytes (counted as about 72 an entry); past it "
            "the endpoint holding the most loses its oldest. Must be >= 1.",
        ),
    )

    def __init__(
        self,
        name: str = "",
        *,
        auto_tune: bool = True,
        block_size_tokens: int = DEFAULT_BLOCK_SIZE_TOKENS,
        max_prefix_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS,
        max_prefix_tokens: int = DEFAULT_MAX_PREFIX_TOKENS,
        lru_capacity_per_server: int = DEFAULT_LRU_CAPACITY_PER_SERVER,
        max_lru_capacity_per_server: int = DEFAULT_MAX_CAPACITY_PER_SERVER,
        max_index_entries: int = DEFAULT_MAX_INDEX_ENTRIES,
        max_index_bytes: int = DEFAULT_MAX_INDEX_BYTES,
    ) -> None:
        super().__init__(name)
        self.auto_tune = auto_tune
        self.block_size_tokens = block_size_tokens
        self.max_blocks = max_prefix_blocks
        self.max_tokens = max_prefix_tokens
        self.lru_capacity = lru_capacity_per_server
        self.index = PrefixIndex(
            lru_capacity_per_server,
            max_capacity=max_lru_capacity_per_server,
            max_entries=max_index_entries,
            max_bytes=max_index_bytes,
        )
        self.metrics: PrefixIndexMetrics | None = None  # from_params registers them
        # Endpoints whose reported capacity was clamped, logged once each (dropped on removal).
        self._clamped: set[str] = set()
        self._hasher = PromptHasher()
        self.key = PREFIX_MATCH.for_producer(self.name)
        self._hashes_key = DataKey[list[int]](f"{self.type_name}/hashes", self.name)
        # id(request) -> (the request, what it put in the index); dropped in response_complete.
        # Holding the request keeps its id from being reused while the entry lives; the bound
        # only matters if a caller never completes its requests (epp always does).
        self._placed: dict[int, tuple[InferenceRequest, _Placement]] = {}
        self._departed: dict[int, Endpoint] = {}

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        auto_tune = params.get_bool("autoTune", True)
        block = params.get_int("blockSizeTokens", DEFAULT_BLOCK_SIZE_TOKENS)
        legacy_block = params.get_int("blockSize", 0)
        if legacy_block > 0:
            params.warn("parameter 'blockSize' is deprecated; use 'blockSizeTokens'")
            if block == DEFAULT_BLOCK_SIZE_TOKENS:
                block = legacy_block
        # The first prefix plugin's block size, in characters (GIE's hashBlockSize, default 64).
        hash_block_chars = params.get_int("hashBlockSize", 0, minimum=0)
        if hash_block_chars > 0:
            params.warn("parameter 'hashBlockSize' (characters) is deprecated; use 'blockSizeTokens'")
            if block == DEFAULT_BLOCK_SIZE_TOKENS and legacy_block <= 0:
                block = max(1, hash_block_chars // CHARS_PER_TOKEN)
        if not auto_tune and block <= 0:
            raise ConfigError(f"blockSizeTokens must be > 0 when autoTune is false, got {block}")
        # Worth a warning only when the user chose it: the default (16) is raised silently.
        chosen = "blockSizeTokens" in params or legacy_block > 0 or hash_block_chars > 0
        if 0 < block < MIN_BLOCK_SIZE_TOKENS and chosen:
            params.warn(
                f"blockSizeTokens {block} is below the minimum {MIN_BLOCK_SIZE_TOKENS}; "
                f"blocks of {MIN_BLOCK_SIZE_TOKENS} tokens are used"
            )
        max_blocks = params.get_int("maxPrefixBlocksToMatch", DEFAULT_MAX_PREFIX_BLOCKS, minimum=0)
        max_tokens = params.get_int("maxPrefixTokensToMatch", DEFAULT_MAX_PREFIX_TOKENS, minimum=0)
        lru_capacity = params.get_int("lruCapacityPerServer", DEFAULT_LRU_CAPACITY_PER_SERVER)
        if lru_capacity <= 0:
            lru_capacity = DEFAULT_LRU_CAPACITY_PER_SERVER
        max_capacity = params.get_int("maxLruCapacityPerServer", DEFAULT_MAX_CAPACITY_PER_SERVER, minimum=1)
        if lru_capacity > max_capacity:
            params.warn(
                f"lruCapacityPerServer {lru_capacity} is above maxLruCapacityPerServer {max_capacity}; "
                f"{max_capacity} is used"
            )
        max_entries = params.get_int("maxIndexEntries", DEFAULT_MAX_INDEX_ENTRIES, minimum=1)
        max_bytes = params.get_int("maxIndexBytes", DEFAULT_MAX_INDEX_BYTES, minimum=1)
        producer = cls(
            name,
            auto_tune=auto_tune,
            block_size_tokens=block,
            max_prefix_blocks=max_blocks,
            max_prefix_tokens=max_tokens,
            lru_capacity_per_server=lru_capacity,
            max_lru_capacity_per_server=max_capacity,
            max_index_entries=max_entries,
            max_index_bytes=max_bytes,
        )
        producer.metrics = PrefixIndexMetrics(handle, producer)
        producer.index.on_evict = producer.metrics.evicted
        return producer

    def produces(self) -> Collection[DataKey[Any]]:
        return (self.key,)

    def block_size(self, endpoints: Sequence[Endpoint]) -> int:
        """Tokens per block: the model server's own (vllm:cache_config_info) with autoTune, else the
        configured size; never below MIN_BLOCK_SIZE_TOKENS."""
        size = self.block_size_tokens
        if self.auto_tune and endpoints:
            reported = endpoints[0].metrics.block_size
            if reported:
                size = reported
        return size if size >= MIN_BLOCK_SIZE_TOKENS else MIN_BLOCK_SIZE_TOKENS

    def max_blocks_for(self, block_size: int) -> int:
        if self.max_tokens > 0:
            return max(1, self.max_tokens // block_size)
        return self.max_blocks if self.max_blocks > 0 else _UNLIMITED_BLOCKS

    def produce(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        block = self.block_size(endpoints)
        salt = request.body.get("cache_salt")
        hashes = self._hasher.block_hashes(
            request.target_model,
            request.prompt_bytes,
            block * CHARS_PER_TOKEN,
            self.max_blocks_for(block),
            salt if isinstance(salt, str) else "",
        )
        matched = self.index.match(hashes) if hashes else {}
        cycle.write(self.key, PrefixMatch(matched, len(hashes), block))
        cycle.write(self._hashes_key, hashes)

    def _place(self, placement: _Placement, endpoint: Endpoint) -> None:
        """Record the request's blocks for `endpoint`, remembering which were new there."""
        if self._departed.get(id(endpoint)) is endpoint:
            return
        server_blocks = endpoint.metrics.num_gpu_blocks
        if self.auto_tune and server_blocks:
            # The server's KV holds num_gpu_blocks x its block size tokens; in index blocks (never
            # smaller than 64 tokens) that is fewer entries.
            index_block = placement.block_size
            server_block = endpoint.metrics.block_size or index_block
            wanted = max(1, server_blocks * server_block // index_block)
            if self.index.set_capacity(endpoint.key, wanted) < wanted and endpoint.key not in self._clamped:
                self._clamped.add(endpoint.key)
                log.warning(
                    "endpoint %s reports num_gpu_blocks=%d (%d index blocks); the prefix index keeps at "
                    "most %d for it (maxLruCapacityPerServer of %s)",
                    endpoint.key,
                    server_blocks,
                    wanted,
                    self.index.max_capacity,
                    self.name,
                )
        added = self.index.add(endpoint.key, placement.hashes)
        if added:
            earlier = placement.added.get(endpoint.key)
            if earlier is None:
                placement.added[endpoint.key] = added
            else:
                earlier.extend(added)

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        hashes = cycle.read(self._hashes_key)
        if not hashes:
            return
        match = cycle.read(self.key)
        if match is not None and self.metrics is not None and result.primary.endpoints:
            self.metrics.observe(match, result.primary.endpoints[0])
        # Every profile's pick ends up holding the prompt's KV: the decode pod, and under P/D the
        # prefill pod that computed it (whatever the profiles are named).
        placement = _Placement(
            hashes, match.block_size_tokens if match is not None else MIN_BLOCK_SIZE_TOKENS
        )
        for target in result.targets():
            self._place(placement, target)
        if len(self._placed) >= MAX_OPEN_PLACEMENTS:
            del self._placed[next(iter(self._placed))]  # the oldest
        self._placed[id(request)] = (request, placement)

    def served_elsewhere(self, request: InferenceRequest, planned: Endpoint, served: Endpoint) -> None:
        entry = self._placed.get(id(request))
        if entry is None or entry[0] is not request or served.key == planned.key:
            return
        placement = entry[1]
        self._place(placement, served)
        # Only what this request added: blocks the planned endpoint held before stay.
        added = placement.added.pop(planned.key, None)
        if added:
            self.index.discard(planned.key, added)

    def response_complete(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        entry = self._placed.get(id(request))
        if entry is not None and entry[0] is request:
            del self._placed[id(request)]

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        self.index.remove_endpoint(endpoint.key)
        self._clamped.discard(endpoint.key)
        self._departed[id(endpoint)] = endpoint
        if len(self._departed) > MAX_DEPARTED:
            del self._departed[next(iter(self._departed))]
