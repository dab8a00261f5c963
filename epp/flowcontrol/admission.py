"""A request's admission, before it is scheduled (the Go EPP's admission controllers).

- Flow control on (feature gate `flowControl`): the request waits in the flow controller for its
  turn; the outcome becomes the answer: 429 when its band is full (`rejected-saturated`) or its
  TTL ran out while the pool has endpoints (`rejected-ttl-expired`), 503 when the pool has none
  (`rejected-no-endpoints`) or epp is stopping (`rejected-shutting-down`).
- Flow control off: a sheddable request (priority < 0) is refused at once with 429 when the
  saturation detector reads >= 1.0; other requests pass untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from epp.discovery.objectives import ObjectiveStore
from epp.errors import DROPPED_NO_ENDPOINTS, DROPPED_SATURATED, DROPPED_SHUTTING_DOWN, EppError, ErrorCode
from epp.flowcontrol.controller import FlowController, Outcome
from epp.framework.datamodel import Endpoint
from epp.framework.plugin import SaturationDetector
from epp.observability import fairness_id

DROPPED_TTL_EXPIRED = "rejected-ttl-expired"

# A fresh EppError per refusal (a raised instance keeps its traceback).
_ERRORS: dict[Outcome, tuple[ErrorCode, str, str]] = {
    Outcome.REJECTED_CAPACITY: (
        ErrorCode.RESOURCE_EXHAUSTED,
        "flow control: queue capacity reached",
        DROPPED_SATURATED,
    ),
    Outcome.REJECTED_NO_ENDPOINTS: (
        ErrorCode.SERVICE_UNAVAILABLE,
        "no endpoints available: flow control queue full",
        DROPPED_NO_ENDPOINTS,
    ),
    Outcome.EVICTED_TTL: (
        ErrorCode.RESOURCE_EXHAUSTED,
        "request timed out in queue: TTL expired",
        DROPPED_TTL_EXPIRED,
    ),
    Outcome.EVICTED_NO_ENDPOINTS: (
        ErrorCode.SERVICE_UNAVAILABLE,
        "request timed out in queue and no endpoints are available",
        DROPPED_NO_ENDPOINTS,
    ),
    Outcome.REJECTED_OTHER: (
        ErrorCode.SERVICE_UNAVAILABLE,
        "flow controller shutting down",
        DROPPED_SHUTTING_DOWN,
    ),
    Outcome.EVICTED_OTHER: (
        ErrorCode.SERVICE_UNAVAILABLE,
        "flow controller shutting down",
        DROPPED_SHUTTING_DOWN,
    ),
}


class Admission:
    def __init__(
        self,
        objectives: ObjectiveStore,
        detector: SaturationDetector | None,
        controller: FlowController | None,
        candidates: Callable[[], Sequence[Endpoint]],
    ) -> None:
        self.objectives = objectives
        self.detector = detector
        self.controller = controller
        self._candidates = candidates
        # Whether any request may be held or refused (else the request path skips admission);
        # kept current as objectives change, told to each of `listeners`.
        self.active = False
        self.listeners: list[Callable[[bool], None]] = []
        objectives.listeners.append(self._refresh)
        self._refresh()

    def _refresh(self) -> None:
        self.active = self.controller is not None or (
            self.detector is not None and self.objectives.has_negative
        )
        for listener in self.listeners:
            listener(self.active)

    async def admit(self, headers: Mapping[str, str], byte_size: int, request_id: str) -> int:
        """The request's priority once it may go on; raises EppError when it may not."""
        priority = self.objectives.priority(headers)
        controller = self.controller
        if controller is None:
            if (
                priority < 0
                and self.detector is not None
                and self.detector.saturation(self._candidates()) >= 1.0
            ):
                raise EppError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    "system saturated, sheddable request dropped",
                    DROPPED_SATURATED,
                )
            return priority
        outcome = await controller.enqueue_and_wait(
            request_id, fairness_id(headers), priority, byte_size, headers
        )
        if outcome is Outcome.DISPATCHED:
            return priority
        raise EppError(*_ERRORS[outcome])
