"""Pickers: turn per-candidate total scores into the chosen endpoints (primary first)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

from epp.framework import CycleState, Endpoint, Params


def _max_endpoints(params: Params | None) -> int:
    return (params or Params(None)).get_int("maxNumOfEndpoints", 1, 1)


class MaxScorePicker:
    """Highest total score wins; ties are broken at random so equal endpoints share load."""

    type_name: ClassVar[str] = "max-score-picker"

    def __init__(self, name: str = type_name, params: Params | None = None, rng: random.Random | None = None):
        self.name = name
        self.max_endpoints = _max_endpoints(params)
        self._rng = rng or random.Random()

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


class RandomPicker:
    """Uniformly random, ignoring scores."""

    type_name: ClassVar[str] = "random-picker"

    def __init__(self, name: str = type_name, params: Params | None = None, rng: random.Random | None = None):
        self.name = name
        self.max_endpoints = _max_endpoints(params)
        self._rng = rng or random.Random()

    def pick(
        self, cycle: CycleState, endpoints: Sequence[Endpoint], scores: Sequence[float]
    ) -> list[Endpoint]:
        return self._rng.sample(list(endpoints), min(self.max_endpoints, len(endpoints)))


class WeightedRandomPicker:
    """Random with probability proportional to score (uniform when every score is 0)."""

    type_name: ClassVar[str] = "weighted-random-picker"

    def __init__(self, name: str = type_name, params: Params | None = None, rng: random.Random | None = None):
        self.name = name
        self.max_endpoints = _max_endpoints(params)
        self._rng = rng or random.Random()

    def pick(
        self, cycle: CycleState, endpoints: Sequence[Endpoint], scores: Sequence[float]
    ) -> list[Endpoint]:
        pool = list(range(len(endpoints)))
        weights = [max(0.0, s) for s in scores]
        chosen: list[Endpoint] = []
        while pool and len(chosen) < self.max_endpoints:
            w = [weights[i] for i in pool]
            if sum(w) <= 0:
                i = self._rng.choice(pool)
            else:
                i = self._rng.choices(pool, weights=w, k=1)[0]
            chosen.append(endpoints[i])
            pool.remove(i)
        return chosen


ALL_PICKERS = (MaxScorePicker, RandomPicker, WeightedRandomPicker)
