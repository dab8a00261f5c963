"""`slo-deadline-ordering-policy`: a flow's requests by the deadline their TTFT SLO sets.

A request's deadline is its arrival at flow control plus `x-llm-d-slo-ttft-ms` (the deprecated
`x-slo-ttft-ms` is read too), a whole number of milliseconds. Earliest deadline first; ties in
arrival order. A request without the header, or with a value that is not a non-negative integer,
goes after every request that has one (in arrival order among themselves).

    flowControl:
      priorityBands:
      - priority: 100
        orderingPolicyRef: slo-deadline-ordering-policy
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from epp.framework import FlowItem, OrderingPolicy

# llm-d-router's header for a request's time-to-first-token objective, then its deprecated alias.
SLO_TTFT_HEADERS = ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")
_MILLIS = re.compile(r"[+-]?[0-9]+")
# Go bounds the value so that it converts to a time.Duration (int64 nanoseconds) without overflow.
_MAX_MS = (2**63 - 1) // 1_000_000


def slo_ttft_s(headers: Mapping[str, str]) -> float | None:
    """The request's TTFT SLO in seconds; None when it has none or the value is invalid."""
    for name in SLO_TTFT_HEADERS:
        value = headers.get(name)
        if value is not None:  # the first header present decides, even empty (as in Go)
            text = value.strip()
            if len(text) > 19 or not _MILLIS.fullmatch(text):  # (int() refuses past 4,300 digits)
                return None
            ms = int(text)
            return ms / 1000.0 if 0 <= ms <= _MAX_MS else None
    return None


class SloDeadlineOrderingPolicy(OrderingPolicy):
    """Earliest SLO deadline first: a request's deadline is its arrival plus its
    `x-llm-d-slo-ttft-ms` header (or the deprecated `x-slo-ttft-ms`), in whole milliseconds;
    arrival order on ties; requests without a valid value go after all that have one."""

    type_name = "slo-deadline-ordering-policy"

    def key(self, item: FlowItem) -> tuple[float, ...]:
        slo = slo_ttft_s(item.headers)
        deadline = float("inf") if slo is None else item.enqueued + slo
        return (deadline, item.enqueued, item.seq)
