"""queue-scorer: prefer endpoints with shorter waiting queues, min-max normalised over candidates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from epp.framework import CycleState, Endpoint, InferenceRequest, Params


class QueueScorer:
    type_name: ClassVar[str] = "queue-scorer"

    def __init__(self, name: str = type_name, params: Params | None = None) -> None:
        self.name = name

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        queues = [ep.metrics.waiting_queue_size for ep in endpoints]
        if not queues:
            return []
        low, high = min(queues), max(queues)
        if high == low:
            return [1.0] * len(queues)  # all equal: no preference
        span = high - low
        return [(high - q) / span for q in queues]
