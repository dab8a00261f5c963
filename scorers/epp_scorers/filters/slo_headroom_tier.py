"""`slo-headroom-tier-filter`: keeps the endpoints predicted to meet the request's SLOs, most of
the time.

Splits the candidates by `predicted-latency-producer`'s headroom: positive (TTFT and TPOT
headroom both >= 0) and negative (either < 0, or no prediction for the endpoint). Both tiers
present: the positive one is kept, except with probability `epsilonExploreNeg` the negative one
(so an endpoint recovering from overload gets the odd request and its predictions follow). One
tier: it is kept. No predictions at all (no model yet), or at most one candidate: all are kept.
Without SLO headers every headroom is negative and the filter keeps everything.

Consumes: `latency-prediction-info` of `latencyPredictionInfoProducerName`.

    plugins:
    - type: slo-headroom-tier-filter
      parameters: {epsilonExploreNeg: 0.01}
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any, Self

from epp.framework import (
    CycleState,
    DataKey,
    Endpoint,
    Filter,
    InferenceRequest,
    ParamDoc,
    Params,
    PluginHandle,
)
from epp_scorers.producers.predicted_latency import DEFAULT_LATENCY_PRODUCER, LATENCY_PREDICTION


class SloHeadroomTierFilter(Filter):
    """Keeps the endpoints predicted to meet the request's TTFT and TPOT SLOs (headroom >= 0)
    when there are any, except with probability `epsilonExploreNeg` the others; keeps all
    without predictions."""

    type_name = "slo-headroom-tier-filter"
    parameters = (
        ParamDoc(
            "epsilonExploreNeg",
            "float",
            "0.01",
            "Probability of keeping the negative tier instead when both exist, in [0, 1].",
        ),
        ParamDoc(
            "latencyPredictionInfoProducerName",
            "string",
            DEFAULT_LATENCY_PRODUCER,
            "Producer of the latency predictions.",
        ),
    )

    def __init__(
        self,
        name: str = "",
        *,
        epsilon_explore_neg: float = 0.01,
        latency_producer: str = DEFAULT_LATENCY_PRODUCER,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name)
        self.epsilon = epsilon_explore_neg
        self.key = LATENCY_PREDICTION.for_producer(latency_producer or DEFAULT_LATENCY_PRODUCER)
        self._rng = rng or random.Random()

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        return cls(
            name,
            epsilon_explore_neg=params.get_float("epsilonExploreNeg", 0.01, minimum=0.0, maximum=1.0),
            latency_producer=params.get_str("latencyPredictionInfoProducerName", ""),
        )

    def consumes(self) -> Collection[DataKey[Any]]:
        return (self.key,)

    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        if len(endpoints) <= 1:
            return endpoints
        predictions = cycle.read(self.key)
        if predictions is None or not predictions.available:
            return endpoints
        positive: list[Endpoint] = []
        negative: list[Endpoint] = []
        for ep in endpoints:
            p = predictions.get(ep)
            if p is not None and p.ttft_headroom_ms >= 0 and p.tpot_headroom_ms >= 0:
                positive.append(ep)
            else:
                negative.append(ep)
        if not positive:
            return endpoints  # all negative: the same set
        if negative and self.epsilon and self._rng.random() < self.epsilon:
            return negative
        return positive
