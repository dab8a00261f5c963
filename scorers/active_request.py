"""`active-request-scorer`: prefer endpoints with fewer requests in flight, by epp's own count.

The count comes from `inflight-load-producer` (added automatically when not configured): requests
epp has routed to the endpoint and not yet seen complete, so it reacts to a burst before the next
metrics scrape does. With c the endpoint's count and M the largest count among the candidates:

    c <= idleThreshold   -> 1.0
    otherwise            -> (M - c) / M x maxBusyScore

`idleThreshold` (default 0) and `maxBusyScore` (default 1.0, in [0, 1]) open a gap between idle
and busy endpoints. `requestTimeout` is accepted for older configs and ignored, as in the Go EPP:
a request leaves the count when its stream ends, however it ends.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import ClassVar

from epp.framework import (
    DEFAULT_INFLIGHT_PRODUCER,
    INFLIGHT_LOAD_DATA,
    CycleState,
    Endpoint,
    InferenceRequest,
    InFlightLoad,
    Params,
    data_key,
)


class ActiveRequestScorer:
    type_name: ClassVar[str] = "active-request-scorer"

    def __init__(self, name: str = type_name, params: Params | None = None) -> None:
        params = params or Params(None, name)
        self.name = name
        idle = params.get_int("idleThreshold", 0)
        self.idle_threshold = idle if idle >= 0 else 0
        busy = params.get_float("maxBusyScore", 1.0)
        if not 0.0 <= busy <= 1.0:
            params.warn(f"maxBusyScore {busy} is outside [0, 1]; using 1.0")
            busy = 1.0
        self.max_busy_score = busy
        if "requestTimeout" in params:
            params.get_str("requestTimeout", "")
            params.warn(
                "parameter 'requestTimeout' is deprecated and ignored (a request counts until it ends)"
            )
        producer = params.get_str("inFlightLoadProducerName", "") or DEFAULT_INFLIGHT_PRODUCER
        self._load_key = data_key(INFLIGHT_LOAD_DATA, producer)

    def consumes(self) -> Collection[str]:
        return (self._load_key,)

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        load: InFlightLoad | None = cycle.read(self._load_key)
        # Without the producer (a unit test scoring directly), the director's own count.
        counts = (
            [load.requests(ep) for ep in endpoints]
            if load is not None
            else [ep.active_requests for ep in endpoints]
        )
        if not counts:
            return []
        most = max(counts)
        idle, busy = self.idle_threshold, self.max_busy_score
        return [1.0 if c <= idle else (most - c) / most * busy for c in counts]
