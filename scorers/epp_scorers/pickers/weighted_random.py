"""`weighted-random-picker`: random with probability proportional to the total score, without
replacement.

This is the distribution of the Go picker's A-ES sampling (key = u^(1/score), highest keys win):
the first pick is endpoint i with probability score_i / sum(scores), each further pick the same
over the endpoints left. Negative totals weigh 0; endpoints weighing 0 come only after every
positive one; when all weigh 0 the pick is uniform.

Consumes: the candidates' total scores. Produces: the chosen endpoints.
Parameters: `maxNumOfEndpoints` (int, default 1; below 1 falls back to 1).

    plugins:
    - type: weighted-random-picker
      parameters:
        maxNumOfEndpoints: 3
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.framework import CycleState, Endpoint
from epp_scorers.pickers.base import BasePicker


class WeightedRandomPicker(BasePicker):
    """Random with probability proportional to the total score, without replacement.

    This is the distribution of the Go picker's A-ES sampling (key = u^(1/score), highest keys
    win): the first pick is endpoint i with probability score_i / sum(scores), each further pick
    the same over the endpoints left. Endpoints scored 0 come only after every positive one;
    when all scores are 0 the pick is uniform.
    """

    type_name = "weighted-random-picker"

    def _draw(self, pool: list[int], weights: Sequence[float]) -> int:
        """Index into `pool` of one draw proportional to weight (uniform when all are 0)."""
        total = 0.0
        for i in pool:
            total += weights[i]
        if total <= 0.0:
            return self._rng.randrange(len(pool))
        target = self._rng.random() * total
        last_positive = 0
        for j, i in enumerate(pool):
            w = weights[i]
            if w > 0.0:
                last_positive = j
                target -= w
                if target < 0.0:
                    return j
        return last_positive  # floating-point remainder: the last positive weight

    def pick(
        self, cycle: CycleState, endpoints: Sequence[Endpoint], scores: Sequence[float]
    ) -> list[Endpoint]:
        weights = [s if s > 0.0 else 0.0 for s in scores]
        pool = list(range(len(endpoints)))
        chosen: list[Endpoint] = []
        while pool and len(chosen) < self.max_endpoints:
            chosen.append(endpoints[pool.pop(self._draw(pool, weights))])
        return chosen
