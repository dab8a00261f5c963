"""`concurrency-detector`: pool saturation from epp's own in-flight counts (no scraped metrics),
so it reacts at once to what epp routes.

requests mode: sum of in-flight requests / (endpoints x maxConcurrency);
tokens mode: sum of in-flight token estimates / (endpoints x maxTokenConcurrency);
hybrid mode: the mean over endpoints of max(request ratio, token ratio).
An empty pool reads 1.0. Flow control stops dispatching at >= 1.0.

Placed in a scheduling profile it is also a filter that protects each endpoint: it drops the
endpoints whose in-flight requests (tokens; either in hybrid mode) reached maxConcurrency x
(1 + headroom), as the Go detector does (an empty result stops the profile: 429).

    plugins:
    - type: concurrency-detector
      parameters:
        maxConcurrency: 132
        concurrencyMode: requests
    flowControl:
      saturationDetector:
        pluginRef: concurrency-detector
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from epp.framework import (
    ConfigError,
    CycleState,
    Endpoint,
    Filter,
    InferenceRequest,
    ParamDoc,
    Params,
    PluginHandle,
    SaturationDetector,
)

DEFAULT_MAX_CONCURRENCY = 100
DEFAULT_MAX_TOKEN_CONCURRENCY = 1_000_000
MODES = ("requests", "tokens", "hybrid")


class ConcurrencyDetector(SaturationDetector, Filter):
    """Saturation from epp's in-flight ledger: in-flight requests (or tokens) summed over the
    pool, over the pool's capacity (endpoints x maxConcurrency, or x maxTokenConcurrency). In a
    profile, a filter dropping endpoints at maxConcurrency x (1 + headroom)."""

    type_name = "concurrency-detector"
    parameters = (
        ParamDoc(
            "concurrencyMode",
            "string",
            "requests",
            "`requests`, `tokens` or `hybrid` (both): what is counted.",
        ),
        ParamDoc("maxConcurrency", "int", "100", "Requests in flight one endpoint is meant to hold (> 0)."),
        ParamDoc(
            "maxTokenConcurrency", "int", "1000000", "Tokens in flight one endpoint is meant to hold (> 0)."
        ),
        ParamDoc(
            "headroom",
            "float",
            "0.0",
            "As a filter: an endpoint is dropped at maxConcurrency x (1 + headroom) (>= 0).",
        ),
    )

    def __init__(
        self,
        name: str = "",
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        mode: str = "requests",
        max_token_concurrency: int = DEFAULT_MAX_TOKEN_CONCURRENCY,
        headroom: float = 0.0,
    ) -> None:
        super().__init__(name)
        if max_concurrency <= 0:
            raise ConfigError(f"maxConcurrency must be > 0, got {max_concurrency}")
        if max_token_concurrency <= 0:
            raise ConfigError(f"maxTokenConcurrency must be > 0, got {max_token_concurrency}")
        if headroom < 0:
            raise ConfigError(f"headroom must be >= 0, got {headroom}")
        if mode not in MODES:
            raise ConfigError(f"concurrencyMode must be one of {', '.join(MODES)}, got {mode!r}")
        self.max_concurrency = max_concurrency
        self.max_token_concurrency = max_token_concurrency
        self.mode = mode
        self.request_limit = int(max_concurrency * (1.0 + headroom))
        self.token_limit = int(max_token_concurrency * (1.0 + headroom))

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        return cls(
            name,
            params.get_int("maxConcurrency", DEFAULT_MAX_CONCURRENCY),
            params.get_str("concurrencyMode", "requests", MODES),
            params.get_int("maxTokenConcurrency", DEFAULT_MAX_TOKEN_CONCURRENCY),
            params.get_float("headroom", 0.0),
        )

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        if not endpoints:
            return 1.0
        if self.mode == "tokens":
            return sum(ep.inflight_tokens for ep in endpoints) / (len(endpoints) * self.max_token_concurrency)
        if self.mode == "hybrid":
            req, tok = self.max_concurrency, self.max_token_concurrency
            total = sum(max(ep.inflight_requests / req, ep.inflight_tokens / tok) for ep in endpoints)
            return total / len(endpoints)
        return sum(ep.inflight_requests for ep in endpoints) / (len(endpoints) * self.max_concurrency)

    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        req, tok, mode = self.request_limit, self.token_limit, self.mode
        if mode == "requests":
            return [ep for ep in endpoints if ep.inflight_requests < req]
        if mode == "tokens":
            return [ep for ep in endpoints if ep.inflight_tokens < tok]
        return [ep for ep in endpoints if ep.inflight_requests < req and ep.inflight_tokens < tok]
