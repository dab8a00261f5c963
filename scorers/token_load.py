"""`token-load-scorer`: prefer endpoints with fewer tokens in flight, counting this request.

With t the endpoint's in-flight tokens plus the tokens this request would add there (its uncached
input, see `inflight-load-producer`) and T = `queueThresholdTokens` (default 4,194,304 = 128
requests of 32K tokens):

    score = 1 - min(t, T) / T        (t <= 0 -> 1)

A finer signal than request counts: a 100K-token prompt weighs what it costs to prefill. A
threshold below 1 falls back to the default, as in the Go EPP.
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

DEFAULT_QUEUE_THRESHOLD_TOKENS = 4_194_304


class TokenLoadScorer:
    type_name: ClassVar[str] = "token-load-scorer"

    def __init__(self, name: str = type_name, params: Params | None = None) -> None:
        params = params or Params(None, name)
        self.name = name
        threshold = params.get_int("queueThresholdTokens", DEFAULT_QUEUE_THRESHOLD_TOKENS)
        if threshold <= 0:
            params.warn(
                f"queueThresholdTokens {threshold} is not positive; using {DEFAULT_QUEUE_THRESHOLD_TOKENS}"
            )
            threshold = DEFAULT_QUEUE_THRESHOLD_TOKENS
        self.threshold = float(threshold)
        producer = params.get_str("inFlightLoadProducerName", "") or DEFAULT_INFLIGHT_PRODUCER
        self._load_key = data_key(INFLIGHT_LOAD_DATA, producer)

    def consumes(self) -> Collection[str]:
        return (self._load_key,)

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        load: InFlightLoad | None = cycle.read(self._load_key)
        t_max = self.threshold
        out = []
        for ep in endpoints:
            if load is None:
                tokens = float(request.input_tokens_estimate)
            else:
                tokens = float(load.tokens(ep) + load.request_tokens(ep))
            out.append(1.0 if tokens <= 0 else 1.0 - min(tokens, t_max) / t_max)
        return out
