"""`probabilistic-admitter`: sheds sheddable requests (priority < 0) at random, more of them the
more loaded the pool is; requests with priority >= 0 are always admitted.

saturation = mean over endpoints of max(waiting / queueDepthThreshold, kvCacheUsage /
kvCacheUtilThreshold) (an endpoint never scraped counts as 1.0); a sheddable request is refused
(429) with probability min(saturation^power x k, 1). With the defaults (power 5, k 300) nothing
much is shed below saturation 0.15 and everything is at 0.34. No endpoints: admit.

    plugins:
    - type: probabilistic-admitter
      parameters: {power: 5, k: 300}
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Self

from epp.framework import Admitter, ConfigError, Endpoint, InferenceRequest, ParamDoc, Params, PluginHandle

DEFAULT_QUEUE_DEPTH_THRESHOLD = 5
DEFAULT_KV_CACHE_UTIL_THRESHOLD = 0.8
DEFAULT_POWER = 5.0
DEFAULT_K = 300.0


class ProbabilisticAdmitter(Admitter):
    """Refuses sheddable requests (priority < 0) with probability min(saturation^power x k, 1),
    saturation being the mean over endpoints of max(queue / queueDepthThreshold, KV use /
    kvCacheUtilThreshold); other requests always pass."""

    type_name = "probabilistic-admitter"
    parameters = (
        ParamDoc(
            "queueDepthThreshold", "int", "5", "Waiting requests at which one endpoint counts as full (> 0)."
        ),
        ParamDoc(
            "kvCacheUtilThreshold", "float", "0.8", "KV-cache use at which one endpoint counts as full (> 0)."
        ),
        ParamDoc("power", "float", "5.0", "Steepness of the shedding curve (> 0)."),
        ParamDoc(
            "k",
            "float",
            "300.0",
            "Scale of the shedding curve: all is shed at saturation (1/k)^(1/power) (> 0).",
        ),
    )

    def __init__(
        self,
        name: str = "",
        queue_depth_threshold: float = DEFAULT_QUEUE_DEPTH_THRESHOLD,
        kv_cache_util_threshold: float = DEFAULT_KV_CACHE_UTIL_THRESHOLD,
        power: float = DEFAULT_POWER,
        k: float = DEFAULT_K,
        rand: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(name)
        for key, value in (
            ("queueDepthThreshold", queue_depth_threshold),
            ("kvCacheUtilThreshold", kv_cache_util_threshold),
            ("power", power),
            ("k", k),
        ):
            if value <= 0:
                raise ConfigError(f"{key} must be > 0, got {value}")
        self.queue_depth_threshold = float(queue_depth_threshold)
        self.kv_cache_util_threshold = kv_cache_util_threshold
        self.power = power
        self.k = k
        self._rand = rand

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        return cls(
            name,
            params.get_int("queueDepthThreshold", DEFAULT_QUEUE_DEPTH_THRESHOLD),
            params.get_float("kvCacheUtilThreshold", DEFAULT_KV_CACHE_UTIL_THRESHOLD),
            params.get_float("power", DEFAULT_POWER),
            params.get_float("k", DEFAULT_K),
        )

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        total = 0.0
        for ep in endpoints:
            m = ep.metrics
            if m.updated_at <= 0.0:
                total += 1.0
            else:
                total += max(
                    m.waiting_queue_size / self.queue_depth_threshold,
                    m.kv_cache_usage / self.kv_cache_util_threshold,
                )
        return total / len(endpoints)

    def admit(self, request: InferenceRequest, priority: int, endpoints: Sequence[Endpoint]) -> str | None:
        if priority >= 0 or not endpoints:
            return None
        saturation = self.saturation(endpoints)
        probability = min(saturation**self.power * self.k, 1.0)
        if self._rand() < probability:
            return f"probabilistic-admitter: rejected, saturation={saturation:.3f} prob={probability:.2f}"
        return None
