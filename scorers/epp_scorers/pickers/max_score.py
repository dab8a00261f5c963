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

import numpy as np

from epp.framework import CycleState, Endpoint, Scores
from epp_scorers.pickers.base import BasePicker


class MaxScorePicker(BasePicker):
    """Highest total score wins; ties are broken at random so equal endpoints share load."""

    type_name = "max-score-picker"
    array_scores = True  # the profile's totals as computed: a numpy array at many endpoints

    def pick(self, cycle: CycleState, endpoints: Sequence[Endpoint], scores: Scores) -> list[Endpoint]:
        if not endpoints:
            return []
        if isinstance(scores, np.ndarray):
            return self._pick_array(endpoints, scores)
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

    def _pick_array(self, endpoints: Sequence[Endpoint], scores: np.ndarray) -> list[Endpoint]:
        """The same choice, and the same draws from the random source, on a numpy array."""
        if self.max_endpoints == 1:
            best = int(scores.argmax())
            ties = scores == scores[best]
            if np.count_nonzero(ties) == 1:  # the usual case
                return [endpoints[best]]
            return [endpoints[self._rng.choice(np.flatnonzero(ties).tolist())]]
        order = list(range(len(endpoints)))
        self._rng.shuffle(order)
        ranked = np.asarray(order)[np.argsort(-scores[order], kind="stable")]
        return [endpoints[i] for i in ranked[: self.max_endpoints].tolist()]
