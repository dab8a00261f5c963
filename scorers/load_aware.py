"""`load-aware-scorer`: an absolute (not relative) score on the waiting queue.

    q == 0  -> 0.5
    q > 0   -> 0.5 * (1 - min(q, T) / T)      T = `threshold` (default 128)

An idle queue scores 0.5 rather than 1 so that, in the Go EPP's design, a future signal of spare
capacity can score above it. A `threshold` below 1 falls back to 128, as in the Go EPP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from epp.framework import CycleState, Endpoint, InferenceRequest, Params

DEFAULT_THRESHOLD = 128


class LoadAwareScorer:
    type_name: ClassVar[str] = "load-aware-scorer"

    def __init__(self, name: str = type_name, params: Params | None = None) -> None:
        params = params or Params(None, name)
        self.name = name
        threshold = params.get_int("threshold", DEFAULT_THRESHOLD)
        if threshold <= 0:
            params.warn(f"threshold {threshold} is not positive; using {DEFAULT_THRESHOLD}")
            threshold = DEFAULT_THRESHOLD
        self.threshold = float(threshold)

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        t = self.threshold
        out = []
        for ep in endpoints:
            q = ep.metrics.waiting_queue_size
            out.append(0.5 if q <= 0 else 0.5 * (1.0 - min(q, t) / t))
        return out
