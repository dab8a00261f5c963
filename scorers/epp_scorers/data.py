"""Data the in-tree plugins share through the cycle state: what each kind holds, its typed key,
and the producer the loader adds when a consumer needs it and no configured plugin produces it.

A consumer names its producer by plugin name (parameter `prefixMatchInfoProducerName` /
`inFlightLoadProducerName`, default: the default producer's type name) and reads
`PREFIX_MATCH.for_producer(name)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from epp.framework import DataKey, Endpoint

DEFAULT_PREFIX_PRODUCER = "approx-prefix-cache-producer"
DEFAULT_INFLIGHT_PRODUCER = "inflight-load-producer"


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """How much of this request's prompt each endpoint probably holds in its KV cache.

    `matched` maps endpoint key -> blocks matched from the start of the prompt (absent = 0).
    """

    matched: Mapping[str, int]
    total_blocks: int
    block_size_tokens: int

    def ratio(self, endpoint: Endpoint) -> float:
        """Matched blocks / prompt blocks; 0 when the prompt has no block."""
        if not self.total_blocks:
            return 0.0
        return self.matched.get(endpoint.key, 0) / self.total_blocks

    def uncached_tokens(self, endpoint: Endpoint, input_tokens: int) -> int:
        """Input tokens this endpoint would have to prefill: the unmatched blocks plus the tail
        beyond the hashed blocks."""
        return self.uncached_tokens_of(self.matched.get(endpoint.key, 0), input_tokens)

    def uncached_tokens_of(self, matched_blocks: int, input_tokens: int) -> int:
        """`uncached_tokens` of an endpoint holding `matched_blocks` of the prompt's blocks."""
        size = self.block_size_tokens
        indexed = self.total_blocks * size
        return max(0, indexed - matched_blocks * size) + max(0, input_tokens - indexed)


class InFlightLoad(Protocol):
    """epp's in-flight counts as one request sees them (from the in-flight ledger), and what this
    request would add."""

    def requests(self, endpoint: Endpoint) -> int:
        """Requests in flight to the endpoint."""
        ...

    def tokens(self, endpoint: Endpoint) -> int:
        """Tokens in flight to the endpoint."""
        ...

    def request_tokens(self, endpoint: Endpoint) -> int:
        """Tokens this request would add to the endpoint (its uncached input, and an output
        estimate when configured)."""
        ...

    def request_tokens_each(self, endpoints: Sequence[Endpoint]) -> list[int]:
        """`request_tokens` of each endpoint, in order: one value for every endpoint that holds
        none of the prompt, looked up for the few that do (no call per endpoint)."""
        ...


PREFIX_MATCH: DataKey[PrefixMatch] = DataKey("prefix-cache-match", DEFAULT_PREFIX_PRODUCER)
INFLIGHT_LOAD: DataKey[InFlightLoad] = DataKey("inflight-load", DEFAULT_INFLIGHT_PRODUCER)
