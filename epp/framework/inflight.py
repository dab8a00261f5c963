"""The in-flight ledger: epp's one record of what it has routed and not yet seen finish.

The director charges one request to the primary endpoint of every profile that chose one (for
P/D, the decode and the prefill pod) when it routes a request, moves the charge when Envoy
reports that a fallback endpoint served it, and releases it when the response ends or the stream
goes away. A producer may add a token estimate to a charge (`add_tokens`). Every scorer reads the
result on the endpoint itself: `Endpoint.inflight_requests` and `Endpoint.inflight_tokens`.
"""

from __future__ import annotations

from collections.abc import Iterable

from epp.framework.datamodel import Endpoint, InferenceRequest


class _Charge:
    __slots__ = ("endpoint", "tokens")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.tokens = 0


class InFlightLedger:
    """Charges per open request (by request object), reflected on each endpoint's counters.
    Bounded by the requests in flight: every charge is released when its stream ends."""

    __slots__ = ("_charges", "_requests")

    def __init__(self) -> None:
        self._charges: dict[int, list[_Charge]] = {}
        # The charged requests themselves: holding them keeps an id from being reused while its
        # charges are open.
        self._requests: dict[int, InferenceRequest] = {}

    def __len__(self) -> int:
        """Requests currently charged."""
        return len(self._charges)

    def charge(self, request: InferenceRequest, endpoints: Iterable[Endpoint]) -> None:
        """One request in flight on each of `endpoints` (charging the same request twice adds)."""
        charges = self._charges.setdefault(id(request), [])
        self._requests[id(request)] = request
        for ep in endpoints:
            ep.inflight_requests += 1
            charges.append(_Charge(ep))

    def add_tokens(self, request: InferenceRequest, endpoint: Endpoint, tokens: int) -> None:
        """Add a token estimate to this request's charge on `endpoint` (ignored if not charged)."""
        for c in self._charges.get(id(request), ()):
            if c.endpoint is endpoint:
                c.tokens += tokens
                endpoint.inflight_tokens += tokens
                return

    def charged(self, request: InferenceRequest) -> list[Endpoint]:
        return [c.endpoint for c in self._charges.get(id(request), ())]

    def move(self, request: InferenceRequest, planned: Endpoint, served: Endpoint) -> bool:
        """A fallback served: move the charge (request and tokens) from `planned` to `served`.
        False when `planned` carried no charge of this request."""
        for c in self._charges.get(id(request), ()):
            if c.endpoint is planned:
                planned.inflight_requests = max(0, planned.inflight_requests - 1)
                planned.inflight_tokens = max(0, planned.inflight_tokens - c.tokens)
                served.inflight_requests += 1
                served.inflight_tokens += c.tokens
                c.endpoint = served
                return True
        return False

    def release(self, request: InferenceRequest) -> None:
        """The request ended: drop all its charges. Idempotent."""
        self._requests.pop(id(request), None)
        for c in self._charges.pop(id(request), ()):
            ep = c.endpoint
            ep.inflight_requests = max(0, ep.inflight_requests - 1)
            ep.inflight_tokens = max(0, ep.inflight_tokens - c.tokens)
