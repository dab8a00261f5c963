"""`active-request-scorer`: prefer endpoints with fewer requests in flight, by epp's own count.

The count is the in-flight ledger's (`Endpoint.inflight_requests`): requests epp has routed to
the endpoint and not yet seen complete, so it reacts to a burst before the next metrics scrape
does. With c the endpoint's count and M the largest count among the candidates:

    c <= idleThreshold   -> 1.0
    otherwise            -> (M - c) / M x maxBusyScore

`idleThreshold` and `maxBusyScore` open a gap between idle and busy endpoints.
`requestTimeout` is accepted for older configs and ignored, as in the Go EPP: a request leaves
the count when its stream ends, however it ends.

Consumes: the in-flight ledger. Produces: nothing.

    - type: active-request-scorer
      parameters:
        idleThreshold: 2
        maxBusyScore: 0.5
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from epp.framework import CycleState, Endpoint, InferenceRequest, ParamDoc, Params, PluginHandle, Scorer


class ActiveRequestScorer(Scorer):
    """Prefers endpoints with fewer requests in flight, by epp's own in-flight ledger: 1.0 up to
    `idleThreshold`, else (max - count) / max x `maxBusyScore`."""

    type_name = "active-request-scorer"
    parameters = (
        ParamDoc("idleThreshold", "int", "0", "Requests in flight up to which an endpoint scores 1.0."),
        ParamDoc("maxBusyScore", "float", "1.0", "Highest score of a busy endpoint, in [0, 1]."),
        ParamDoc("requestTimeout", "duration", "", "Deprecated and ignored."),
        ParamDoc(
            "inFlightLoadProducerName", "string", "", "Accepted for older configs; the count is epp's ledger."
        ),
    )

    def __init__(self, name: str = "", *, idle_threshold: int = 0, max_busy_score: float = 1.0) -> None:
        super().__init__(name)
        self.idle_threshold = max(0, idle_threshold)
        self.max_busy_score = max_busy_score

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        busy = params.get_float("maxBusyScore", 1.0)
        if not 0.0 <= busy <= 1.0:
            params.warn(f"maxBusyScore {busy} is outside [0, 1]; using 1.0")
            busy = 1.0
        if "requestTimeout" in params:
            params.get_str("requestTimeout", "")
            params.warn(
                "parameter 'requestTimeout' is deprecated and ignored (a request counts until it ends)"
            )
        params.get_str("inFlightLoadProducerName", "")
        return cls(name, idle_threshold=params.get_int("idleThreshold", 0), max_busy_score=busy)

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        counts = [ep.inflight_requests for ep in endpoints]
        if not counts:
            return []
        most = max(counts)
        idle, busy = self.idle_threshold, self.max_busy_score
        return [1.0 if c <= idle else (most - c) / most * busy for c in counts]
