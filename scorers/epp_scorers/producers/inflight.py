"""`inflight-load-producer`: epp's own count of requests and tokens in flight per endpoint, and
what this request would add.

Fresher than scraped metrics: a request counts from the moment epp routes it until its response
completes or its stream goes away, so a burst of requests sees its own earlier picks. The counts
are the core's in-flight ledger (`Endpoint.inflight_requests` / `Endpoint.inflight_tokens`): the
director charges one request to the primary endpoint of every profile that chose one (for P/D,
the prefill and the decode pod), moves the charge when a fallback serves, and releases it at the
end. This producer publishes the per-request view (`InFlightLoad`) and, after the pick, adds its
token estimate to the request's charge on each of those endpoints.

Tokens charged for a request on an endpoint: the input tokens that endpoint would have to prefill
(input tokens minus the prefix blocks it is believed to hold, when a prefix producer ran; else all
input tokens, estimated at 4 characters a token), plus, with `addEstimatedOutputTokens`, an output
estimate of round(input x `outputRatio`) capped by the request's max_tokens and by
`maxEstimatedOutputTokens`.

Consumes: the in-flight ledger; the prefix match of `prefixMatchInfoProducerName` when it ran
(optional: it does not make the loader add a prefix producer). Produces: `inflight-load` (an
`InFlightLoad`). Hooks: pre-request (adds the token estimate to the ledger). Parameters:
`addEstimatedOutputTokens` (bool, false), `outputRatio` (float >= 0, 1.5),
`maxEstimatedOutputTokens` (int >= 0, no cap), `prefixMatchInfoProducerName` (string, default
`approx-prefix-cache-producer`); `syncCrossReplicaState` is accepted and ignored (epp runs as one
replica).

The loader adds this producer (default parameters) when `token-load-scorer` or
`prefix-cache-affinity-filter` need it and the config does not declare it.

    plugins:
    - type: inflight-load-producer
      parameters:
        addEstimatedOutputTokens: true
        outputRatio: 1.0
        maxEstimatedOutputTokens: 2048
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Self

from epp.framework import (
    CycleState,
    DataKey,
    DataProducer,
    Endpoint,
    InferenceRequest,
    InFlightLedger,
    ParamDoc,
    Params,
    PluginHandle,
    PreRequest,
    SchedulingResult,
    endpoint_positions,
)
from epp_scorers.data import DEFAULT_PREFIX_PRODUCER, INFLIGHT_LOAD, PREFIX_MATCH, PrefixMatch

DEFAULT_OUTPUT_RATIO = 1.5


class _RequestLoad:
    """The InFlightLoad view one request sees: the ledger's counts on each endpoint, and what this
    request would add there."""

    __slots__ = (
        "_cycle",
        "_input_tokens",
        "_match",
        "_matched_read",
        "_output_tokens",
        "_producer",
        "_request",
    )

    def __init__(self, producer: InFlightLoadProducer, cycle: CycleState, request: InferenceRequest) -> None:
        self._producer = producer
        self._cycle = cycle
        self._request = request
        self._input_tokens = request.input_tokens_estimate
        # Per request, not per endpoint; resolved on first use (the prefix producer may run later).
        self._match: PrefixMatch | None = None
        self._matched_read = False
        self._output_tokens: int | None = None

    def requests(self, endpoint: Endpoint) -> int:
        return endpoint.inflight_requests

    def tokens(self, endpoint: Endpoint) -> int:
        return endpoint.inflight_tokens

    def request_tokens(self, endpoint: Endpoint) -> int:
        """Tokens this request would add to `endpoint`."""
        match = self._prefix_match()
        return self._tokens(match, 0 if match is None else match.matched.get(endpoint.key, 0))

    def request_tokens_each(self, endpoints: Sequence[Endpoint]) -> list[int]:
        match = self._prefix_match()
        out = [self._tokens(match, 0)] * len(endpoints)
        if match is not None and match.matched:
            position = endpoint_positions(endpoints)
            for key, blocks in match.matched.items():
                i = position(key)
                if i is not None:
                    out[i] = self._tokens(match, blocks)
        return out

    def _prefix_match(self) -> PrefixMatch | None:
        if not self._matched_read:
            self._match = self._cycle.read(self._producer.prefix_key)
            self._matched_read = self._match is not None
        return self._match

    def _tokens(self, match: PrefixMatch | None, matched_blocks: int) -> int:
        """Tokens this request would add to an endpoint holding `matched_blocks` of it."""
        p = self._producer
        tokens = (
            self._input_tokens
            if match is None
            else match.uncached_tokens_of(matched_blocks, self._input_tokens)
        )
        if p.add_output_estimate:
            if self._output_tokens is None:
                self._output_tokens = p.output_estimate(self._input_tokens, self._request)
            tokens += self._output_tokens
        return tokens


class InFlightLoadProducer(DataProducer, PreRequest):
    """Publishes epp's in-flight requests and tokens per endpoint (the in-flight ledger) and the
    tokens this request would add to each; after the pick, adds that token estimate to the
    request's charge on every profile's endpoint."""

    type_name = "inflight-load-producer"
    parameters = (
        ParamDoc(
            "addEstimatedOutputTokens",
            "bool",
            "false",
            "Also charge an output estimate: round(input tokens x outputRatio), capped.",
        ),
        ParamDoc("outputRatio", "float", str(DEFAULT_OUTPUT_RATIO), "Output tokens per input token (>= 0)."),
        ParamDoc(
            "maxEstimatedOutputTokens",
            "int",
            "",
            "Cap on the output estimate (>= 0); unset: only the request's max_tokens caps it.",
        ),
        ParamDoc(
            "prefixMatchInfoProducerName",
            "string",
            DEFAULT_PREFIX_PRODUCER,
            "Name of the plugin whose prefix match lowers the input tokens charged.",
        ),
        ParamDoc("syncCrossReplicaState", "bool", "false", "Not implemented (epp runs as one replica)."),
    )

    def __init__(
        self,
        name: str = "",
        *,
        add_estimated_output_tokens: bool = False,
        output_ratio: float = DEFAULT_OUTPUT_RATIO,
        max_estimated_output_tokens: int | None = None,
        prefix_producer: str = DEFAULT_PREFIX_PRODUCER,
        ledger: InFlightLedger | None = None,
    ) -> None:
        super().__init__(name)
        self.add_output_estimate = add_estimated_output_tokens
        self.output_ratio = output_ratio
        self.max_output_estimate = max_estimated_output_tokens
        self.prefix_key = PREFIX_MATCH.for_producer(prefix_producer or DEFAULT_PREFIX_PRODUCER)
        self.key = INFLIGHT_LOAD.for_producer(self.name)
        self.ledger = ledger if ledger is not None else InFlightLedger()

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        add_output = params.get_bool("addEstimatedOutputTokens", False)
        ratio = params.get_float("outputRatio", DEFAULT_OUTPUT_RATIO, minimum=0.0)
        max_output: int | None = (
            params.get_int("maxEstimatedOutputTokens", 0, minimum=0)
            if "maxEstimatedOutputTokens" in params
            else None
        )
        producer = params.get_str("prefixMatchInfoProducerName", "") or DEFAULT_PREFIX_PRODUCER
        params.unimplemented("syncCrossReplicaState", reason="epp runs as one replica")
        return cls(
            name,
            add_estimated_output_tokens=add_output,
            output_ratio=ratio,
            max_estimated_output_tokens=max_output,
            prefix_producer=producer,
            ledger=handle.ledger,
        )

    def produces(self) -> Collection[DataKey[Any]]:
        return (self.key,)

    def produce(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        cycle.write(self.key, _RequestLoad(self, cycle, request))

    def output_estimate(self, input_tokens: int, request: InferenceRequest) -> int:
        if input_tokens <= 0:
            return 0
        estimate = round(input_tokens * self.output_ratio)
        for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            limit = request.body.get(field)
            if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < estimate:
                estimate = limit
                break
        if self.max_output_estimate is not None:
            estimate = min(estimate, self.max_output_estimate)
        return estimate

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        view = cycle.read(self.key)
        if view is None:
            view = _RequestLoad(self, cycle, request)
        for ep in result.targets():
            self.ledger.add_tokens(request, ep, view.request_tokens(ep))
