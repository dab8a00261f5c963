"""`kv-cache-utilization-scorer`: prefer endpoints with more free KV cache: 1 - usage.

Usage is `vllm:kv_cache_usage_perc` (0..1); an endpoint never scraped counts as empty (score 1).
No parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from epp.framework import CycleState, Endpoint, InferenceRequest, Params


class KvCacheUtilizationScorer:
    type_name: ClassVar[str] = "kv-cache-utilization-scorer"

    def __init__(self, name: str = type_name, params: Params | None = None) -> None:
        self.name = name

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        return [1.0 - ep.metrics.kv_cache_usage for ep in endpoints]
