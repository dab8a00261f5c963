"""`load-aware-scorer`: an absolute (not relative) score on the waiting queue.

    q == 0  -> 0.5
    q > 0   -> 0.5 * (1 - min(q, T) / T)      T = `threshold` (default 128)

An idle queue scores 0.5 rather than 1 so that, in the Go EPP's design, a future signal of spare
capacity can score above it. A `threshold` below 1 falls back to 128, as in the Go EPP.

Consumes: scraped metrics (`vllm:num_requests_waiting`). Produces: nothing.
Parameters: `threshold` (int, default 128): the queue length that scores 0.

    plugins:
    - type: load-aware-scorer
      parameters:
        threshold: 64
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from epp.framework import CycleState, Endpoint, InferenceRequest, ParamDoc, Params, PluginHandle, Scorer

DEFAULT_THRESHOLD = 128


class LoadAwareScorer(Scorer):
    """Scores the waiting queue absolutely: 0.5 when empty, falling linearly to 0 at `threshold`
    waiting requests."""

    type_name = "load-aware-scorer"
    parameters = (
        ParamDoc(
            "threshold",
            "int",
            str(DEFAULT_THRESHOLD),
            "Waiting requests at which an endpoint scores 0; below 1 falls back to the default.",
        ),
    )

    def __init__(self, name: str = "", *, threshold: int = DEFAULT_THRESHOLD) -> None:
        super().__init__(name)
        self.threshold = float(threshold if threshold > 0 else DEFAULT_THRESHOLD)

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        threshold = params.get_int("threshold", DEFAULT_THRESHOLD)
        if threshold <= 0:
            params.warn(f"threshold {threshold} is not positive; using {DEFAULT_THRESHOLD}")
            threshold = DEFAULT_THRESHOLD
        return cls(name, threshold=threshold)

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        t = self.threshold
        out = []
        for ep in endpoints:
            q = ep.metrics.waiting_queue_size
            out.append(0.5 if q <= 0 else 0.5 * (1.0 - min(q, t) / t))
        return out
