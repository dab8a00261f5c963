"""`kv-headroom-scorer`: prefer endpoints with the most free KV cache per request they serve.

`kv-cache-utilization-scorer` looks at free KV cache alone. But a pod with 30% free KV and 60
requests decoding will fill that space much sooner than a pod with 25% free and 2 requests: every
running request grows its KV by one token per step. This scorer divides the free fraction by the
requests that will share it:

    headroom = (1 - kv_usage) / (1 + running [+ waiting])
    score    = headroom / max(headroom over the candidates)       (all 0 when nothing is free)

Parameters:
    countWaiting (bool, default true): count queued requests as sharing the headroom too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from epp.framework import CycleState, Endpoint, InferenceRequest, Params

__all__ = ["KvHeadroomScorer"]


class KvHeadroomScorer:
    type_name: ClassVar[str] = "kv-headroom-scorer"

    def __init__(self, name: str = type_name, params: Params | None = None) -> None:
        params = params or Params(None, name)
        self.name = name
        self.count_waiting = params.get_bool("countWaiting", True)

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        headroom = []
        for ep in endpoints:
            m = ep.metrics
            sharing = 1 + m.running_requests + (m.waiting_queue_size if self.count_waiting else 0)
            headroom.append(max(0.0, 1.0 - m.kv_cache_usage) / sharing)
        best = max(headroom, default=0.0)
        if best <= 0.0:
            return [0.0] * len(endpoints)
        return [h / best for h in headroom]
