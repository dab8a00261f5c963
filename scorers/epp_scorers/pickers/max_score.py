"""`max-score-picker`: the highest total score wins.

Ties are broken at random so that equal endpoints share the load. With `maxNumOfEndpoints` > 1
the endpoints come best first (random order among equal scores); the extra ones are fallbacks
that Envoy tries on retry.

Consumes: the candidates' total scores. Produces: the chosen endpoints.
Parameters: `maxNumOfEndpoints` (int, default 1; below 1 falls back to 1).

    plugins:
    - type: max-score-picker
      parameters:
        maxNumOfEndpoints: 1
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.framework import CycleState, Endpoint
from epp_scorers.pickers.base import BasePicker


class MaxScorePicker(BasePicker):
    """Highest total score wins; ties are broken at random so equal endpoints share load."""

    type_name = "max-score-picker"

    def pick(
        self, cycle: CycleState, endpoints: Sequence[Endpoint], scores: Sequence[float]
    ) -> list[Endpoint]:
        if not endpoints:
            return []
        if self.max_endpoints == 1:
            best = max(scores)
            if scores.count(best) == 1:  # the usual case, at C speed
                return [endpoints[scores.index(best)]]
            winners = [i for i, s in enumerate(scores) if s == best]
            return [endpoints[self._rng.choice(winners)]]
        order = list(range(len(endpoints)))
        self._rng.shuffle(order)  # shuffle, then a stable sort: random order among equal scores
        order.sort(key=lambda i: scores[i], reverse=True)
        return [endpoints[i] for i in order[: self.max_endpoints]]
