"""`concurrency-detector`: pool saturation from epp's own in-flight counts (no scraped metrics),
so it reacts at once to what epp routes.

requests mode: sum of in-flight requests / (endpoints x maxConcurrency);
tokens mode: sum of in-flight token estimates / (endpoints x maxTokenConcurrency).
An empty pool reads 1.0. Flow control stops dispatching at >= 1.0.

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

from epp.framework import ConfigError, Endpoint, ParamDoc, Params, PluginHandle, SaturationDetector

DEFAULT_MAX_CONCURRENCY = 100
DEFAULT_MAX_TOKEN_CONCURRENCY = 1_000_000
MODES = ("requests", "tokens")


class ConcurrencyDetector(SaturationDetector):
    """Saturation from epp's in-flight ledger: in-flight requests (or tokens) summed over the
    pool, over the pool's capacity (endpoints x maxConcurrency, or x maxTokenConcurrency)."""

    type_name = "concurrency-detector"
    parameters = (
        ParamDoc("concurrencyMode", "string", "requests", "`requests` or `tokens`: what is counted."),
        ParamDoc("maxConcurrency", "int", "100", "Requests in flight one endpoint is meant to hold (> 0)."),
        ParamDoc(
            "maxTokenConcurrency", "int", "1000000", "Tokens in flight one endpoint is meant to hold (> 0)."
        ),
        ParamDoc(
            "headroom",
            "float",
            "0.0",
            "Go's burst allowance for its endpoint filter role; epp's detector does not filter: accepted, "
            "checked (>= 0), unused.",
        ),
    )

    def __init__(
        self,
        name: str = "",
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        mode: str = "requests",
        max_token_concurrency: int = DEFAULT_MAX_TOKEN_CONCURRENCY,
    ) -> None:
        super().__init__(name)
        if max_concurrency <= 0:
            raise ConfigError(f"maxConcurrency must be > 0, got {max_concurrency}")
        if max_token_concurrency <= 0:
            raise ConfigError(f"maxTokenConcurrency must be > 0, got {max_token_concurrency}")
        if mode not in MODES:
            raise ConfigError(f"concurrencyMode must be one of {', '.join(MODES)}, got {mode!r}")
        self.max_concurrency = max_concurrency
        self.max_token_concurrency = max_token_concurrency
        self.tokens = mode == "tokens"

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        headroom = params.get_float("headroom", 0.0)
        if headroom < 0:
            raise ConfigError(f"parameter 'headroom' must be >= 0, got {headroom}")
        return cls(
            name,
            params.get_int("maxConcurrency", DEFAULT_MAX_CONCURRENCY),
            params.get_str("concurrencyMode", "requests", MODES),
            params.get_int("maxTokenConcurrency", DEFAULT_MAX_TOKEN_CONCURRENCY),
        )

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        if not endpoints:
            return 1.0
        if self.tokens:
            return sum(ep.inflight_tokens for ep in endpoints) / (len(endpoints) * self.max_token_concurrency)
        return sum(ep.inflight_requests for ep in endpoints) / (len(endpoints) * self.max_concurrency)
