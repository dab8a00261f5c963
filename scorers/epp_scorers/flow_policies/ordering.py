"""Ordering policies: which queued request of one flow is served first.

- `fcfs-ordering-policy` (the default): by arrival at flow control.
- `edf-ordering-policy`: earliest deadline (arrival + TTL) first, arrival order on ties;
  requests without a TTL come after every request that has one.

    flowControl:
      priorityBands:
      - priority: 100
        orderingPolicyRef: edf-ordering-policy
"""

from __future__ import annotations

from epp.framework import FlowItem, OrderingPolicy


class FcfsOrderingPolicy(OrderingPolicy):
    """First come, first served: the request that reached flow control first goes first. The Go
    EPP's default ordering policy."""

    type_name = "fcfs-ordering-policy"

    def key(self, item: FlowItem) -> tuple[float, ...]:
        return (item.enqueued, item.seq)


class EdfOrderingPolicy(OrderingPolicy):
    """Earliest deadline first: the request whose TTL runs out soonest goes first (arrival order
    on ties); requests without a TTL go after all the others."""

    type_name = "edf-ordering-policy"

    def key(self, item: FlowItem) -> tuple[float, ...]:
        return (item.deadline, item.enqueued, item.seq)
