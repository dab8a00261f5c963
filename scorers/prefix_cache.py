"""prefix-cache-scorer: prefer endpoints that probably hold the request's prompt prefix in KV cache.

Score = blocks of the prompt the endpoint is believed to hold (from the start, see PrefixIndex.match)
divided by the prompt's blocks. After the pick, the chosen endpoints are recorded as holding the
prompt's blocks, so the next request with the same prefix finds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from epp.framework import PREFIX_BLOCK_SIZE_TOKENS_KEY as BLOCK_SIZE_TOKENS_KEY
from epp.framework import PREFIX_MATCHED_BLOCKS_KEY as MATCHED_BLOCKS_KEY
from epp.framework import PREFIX_TOTAL_BLOCKS_KEY as TOTAL_BLOCKS_KEY
from epp.framework import (
    CycleState,
    Endpoint,
    InferenceRequest,
    Params,
    SchedulingResult,
)
from epp.prefix import (
    CHARS_PER_TOKEN,
    DEFAULT_BLOCK_SIZE_TOKENS,
    DEFAULT_LRU_CAPACITY_PER_SERVER,
    DEFAULT_MAX_PREFIX_BLOCKS,
    PrefixIndex,
    PromptHasher,
)


class PrefixCacheScorer:
    type_name: ClassVar[str] = "prefix-cache-scorer"

    def __init__(self, name: str = type_name, params: Params | None = None) -> None:
        params = params or Params(None, name)
        self.name = name
        self.block_size_tokens = params.get_int(
            "blockSizeTokens", params.get_int("blockSize", DEFAULT_BLOCK_SIZE_TOKENS, 1), 1
        )
        self.auto_tune = params.get_bool("autoTune", True)
        max_blocks = params.get_int("maxPrefixBlocksToMatch", DEFAULT_MAX_PREFIX_BLOCKS, 1)
        max_tokens = params.get_int("maxPrefixTokensToMatch", 0, 0)
        if max_tokens:
            max_blocks = min(max_blocks, max(1, max_tokens // self.block_size_tokens))
        self.max_blocks = max_blocks
        self.index = PrefixIndex(params.get_int("lruCapacityPerServer", DEFAULT_LRU_CAPACITY_PER_SERVER, 1))
        self._hasher = PromptHasher()
        self._state_key = f"prefix-cache/hashes/{name}"

    def _block_size(self, endpoints: Sequence[Endpoint]) -> int:
        # autoTune: the model server's own block size (vllm:cache_config_info), as the Go EPP does.
        if self.auto_tune and endpoints:
            reported = endpoints[0].metrics.block_size
            if reported:
                return reported
        return self.block_size_tokens

    def hashes(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[int]:
        cached: list[int] | None = cycle.read(self._state_key)
        if cached is None:
            block_tokens = self._block_size(endpoints)
            salt = request.body.get("cache_salt")
            cached = self._hasher.block_hashes(
                request.target_model,
                request.prompt_text,
                block_tokens * CHARS_PER_TOKEN,
                self.max_blocks,
                salt if isinstance(salt, str) else "",
            )
            cycle.write(self._state_key, cached)
            cycle.write(BLOCK_SIZE_TOKENS_KEY, block_tokens)
        return cached

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        hashes = self.hashes(cycle, request, endpoints)
        if not hashes:
            cycle.write(MATCHED_BLOCKS_KEY, {})
            return [0.0] * len(endpoints)
        matched = self.index.match(hashes)
        total = len(hashes)
        cycle.write(MATCHED_BLOCKS_KEY, matched)
        cycle.write(TOTAL_BLOCKS_KEY, total)
        return [matched.get(ep.key, 0) / total for ep in endpoints]

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        hashes: list[int] | None = cycle.read(self._state_key)
        if not hashes:
            return
        for profile in result.profiles.values():
            if not profile.endpoints:
                continue
            target = profile.endpoints[0]  # the primary of each profile is where the KV lands
            if self.auto_tune and target.metrics.num_gpu_blocks:
                self.index.set_capacity(target.key, target.metrics.num_gpu_blocks)
            self.index.add(target.key, hashes)

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        self.index.remove_endpoint(endpoint.key)
