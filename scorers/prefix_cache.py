"""Approximate prefix-cache affinity: `approx-prefix-cache-producer` and `prefix-cache-scorer`.

The producer runs once per request, before the profiles: it cuts the prompt into blocks, hashes
them in a chain (see `epp.prefix`), and walks the index of which endpoint has recently been sent
which blocks. It publishes a `PrefixMatch` (matched blocks per endpoint, prompt blocks, block
size) for the scorer, `no-hit-lru-scorer`, `token-load-scorer` and `prefix-cache-affinity-filter`.
After the pick it records the prompt's blocks for the chosen endpoint (off the reply path).

The scorer turns the match into a score:

    ratio  = matched blocks / prompt blocks                        (0 when the prompt has no block)
    length = min(1, matched blocks x block size / matchLengthScaleTokens) ^ 2
    score  = matchLengthWeight x length + (1 - matchLengthWeight) x ratio

Older configs put the producer's parameters on the scorer and declare no producer: the loader
then adds the producer itself, with those parameters.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar

from epp.framework import (
    DEFAULT_PREFIX_PRODUCER,
    PREFIX_MATCH_DATA,
    ConfigError,
    CycleState,
    Endpoint,
    InferenceRequest,
    Params,
    PrefixMatch,
    SchedulingResult,
    data_key,
)
from epp.prefix import CHARS_PER_TOKEN, DEFAULT_LRU_CAPACITY_PER_SERVER, PrefixIndex, PromptHasher

DEFAULT_BLOCK_SIZE_TOKENS = 16
# The Go EPP never indexes blocks smaller than this (llm-d-router #1158): at vLLM's 16-token
# blocks the index grows to gigabytes. Matching is coarser; memory stays bounded.
MIN_BLOCK_SIZE_TOKENS = 64
DEFAULT_MAX_PREFIX_BLOCKS = 2048
DEFAULT_MAX_PREFIX_TOKENS = 131_072
_UNLIMITED_BLOCKS = 1 << 40

# Producer parameters that older configs set on prefix-cache-scorer.
PRODUCER_PARAMETERS = (
    "autoTune",
    "blockSizeTokens",
    "blockSize",
    "hashBlockSize",
    "maxPrefixBlocksToMatch",
    "maxPrefixTokensToMatch",
    "lruCapacityPerServer",
)


class ApproxPrefixCacheProducer:
    type_name: ClassVar[str] = "approx-prefix-cache-producer"

    def __init__(self, name: str = type_name, params: Params | None = None) -> None:
        params = params or Params(None, name)
        self.name = name
        self.auto_tune = params.get_bool("autoTune", True)
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
        if not self.auto_tune and block <= 0:
            raise ConfigError(f"blockSizeTokens must be > 0 when autoTune is false, got {block}")
        # Worth a warning only when the user chose it: the default (16) is raised silently.
        chosen = "blockSizeTokens" in params or legacy_block > 0 or hash_block_chars > 0
        if 0 < block < MIN_BLOCK_SIZE_TOKENS and chosen:
            params.warn(
                f"blockSizeTokens {block} is below the minimum {MIN_BLOCK_SIZE_TOKENS}; "
                f"blocks of {MIN_BLOCK_SIZE_TOKENS} tokens are used"
            )
        self.block_size_tokens = block
        self.max_blocks = params.get_int("maxPrefixBlocksToMatch", DEFAULT_MAX_PREFIX_BLOCKS, minimum=0)
        self.max_tokens = params.get_int("maxPrefixTokensToMatch", DEFAULT_MAX_PREFIX_TOKENS, minimum=0)
        self.lru_capacity = params.get_int("lruCapacityPerServer", DEFAULT_LRU_CAPACITY_PER_SERVER)
        if self.lru_capacity <= 0:
            self.lru_capacity = DEFAULT_LRU_CAPACITY_PER_SERVER
        self.index = PrefixIndex(self.lru_capacity)
        self._hasher = PromptHasher()
        self.key = data_key(PREFIX_MATCH_DATA, name)
        self._hashes_key = f"{self.key}/hashes"

    def produces(self) -> Collection[str]:
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

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        hashes: list[int] | None = cycle.read(self._hashes_key)
        if not hashes:
            return
        # Every profile's pick ends up holding the prompt's KV: the decode pod, and under P/D the
        # prefill pod that computed it (whatever the profiles are named).
        targets = {p.endpoints[0].key: p.endpoints[0] for p in result.profiles.values() if p.endpoints}
        match: PrefixMatch | None = cycle.read(self.key)
        index_block = match.block_size_tokens if match is not None else MIN_BLOCK_SIZE_TOKENS
        for target in targets.values():
            server_blocks = target.metrics.num_gpu_blocks
            if self.auto_tune and server_blocks:
                # The server's KV holds num_gpu_blocks x its block size tokens; in index blocks
                # (never smaller than 64 tokens) that is fewer entries.
                server_block = target.metrics.block_size or index_block
                self.index.set_capacity(target.key, max(1, server_blocks * server_block // index_block))
            self.index.add(target.key, hashes)

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        self.index.remove_endpoint(endpoint.key)


class PrefixCacheScorer:
    type_name: ClassVar[str] = "prefix-cache-scorer"

    def __init__(self, name: str = type_name, params: Params | None = None) -> None:
        params = params or Params(None, name)
        self.name = name
        producer = params.get_str("prefixMatchInfoProducerName", "") or DEFAULT_PREFIX_PRODUCER
        self._key = data_key(PREFIX_MATCH_DATA, producer)
        self.match_length_weight = params.get_float("matchLengthWeight", 0.0, minimum=0.0, maximum=1.0)
        self.match_length_scale = params.get_int("matchLengthScaleTokens", 8192)
        if self.match_length_weight > 0 and self.match_length_scale <= 0:
            raise ConfigError(
                "matchLengthScaleTokens must be > 0 when matchLengthWeight is > 0, "
                f"got {self.match_length_scale}"
            )
        raw = params.raw()
        # Older configs: producer parameters on the scorer. The loader hands them to the producer
        # it adds; with a declared producer they are ignored (and reported).
        self.producer_parameters: Mapping[str, Any] = {k: raw[k] for k in PRODUCER_PARAMETERS if k in raw}
        unknown = sorted(
            set(raw)
            - set(PRODUCER_PARAMETERS)
            - {"prefixMatchInfoProducerName", "matchLengthWeight", "matchLengthScaleTokens"}
        )
        if unknown:
            raise ConfigError(f"unknown parameter {unknown[0]!r}")

    def consumes(self) -> Collection[str]:
        return (self._key,)

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        match: PrefixMatch | None = cycle.read(self._key)
        if match is None or not match.total_blocks:
            return [0.0] * len(endpoints)
        matched, total = match.matched, match.total_blocks
        w = self.match_length_weight
        if w == 0.0:
            return [matched.get(ep.key, 0) / total for ep in endpoints]
        tokens_per_block = match.block_size_tokens / self.match_length_scale
        out = []
        for ep in endpoints:
            m = matched.get(ep.key, 0)
            length = min(1.0, m * tokens_per_block)
            out.append(w * length * length + (1.0 - w) * m / total)
        return out
