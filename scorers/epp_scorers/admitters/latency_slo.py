"""`latency-slo-admitter`: refuses a sheddable request (priority < 0) that carries an SLO header
when no endpoint is predicted to meet it, instead of routing it to a certain miss.

Runs after the data producers (as in Go), on `predicted-latency-producer`'s predictions. A
request with priority >= 0, or without `x-llm-d-slo-ttft-ms` / `x-llm-d-slo-tpot-ms` (or the
older `x-slo-*-ms`) > 0, is always admitted. A sheddable one is admitted when any candidate has a
valid prediction (within both SLOs), is idle (no running request by its scraped metrics), or is
cold (KV-cache use < 2 %: too little load for the predictions to be trusted); also when there are
no predictions at all (fail open). Otherwise it is refused: 429 with
`x-llm-d-request-dropped-reason: rejected-saturated` (Go's director makes any admitter refusal a
500; epp's admitters answer 429, docs/flow-control.md).

Consumes: `latency-prediction-info` of `latencyPredictionInfoProducerName`.

    plugins:
    - type: latency-slo-admitter
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Self

from epp.framework import (
    Admitter,
    CycleState,
    DataKey,
    Endpoint,
    InferenceRequest,
    ParamDoc,
    Params,
    PluginHandle,
)
from epp_scorers.producers.predicted_latency import (
    DEFAULT_LATENCY_PRODUCER,
    LATENCY_PREDICTION,
    TPOT_SLO_HEADERS,
    TTFT_SLO_HEADERS,
    slo_ms,
)

COLD_KV_CACHE_USAGE = 0.02  # below this an endpoint is "cold": its predictions are not trusted


class LatencySloAdmitter(Admitter):
    """Refuses (429) a sheddable request (priority < 0) with an SLO header when no endpoint is
    predicted to meet its SLOs and none is idle or cold; everything else is admitted."""

    type_name = "latency-slo-admitter"
    parameters = (
        ParamDoc(
            "latencyPredictionInfoProducerName",
            "string",
            DEFAULT_LATENCY_PRODUCER,
            "Producer of the latency predictions.",
        ),
    )

    def __init__(self, name: str = "", *, latency_producer: str = DEFAULT_LATENCY_PRODUCER) -> None:
        super().__init__(name)
        self.key = LATENCY_PREDICTION.for_producer(latency_producer or DEFAULT_LATENCY_PRODUCER)

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        return cls(name, latency_producer=params.get_str("latencyPredictionInfoProducerName", ""))

    def consumes(self) -> Collection[DataKey[Any]]:
        return (self.key,)

    def admit(self, request: InferenceRequest, priority: int, endpoints: Sequence[Endpoint]) -> str | None:
        return None  # without the producers' data there is nothing to judge by: admit

    def admit_with_data(
        self, cycle: CycleState, request: InferenceRequest, priority: int, endpoints: Sequence[Endpoint]
    ) -> str | None:
        if priority >= 0:
            return None
        headers = request.headers
        if slo_ms(headers, TTFT_SLO_HEADERS) <= 0 and slo_ms(headers, TPOT_SLO_HEADERS) <= 0:
            return None
        predictions = cycle.read(self.key)
        if predictions is None or not predictions.available:
            return None
        for ep in endpoints:
            m = ep.metrics
            if m.kv_cache_usage < COLD_KV_CACHE_USAGE or m.running_requests == 0:
                return None
            p = predictions.get(ep)
            if p is not None and p.valid:
                return None
        return f"{self.name}: no endpoint is predicted to meet the request's latency SLO"
