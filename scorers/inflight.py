"""`inflight-load-producer`: epp's own count of requests and tokens in flight per endpoint.

Fresher than scraped metrics: a request counts from the moment epp routes it (pre_request) until
its response completes or its stream goes away (response_complete), so a burst of requests sees
its own earlier picks. The primary endpoint of every profile that ran is charged (for P/D, the
prefill and the decode pod).

Tokens charged for a request on an endpoint: the input tokens that endpoint would have to prefill
(input tokens minus the prefix blocks it is believed to hold, when a prefix producer ran; else all
input tokens, estimated at 4 characters a token), plus, with `addEstimatedOutputTokens`, an output
estimate of round(input x `outputRatio`) capped by the request's max_tokens and by
`maxEstimatedOutputTokens`.

The loader adds this producer (default parameters) when `active-request-scorer`,
`token-load-scorer` or `prefix-cache-affinity-filter` need it and the config does not declare it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import ClassVar

from epp.framework import (
    DEFAULT_PREFIX_PRODUCER,
    INFLIGHT_LOAD_DATA,
    PREFIX_MATCH_DATA,
    CycleState,
    Endpoint,
    InferenceRequest,
    Params,
    PrefixMatch,
    SchedulingResult,
    data_key,
)

DEFAULT_OUTPUT_RATIO = 1.5


class _RequestLoad:
    """The InFlightLoad view one request sees: the producer's counters, and what this request
    would add on each endpoint."""

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
        return self._producer.requests_in_flight.get(endpoint.key, 0)

    def tokens(self, endpoint: Endpoint) -> int:
        return self._producer.tokens_in_flight.get(endpoint.key, 0)

    def request_tokens(self, endpoint: Endpoint) -> int:
        """Tokens this request would add to `endpoint`."""
        p = self._producer
        if not self._matched_read:
            self._match = self._cycle.read(p.prefix_key)
            self._matched_read = self._match is not None
        match = self._match
        tokens = self._input_tokens if match is None else match.uncached_tokens(endpoint, self._input_tokens)
        if p.add_output_estimate:
            if self._output_tokens is None:
                self._output_tokens = p.output_estimate(self._input_tokens, self._request)
            tokens += self._output_tokens
        return tokens


class InFlightLoadProducer:
    type_name: ClassVar[str] = "inflight-load-producer"

    def __init__(self, name: str = type_name, params: Params | None = None) -> None:
        params = params or Params(None, name)
        self.name = name
        self.add_output_estimate = params.get_bool("addEstimatedOutputTokens", False)
        self.output_ratio = params.get_float("outputRatio", DEFAULT_OUTPUT_RATIO, minimum=0.0)
        self.max_output_estimate: int | None = (
            params.get_int("maxEstimatedOutputTokens", 0, minimum=0)
            if "maxEstimatedOutputTokens" in params
            else None
        )
        producer = params.get_str("prefixMatchInfoProducerName", "") or DEFAULT_PREFIX_PRODUCER
        self.prefix_key = data_key(PREFIX_MATCH_DATA, producer)
        params.unimplemented("syncCrossReplicaState", reason="epp runs as one replica")
        self.key = data_key(INFLIGHT_LOAD_DATA, name)
        self.requests_in_flight: dict[str, int] = {}  # endpoint key -> requests
        self.tokens_in_flight: dict[str, int] = {}  # endpoint key -> tokens
        self._charged: dict[int, list[tuple[str, int]]] = {}  # id(request) -> [(endpoint key, tokens)]

    def produces(self) -> Collection[str]:
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
        view: _RequestLoad | None = cycle.read(self.key)
        if view is None:
            view = _RequestLoad(self, cycle, request)
        charges = []
        for profile in result.profiles.values():
            if not profile.endpoints:
                continue
            ep = profile.endpoints[0]
            tokens = view.request_tokens(ep)
            self.requests_in_flight[ep.key] = self.requests_in_flight.get(ep.key, 0) + 1
            self.tokens_in_flight[ep.key] = self.tokens_in_flight.get(ep.key, 0) + tokens
            charges.append((ep.key, tokens))
        if charges:
            self._charged[id(request)] = charges

    def response_complete(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        for key, tokens in self._charged.pop(id(request), ()):
            if key in self.requests_in_flight:
                self.requests_in_flight[key] = max(0, self.requests_in_flight[key] - 1)
                self.tokens_in_flight[key] = max(0, self.tokens_in_flight[key] - tokens)

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        self.requests_in_flight.pop(endpoint.key, None)
        self.tokens_in_flight.pop(endpoint.key, None)
