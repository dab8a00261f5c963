"""`random-picker`: uniformly random, ignoring the scores.

With `maxNumOfEndpoints` > 1 it draws that many distinct endpoints (all of them when there are
fewer); the extra ones are fallbacks that Envoy tries on retry.

Consumes: the candidates. Produces: the chosen endpoints.
Parameters: `maxNumOfEndpoints` (int, default 1; below 1 falls back to 1).

    plugins:
    - type: random-picker
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.framework import CycleState, Endpoint
from epp_scorers.pickers.base import BasePicker


class RandomPicker(BasePicker):
    """Uniformly random, ignoring scores."""

    type_name = "random-picker"

    def pick(
        self, cycle: CycleState, endpoints: Sequence[Endpoint], scores: Sequence[float]
    ) -> list[Endpoint]:
        if self.max_endpoints == 1:
            return [self._rng.choice(endpoints)] if endpoints else []
        return self._rng.sample(list(endpoints), min(self.max_endpoints, len(endpoints)))
