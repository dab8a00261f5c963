"""`prefix-cache-affinity-filter`: keep only the endpoints that hold most of the prompt's prefix.

Narrows the candidates to the "sticky" ones: endpoints holding at least `affinityThreshold` of
the prompt's prefix blocks (by the prefix producer's match). If none is sticky, or there is at
most one candidate, all are kept; `affinityThreshold` 0 disables the filter. With probability
`explorationProbability` the gate is skipped, so other endpoints get to warm their caches.

TTFT load gate: when the best sticky endpoint's estimated TTFT (its in-flight tokens /
`peakPrefillThroughput`, in ms) exceeds the best non-sticky one's by more than
`maxTTFTPenaltyMs`, stickiness is broken and all are kept (0 = always stick). With `ttftSource`
`latencyPredictor` the TTFTs are `predicted-latency-producer`'s predictions instead (an endpoint
without one counts as infinitely slow; with none at all the filter sticks).

Consumes: the prefix match (`prefix-cache-match` of `prefixMatchInfoProducerName`) and, when
`maxTTFTPenaltyMs` > 0, the in-flight load (`inflight-load` of `inFlightLoadProducerName`, whose
producer puts this request's token estimates in the in-flight counts) or, with `ttftSource`
`latencyPredictor`, the predictions (`latency-prediction-info` of
`latencyPredictionInfoProducerName`). Produces: nothing.

Parameters: `affinityThreshold` (float <= 1, default 0.80), `explorationProbability` (float in
[0, 1], default 0), `maxTTFTPenaltyMs` (float >= 0, default 18000), `ttftSource`
(prefillThroughput or latencyPredictor), `peakPrefillThroughput` (tokens/s, default 15928; > 0
when the TTFT gate is on with prefillThroughput), `prefixMatchInfoProducerName`,
`inFlightLoadProducerName`, `latencyPredictionInfoProducerName`.

    plugins:
    - type: prefix-cache-affinity-filter
      parameters:
        affinityThreshold: 0.8
        explorationProbability: 0.05
        maxTTFTPenaltyMs: 5000
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, Self

from epp.framework import (
    ConfigError,
    CycleState,
    DataKey,
    Endpoint,
    Filter,
    InferenceRequest,
    ParamDoc,
    Params,
    PluginHandle,
    endpoint_positions,
)
from epp_scorers.data import (
    DEFAULT_INFLIGHT_PRODUCER,
    DEFAULT_PREFIX_PRODUCER,
    INFLIGHT_LOAD,
    PREFIX_MATCH,
)
from epp_scorers.producers.predicted_latency import DEFAULT_LATENCY_PRODUCER, LATENCY_PREDICTION


class PrefixCacheAffinityFilter(Filter):
    """Narrows the candidates to the "sticky" ones: endpoints holding at least `affinityThreshold`
    of the prompt's prefix blocks. If none is sticky, all are kept. With probability
    `explorationProbability` the gate is skipped. TTFT load gate: when the best sticky endpoint's
    estimated TTFT (in-flight tokens / `peakPrefillThroughput`, in ms) exceeds the best
    non-sticky one's by more than `maxTTFTPenaltyMs`, stickiness is broken and all are kept
    (0 = always stick)."""

    type_name = "prefix-cache-affinity-filter"
    parameters = (
        ParamDoc(
            "affinityThreshold", "float", "0.8", "Share of the prefix blocks that makes an endpoint sticky."
        ),
        ParamDoc("explorationProbability", "float", "0.0", "Probability of skipping the filter, in [0, 1]."),
        ParamDoc(
            "maxTTFTPenaltyMs",
            "float",
            "18000.0",
            "TTFT (ms) the best sticky endpoint may exceed the best other one by; 0: always stick.",
        ),
        ParamDoc(
            "ttftSource",
            "string",
            "prefillThroughput",
            "Where the TTFT gate's TTFTs come from: prefillThroughput or latencyPredictor.",
        ),
        ParamDoc(
            "peakPrefillThroughput",
            "float",
            "15928.0",
            "Prefill tokens/s that turn in-flight tokens into TTFT.",
        ),
        ParamDoc(
            "prefixMatchInfoProducerName", "string", DEFAULT_PREFIX_PRODUCER, "Producer of the prefix match."
        ),
        ParamDoc(
            "inFlightLoadProducerName", "string", DEFAULT_INFLIGHT_PRODUCER, "Producer of the in-flight load."
        ),
        ParamDoc(
            "latencyPredictionInfoProducerName",
            "string",
            DEFAULT_LATENCY_PRODUCER,
            "Producer of the latency predictions (ttftSource latencyPredictor).",
        ),
    )

    def __init__(
        self,
        name: str = "",
        *,
        affinity_threshold: float = 0.80,
        exploration_probability: float = 0.0,
        max_ttft_penalty_ms: float = 18000.0,
        peak_prefill_throughput: float = 15928.0,
        prefix_producer: str = DEFAULT_PREFIX_PRODUCER,
        inflight_producer: str = DEFAULT_INFLIGHT_PRODUCER,
        latency_predictor: bool = False,
        latency_producer: str = DEFAULT_LATENCY_PRODUCER,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name)
        self.threshold = affinity_threshold
        self.exploration = exploration_probability
        self.max_penalty_ms = max_ttft_penalty_ms
        self.peak_prefill_tps = peak_prefill_throughput
        self._prefix_key = PREFIX_MATCH.for_producer(prefix_producer)
        self._load_key = INFLIGHT_LOAD.for_producer(inflight_producer)
        self.latency_predictor = latency_predictor  # ttftSource latencyPredictor
        self._latency_key = LATENCY_PREDICTION.for_producer(latency_producer)
        self._rng = rng or random.Random()

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        threshold = params.get_float("affinityThreshold", 0.80, maximum=1.0)
        exploration = params.get_float("explorationProbability", 0.0, minimum=0.0, maximum=1.0)
        max_penalty_ms = params.get_float("maxTTFTPenaltyMs", 18000.0, minimum=0.0)
        source = params.get_str("ttftSource", "prefillThroughput", ("prefillThroughput", "latencyPredictor"))
        predictor = source == "latencyPredictor"
        peak_prefill_tps = params.get_float("peakPrefillThroughput", 15928.0, minimum=0.0)
        if max_penalty_ms > 0 and peak_prefill_tps == 0 and not predictor:
            raise ConfigError("peakPrefillThroughput must be > 0 when ttftSource is prefillThroughput")
        return cls(
            name,
            affinity_threshold=threshold,
            exploration_probability=exploration,
            max_ttft_penalty_ms=max_penalty_ms,
            peak_prefill_throughput=peak_prefill_tps,
            prefix_producer=params.get_str("prefixMatchInfoProducerName", "") or DEFAULT_PREFIX_PRODUCER,
            inflight_producer=params.get_str("inFlightLoadProducerName", "") or DEFAULT_INFLIGHT_PRODUCER,
            latency_predictor=predictor,
            latency_producer=params.get_str("latencyPredictionInfoProducerName", "")
            or DEFAULT_LATENCY_PRODUCER,
        )

    def consumes(self) -> tuple[DataKey[Any], ...]:
        if self.max_penalty_ms > 0:
            return (self._prefix_key, self._latency_key if self.latency_predictor else self._load_key)
        return (self._prefix_key,)

    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        if len(endpoints) <= 1 or self.threshold <= 0:
            return endpoints
        if self.exploration and self._rng.random() < self.exploration:
            return endpoints
        match = cycle.read(self._prefix_key)
        if match is None:
            return endpoints
        threshold, total = self.threshold, match.total_blocks
        if not total:
            return endpoints  # every ratio is 0, below any threshold
        # Only a matched endpoint can reach the (positive) threshold: look those few up, in the
        # candidates' order, rather than asking every candidate for its ratio.
        position = endpoint_positions(endpoints)
        rows = sorted(
            i
            for key, blocks in match.matched.items()
            if blocks / total >= threshold and (i := position(key)) is not None
        )
        if not rows:
            return endpoints
        sticky = [endpoints[i] for i in rows]
        if self.max_penalty_ms > 0 and len(sticky) < len(endpoints) and self.latency_predictor:
            predictions = cycle.read(self._latency_key)
            if predictions is not None:
                chosen = {id(ep) for ep in sticky}
                best_sticky, best_other = math.inf, math.inf
                for ep in endpoints:
                    p = predictions.get(ep)
                    ttft = p.ttft_ms if p is not None else math.inf
                    if id(ep) in chosen:
                        best_sticky = min(best_sticky, ttft)
                    else:
                        best_other = min(best_other, ttft)
                # inf - inf (no predictions) is nan, and nan > x is False: stick.
                if best_sticky - best_other > self.max_penalty_ms:
                    return endpoints
        elif self.max_penalty_ms > 0 and len(sticky) < len(endpoints):
            load = cycle.read(self._load_key)
            if load is not None:
                chosen = {id(ep) for ep in sticky}
                per_token_ms = 1000.0 / self.peak_prefill_tps
                best_sticky = min(load.tokens(ep) for ep in sticky) * per_token_ms
                best_other = min(load.tokens(ep) for ep in endpoints if id(ep) not in chosen) * per_token_ms
                if best_sticky - best_other > self.max_penalty_ms:
                    return endpoints
        return sticky
