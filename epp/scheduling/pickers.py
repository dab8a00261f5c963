"""Pickers: turn per-candidate total scores into the chosen endpoints (primary first).

Every picker takes `maxNumOfEndpoints` (default 1): with more than one, the extra endpoints are
fallbacks that Envoy tries on retry. As in the Go EPP, a value below 1 falls back to 1.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

from epp.framework import CycleState, Endpoint, Params

DEFAULT_MAX_NUM_OF_ENDPOINTS = 1


def _max_endpoints(params: Params | None) -> int:
    params = params or Params(None)
    value = params.get_int("maxNumOfEndpoints", DEFAULT_MAX_NUM_OF_ENDPOINTS)
    if value < 1:
        params.warn(f"maxNumOfEndpoints {value} is not positive; using {DEFAULT_MAX_NUM_OF_ENDPOINTS}")
        return DEFAULT_MAX_NUM_OF_ENDPOINTS
    return value


class _BasePicker:
    """What every picker shares: its name, maxNumOfEndpoints and a random source (seedable in tests)."""

    type_name: ClassVar[str]

    def __init__(self, name: str = "", params: Params | None = None, rng: random.Random | None = None):
        self.name = name or self.type_name
        self.max_endpoints = _max_endpoints(params)
        self._rng = rng or random.Random()


class MaxScorePicker(_BasePicker):
    """Highest total score wins; ties are broken at random so equal endpoints share load."""

    type_name: ClassVar[str] = "max-score-picker"

    def pick(
        self, cycle: CycleState, endpoints: Sequence[Endpoint], scores: Sequence[float]
    ) -> list[Endpoint]:
        if not endpoints:
            return []
        if self.max_endpoints == 1:
            best = max(scores)
            winners = [i for i, s in enumerate(scores) if s == best]
            return [endpoints[winners[0] if len(winners) == 1 else self._rng.choice(winners)]]
        order = list(range(len(endpoints)))
        self._rng.shuffle(order)  # shuffle, then a stable sort: random order among equal scores
        order.sort(key=lambda i: scores[i], reverse=True)
        return [endpoints[i] for i in order[: self.max_endpoints]]


class RandomPicker(_BasePicker):
    """Uniformly random, ignoring scores."""

    type_name: ClassVar[str] = "random-picker"

    def pick(
        self, cycle: CycleState, endpoints: Sequence[Endpoint], scores: Sequence[float]
    ) -> list[Endpoint]:
        if self.max_endpoints == 1:
            return [self._rng.choice(endpoints)] if endpoints else []
        return self._rng.sample(list(endpoints), min(self.max_endpoints, len(endpoints)))


class WeightedRandomPicker(_BasePicker):
    """Random with probability proportional to the total score, without replacement.

    This is the distribution of the Go picker's A-ES sampling (key = u^(1/score), highest keys
    win): the first pick is endpoint i with probability score_i / sum(scores), each further pick
    the same over the endpoints left. Endpoints scored 0 come only after every positive one;
    when all scores are 0 the pick is uniform.
    """

    type_name: ClassVar[str] = "weighted-random-picker"

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


ALL_PICKERS = (MaxScorePicker, RandomPicker, WeightedRandomPicker)
