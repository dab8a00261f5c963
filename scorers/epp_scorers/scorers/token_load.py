"""`token-load-scorer`: prefer endpoints with fewer tokens in flight, counting this request.

With t the endpoint's in-flight tokens (the in-flight ledger's `Endpoint.inflight_tokens`) plus
the tokens this request would add there (its uncached input, see `inflight-load-producer`) and
T = `queueThresholdTokens` (default 4,194,304 = 128 requests of 32K tokens):

    score = 1 - min(t, T) / T        (t <= 0 -> 1)

A finer signal than request counts: a 100K-token prompt weighs what it costs to prefill. A
threshold below 1 falls back to the default, as in the Go EPP. Without the producer's view in the
cycle, t is the request's estimated input tokens.

Consumes: `inflight-load` (an `InFlightLoad` view; the loader adds `inflight-load-producer`
when no configured plugin produces it), the in-flight ledger. Produces: nothing.
Parameters: `queueThresholdTokens` (int, default 4194304), `inFlightLoadProducerName` (string,
default `inflight-load-producer`).

    plugins:
    - type: token-load-scorer
      parameters:
        queueThresholdTokens: 1048576
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
from epp_scorers.data import DEFAULT_INFLIGHT_PRODUCER, INFLIGHT_LOAD

DEFAULT_QUEUE_THRESHOLD_TOKENS = 4_194_304


class TokenLoadScorer(Scorer):
    """Prefers endpoints with fewer tokens in flight, counting the tokens this request would add:
    1 - min(t, T) / T with T = `queueThresholdTokens`."""

    type_name = "token-load-scorer"
    parameters = (
        ParamDoc(
            "queueThresholdTokens",
            "int",
            str(DEFAULT_QUEUE_THRESHOLD_TOKENS),
            "Tokens in flight at which an endpoint scores 0; below 1 falls back to the default.",
        ),
        ParamDoc(
            "inFlightLoadProducerName",
            "string",
            DEFAULT_INFLIGHT_PRODUCER,
            "Name of the plugin that publishes the in-flight load view.",
        ),
    )

    def __init__(
        self,
        name: str = "",
        *,
        queue_threshold_tokens: int = DEFAULT_QUEUE_THRESHOLD_TOKENS,
        inflight_producer: str = DEFAULT_INFLIGHT_PRODUCER,
    ) -> None:
        super().__init__(name)
        threshold = queue_threshold_tokens if queue_threshold_tokens > 0 else DEFAULT_QUEUE_THRESHOLD_TOKENS
        self.threshold = float(threshold)
        self._load_key = INFLIGHT_LOAD.for_producer(inflight_producer or DEFAULT_INFLIGHT_PRODUCER)

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        threshold = params.get_int("queueThresholdTokens", DEFAULT_QUEUE_THRESHOLD_TOKENS)
        if threshold <= 0:
            params.warn(
                f"queueThresholdTokens {threshold} is not positive; using {DEFAULT_QUEUE_THRESHOLD_TOKENS}"
            )
            threshold = DEFAULT_QUEUE_THRESHOLD_TOKENS
        producer = params.get_str("inFlightLoadProducerName", "") or DEFAULT_INFLIGHT_PRODUCER
        return cls(name, queue_threshold_tokens=threshold, inflight_producer=producer)

    def consumes(self) -> Collection[DataKey[Any]]:
        return (self._load_key,)

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Scores:
        load = cycle.read(self._load_key)
        t_max = self.threshold
        n = len(endpoints)
        if load is None:
            tokens = float(request.input_tokens_estimate)
            return [1.0 if tokens <= 0 else 1.0 - min(tokens, t_max) / t_max] * n
        adding = load.request_tokens_each(endpoints)
        if n <= SMALL_POOL_SIZE:
            out = []
            for ep, more in zip(endpoints, adding, strict=True):
                tokens = float(ep.inflight_tokens + more)
                out.append(1.0 if tokens <= 0 else 1.0 - min(tokens, t_max) / t_max)
            return out
        # The same IEEE operations on arrays: the same floats as the loop above.
        held = np.fromiter((ep.inflight_tokens for ep in endpoints), np.float64, n)
        t = held + np.array(adding, dtype=np.float64)
        scores: Column = np.where(t <= 0, 1.0, 1.0 - np.minimum(t, t_max) / t_max)
        return scores
