"""`latency-scorer`: scores endpoints by their predicted latency headroom to the request's SLOs
(`predicted-latency-producer`).

Endpoints whose TTFT and TPOT headroom are both >= 0 are scored and the others get 0. When all
are negative: idle endpoints (no request epp has in flight there) are scored alone if there are
any; else only the least severe bucket is scored: TPOT-only deficit, then TTFT-only, then both.
Within the scored set, |TTFT headroom| and |TPOT headroom| are each min-max normalised, blended
with `ttftWeight` / `tpotWeight` (normalised to sum 1; a dimension whose values are all equal gets
weight 0 when the other varies), and mapped to (int(100 x s) + 1) / 100: with
`headroomSelectionStrategy` `least`, s = 1 - blend (closest to the SLO first: bin-packing), with
`most`, s = blend (most headroom first). Negative headroom always uses `least` (the smallest
deficit first). No SLO header: every headroom is minus the prediction, so the lowest predicted
latency wins.

Without predictions (no model yet): a composite of free KV cache, relative queue
((max waiting - waiting) / max waiting) and prefix share, weighted by the `composite*Weight`
parameters, rounded to hundredths.

Consumes: `latency-prediction-info` of `latencyPredictionInfoProducerName`, and the prefix match
of `prefixMatchInfoProducerName` (the composite fallback).

    plugins:
    - type: latency-scorer
      parameters: {ttftWeight: 0.8, tpotWeight: 0.2, headroomSelectionStrategy: least}
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Self

import numpy as np

from epp.framework import (
    SMALL_POOL_SIZE,
    Column,
    CycleState,
    DataKey,
    Endpoint,
    InferenceRequest,
    ParamDoc,
    Params,
    PluginHandle,
    Scorer,
    Scores,
)
from epp_scorers.data import DEFAULT_PREFIX_PRODUCER, PREFIX_MATCH
from epp_scorers.producers.predicted_latency import (
    DEFAULT_LATENCY_PRODUCER,
    LATENCY_PREDICTION,
    LatencyPrediction,
    LatencyPredictions,
)

_W_MAX = 100
_EPS = 1e-9

_Scored = tuple[int, LatencyPrediction]  # index into the endpoints, prediction


class LatencyScorer(Scorer):
    """Scores endpoints by predicted latency headroom to the request's SLOs (closest to the SLO
    first with `least`, most headroom first with `most`); when every endpoint misses, idle ones
    and then the smallest deficit win. Without predictions: free KV, queue and prefix share."""

    type_name = "latency-scorer"
    parameters = (
        ParamDoc("ttftWeight", "float", "0.8", "Weight of TTFT headroom in the blend (>= 0)."),
        ParamDoc("tpotWeight", "float", "0.2", "Weight of TPOT headroom in the blend (>= 0)."),
        ParamDoc(
            "headroomSelectionStrategy",
            "string",
            "least",
            "`least`: prefer the endpoint closest to the SLO; `most`: the most headroom.",
        ),
        ParamDoc("compositeKVWeight", "float", "1", "Free KV-cache weight of the no-prediction fallback."),
        ParamDoc("compositeQueueWeight", "float", "1", "Queue weight of the no-prediction fallback."),
        ParamDoc("compositePrefixWeight", "float", "1", "Prefix-share weight of the no-prediction fallback."),
        ParamDoc(
            "latencyPredictionInfoProducerName",
            "string",
            DEFAULT_LATENCY_PRODUCER,
            "Producer of the latency predictions.",
        ),
        ParamDoc(
            "prefixMatchInfoProducerName", "string", DEFAULT_PREFIX_PRODUCER, "Producer of the prefix match."
        ),
    )

    def __init__(
        self,
        name: str = "",
        *,
        ttft_weight: float = 0.8,
        tpot_weight: float = 0.2,
        strategy: str = "least",
        composite_kv_weight: float = 1.0,
        composite_queue_weight: float = 1.0,
        composite_prefix_weight: float = 1.0,
        latency_producer: str = DEFAULT_LATENCY_PRODUCER,
        prefix_producer: str = DEFAULT_PREFIX_PRODUCER,
    ) -> None:
        super().__init__(name)
        total = ttft_weight + tpot_weight
        self.alpha, self.beta = (ttft_weight / total, tpot_weight / total) if total > 0 else (1.0, 0.0)
        self.most = strategy == "most"
        kv, queue, prefix = composite_kv_weight, composite_queue_weight, composite_prefix_weight
        total = kv + queue + prefix
        if total <= 0:
            kv, queue, prefix, total = 1.0, 0.0, 0.0, 1.0
        self.composite = (kv / total, queue / total, prefix / total)
        self.key = LATENCY_PREDICTION.for_producer(latency_producer or DEFAULT_LATENCY_PRODUCER)
        self.prefix_key = PREFIX_MATCH.for_producer(prefix_producer or DEFAULT_PREFIX_PRODUCER)

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        return cls(
            name,
            ttft_weight=params.get_float("ttftWeight", 0.8, minimum=0.0),
            tpot_weight=params.get_float("tpotWeight", 0.2, minimum=0.0),
            strategy=params.get_str("headroomSelectionStrategy", "least", ("least", "most")),
            composite_kv_weight=params.get_float("compositeKVWeight", 1.0, minimum=0.0),
            composite_queue_weight=params.get_float("compositeQueueWeight", 1.0, minimum=0.0),
            composite_prefix_weight=params.get_float("compositePrefixWeight", 1.0, minimum=0.0),
            latency_producer=params.get_str("latencyPredictionInfoProducerName", ""),
            prefix_producer=params.get_str("prefixMatchInfoProducerName", ""),
        )

    def consumes(self) -> Collection[DataKey[Any]]:
        return (self.key, self.prefix_key)

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Scores:
        scores = [0.0] * len(endpoints)
        predictions: LatencyPredictions | None = cycle.read(self.key)
        if predictions is None or not predictions.available:
            return self._composite(cycle, endpoints)
        if len(endpoints) > SMALL_POOL_SIZE:
            return self._score_arrays(predictions, endpoints)
        positive: list[_Scored] = []
        negative: list[_Scored] = []
        for i, ep in enumerate(endpoints):
            p = predictions.get(ep)
            if p is None:
                continue  # no prediction for it: scores 0 beside those that have one
            (negative if p.ttft_headroom_ms < 0 or p.tpot_headroom_ms < 0 else positive).append((i, p))
        if positive:
            self._score_bucket(positive, scores, least=not self.most)
            return scores
        idle = [d for d in negative if d[1].dispatched == 0]
        if idle:
            self._score_bucket(idle, scores, least=True)
            return scores
        tpot_only = [d for d in negative if d[1].ttft_headroom_ms >= 0]
        ttft_only = [d for d in negative if d[1].ttft_headroom_ms < 0 <= d[1].tpot_headroom_ms]
        for bucket in (tpot_only, ttft_only, negative):
            if bucket:
                self._score_bucket(bucket, scores, least=True)
                break
        return scores

    def _score_bucket(self, bucket: list[_Scored], scores: list[float], *, least: bool) -> None:
        ttft = [abs(p.ttft_headroom_ms) for _, p in bucket]
        tpot = [abs(p.tpot_headroom_ms) for _, p in bucket]
        ttft_min, tpot_min = min(ttft), min(tpot)
        ttft_range, tpot_range = max(ttft) - ttft_min, max(tpot) - tpot_min
        alpha, beta = self.alpha, self.beta
        if ttft_range <= _EPS < tpot_range:
            alpha, beta = 0.0, 1.0
        elif tpot_range <= _EPS < ttft_range:
            alpha, beta = 1.0, 0.0
        for j, (i, _) in enumerate(bucket):
            n_ttft = (ttft[j] - ttft_min) / ttft_range if ttft_range > _EPS else 0.5
            n_tpot = (tpot[j] - tpot_min) / tpot_range if tpot_range > _EPS else 0.5
            blend = alpha * n_ttft + beta * n_tpot
            s = 1.0 - blend if least else blend
            scores[i] = (int(s * _W_MAX) + 1) / _W_MAX

    def _score_arrays(self, predictions: LatencyPredictions, endpoints: Sequence[Endpoint]) -> Column:
        """`score` on the prediction table's columns: the same buckets, in the same order, and
        the same floats as the loop (each step the same IEEE operation, elementwise)."""
        table = predictions.table()
        scores = np.zeros(len(endpoints))
        if table is None:
            return scores
        rows = predictions.rows_of(endpoints)
        known = rows >= 0
        at = np.where(known, rows, 0)
        ttft_room, tpot_room = table.ttft_headroom_ms[at], table.tpot_headroom_ms[at]
        negative = known & ((ttft_room < 0) | (tpot_room < 0))
        positive = known & ~negative
        if positive.any():
            buckets, least = [positive], not self.most
        else:
            idle = negative & (table.dispatched[at] == 0)
            tpot_only = negative & (ttft_room >= 0)
            ttft_only = negative & (ttft_room < 0) & (tpot_room >= 0)
            buckets, least = [idle, tpot_only, ttft_only, negative], True
        for bucket in buckets:
            if bucket.any():
                chosen = np.flatnonzero(bucket)
                scores[chosen] = self._bucket_scores(
                    np.abs(ttft_room[chosen]), np.abs(tpot_room[chosen]), least
                )
                break
        return scores

    def _bucket_scores(self, ttft: Column, tpot: Column, least: bool) -> Column:
        """`_score_bucket`'s formula on arrays."""
        ttft_min, tpot_min = ttft.min(), tpot.min()
        ttft_range, tpot_range = ttft.max() - ttft_min, tpot.max() - tpot_min
        alpha, beta = self.alpha, self.beta
        if ttft_range <= _EPS < tpot_range:
            alpha, beta = 0.0, 1.0
        elif tpot_range <= _EPS < ttft_range:
            alpha, beta = 1.0, 0.0
        n_ttft = (ttft - ttft_min) / ttft_range if ttft_range > _EPS else np.full(len(ttft), 0.5)
        n_tpot = (tpot - tpot_min) / tpot_range if tpot_range > _EPS else np.full(len(tpot), 0.5)
        blend = alpha * n_ttft + beta * n_tpot
        s = 1.0 - blend if least else blend
        result: Column = (np.trunc(s * _W_MAX) + 1) / _W_MAX  # int() truncates toward 0, as trunc
        return result

    def _composite(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        w_kv, w_queue, w_prefix = self.composite
        match = cycle.read(self.prefix_key)
        max_queue = max((ep.metrics.waiting_queue_size for ep in endpoints), default=0)
        out = []
        for ep in endpoints:
            m = ep.metrics
            queue = (max_queue - m.waiting_queue_size) / max_queue if max_queue > 0 else 1.0
            prefix = match.ratio(ep) if match is not None else 0.0
            blend = w_kv * (1.0 - m.kv_cache_usage) + w_queue * queue + w_prefix * prefix
            out.append(round(_W_MAX * blend) / _W_MAX)
        return out
