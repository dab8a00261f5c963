"""Fairness policies: which flow (fairness id) of a priority band is served next.

- `global-strict-fairness-policy` (the default): the flow whose head request the ordering
  policy ranks first, as if the band were one queue (no isolation between tenants).
- `round-robin-fairness-policy`: flows take turns, in sorted order of their ids, skipping
  empty ones: a busy tenant cannot starve a quiet one.

    flowControl:
      priorityBands:
      - priority: 0
        fairnessPolicyRef: round-robin-fairness-policy
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping

from epp.framework import FairnessPolicy


class GlobalStrictFairnessPolicy(FairnessPolicy):
    """No fairness: serves the flow whose head request the band's ordering policy ranks first
    across all flows (one logical queue). The Go EPP's default fairness policy."""

    type_name = "global-strict-fairness-policy"

    def pick(self, heads: Mapping[str, tuple[float, ...]], last: str | None) -> str:
        return min(heads, key=heads.__getitem__)


class RoundRobinFairnessPolicy(FairnessPolicy):
    """Flows with queued requests take turns, in sorted order of their fairness ids: the next one
    after the flow served last, wrapping around."""

    type_name = "round-robin-fairness-policy"

    def pick(self, heads: Mapping[str, tuple[float, ...]], last: str | None) -> str:
        flows = sorted(heads)
        if last is None:
            return flows[0]
        i = bisect.bisect_right(flows, last)
        return flows[i] if i < len(flows) else flows[0]
