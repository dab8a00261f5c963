"""A scheduling profile: filters in order, then weighted scorers, then a picker."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np

from epp.framework import (
    SMALL_POOL_SIZE,
    CycleState,
    Endpoint,
    Filter,
    InferenceRequest,
    Picker,
    Plugin,
    ProfileResult,
    Scorer,
    Scores,
)

log = logging.getLogger("epp.scheduling.decisions")

# Above this many candidates, or when a scorer returned an array (the in-tree scorers do above
# it), weighting runs in numpy: measured 2.5x faster at 100 endpoints (39 us vs 97 us for 3
# scorers of lists), while below ~16 numpy's call overhead makes it slower.
_VECTORISE_FROM = SMALL_POOL_SIZE


class PluginSeries(Protocol):
    """Where one plugin's durations at one extension point go (a histogram series)."""

    def observe(self, amount: float) -> None: ...


# (extension point, plugin type, plugin name) -> that plugin's series of the plugin-duration
# histogram; resolved once per plugin and point when the scheduler is built, not per request.
PluginTimer = Callable[[str, str, str], PluginSeries]


class _Untimed:
    __slots__ = ()

    def observe(self, amount: float) -> None:
        pass


UNTIMED: PluginSeries = _Untimed()


def series_of(timer: PluginTimer | None, point: str, plugin: Plugin) -> PluginSeries:
    """The series `plugin`'s durations at `point` go to (nowhere without a timer)."""
    return timer(point, plugin.type_name, plugin.name) if timer is not None else UNTIMED


@dataclass(slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


class SchedulerProfile:
    def __init__(
        self,
        name: str,
        filters: Sequence[Filter],
        scorers: Sequence[WeightedScorer],
        picker: Picker,
        timer: PluginTimer | None = None,
    ) -> None:
        self.name = name
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.picker = picker
        self._weights = np.array([s.weight for s in self.scorers], dtype=np.float64)
        self._timed_filters = [(f, series_of(timer, "Filter", f)) for f in self.filters]
        self._timed_scorers = [(s.scorer, series_of(timer, "Scorer", s.scorer)) for s in self.scorers]
        self._picker_series = series_of(timer, "Picker", picker)

    def _weighted_totals(self, all_scores: list[Scores], n: int) -> Scores:
        """sum over scorers of weight x clamp(score, 0, 1), a numpy array when computed in numpy.
        Clamping keeps a scorer that strays outside [0, 1] from outweighing the others."""
        if not all_scores:
            return [0.0] * n
        if n > _VECTORISE_FROM or not all(type(scores) is list for scores in all_scores):
            # Row by row: numpy converts a flat list about twice as fast as a list of lists (and
            # copies an array row at memory speed).
            matrix = np.empty((len(all_scores), n), dtype=np.float64)
            for row, scores in enumerate(all_scores):
                matrix[row] = scores
            # Two ufuncs rather than np.clip, whose Python wrappers cost more than the work here.
            np.maximum(matrix, 0.0, out=matrix)
            np.minimum(matrix, 1.0, out=matrix)
            in_numpy: Scores = self._weights @ matrix
            return in_numpy
        totals = [0.0] * n
        for scores, weighted in zip(all_scores, self.scorers, strict=True):
            w = weighted.weight
            totals = [
                t + w * (0.0 if s < 0.0 else 1.0 if s > 1.0 else s)
                for t, s in zip(totals, scores, strict=True)
            ]
        return totals

    def run(
        self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]
    ) -> ProfileResult | None:
        """The chosen endpoints and the scores behind them, or None when the filters left no
        candidate."""
        for flt, series in self._timed_filters:
            started = time.perf_counter()
            candidates = flt.filter(cycle, request, candidates)
            if not isinstance(candidates, tuple):
                # A tuple cannot change under the scorers, so what they derive from it (its rows in
                # the metric columns, its positions) is found once (epp.framework.columns).
                candidates = tuple(candidates)
            series.observe(time.perf_counter() - started)
            if not candidates:
                return None
        if not candidates:  # no filters and nothing to choose from
            return None
        n = len(candidates)
        per_scorer: dict[str, Scores] = {}
        all_scores: list[Scores] = []
        for scorer, series in self._timed_scorers:
            started = time.perf_counter()
            scores = scorer.score(cycle, request, candidates)
            series.observe(time.perf_counter() - started)
            if len(scores) != n:
                raise RuntimeError(f"scorer {scorer.name} returned {len(scores)} scores for {n} endpoints")
            all_scores.append(scores)
            per_scorer[scorer.name] = scores
        totals = self._weighted_totals(all_scores, n)
        started = time.perf_counter()
        picker = self.picker
        if isinstance(totals, np.ndarray) and not picker.array_scores:
            chosen = picker.pick(cycle, candidates, totals.tolist())  # a picker written for lists
        else:
            chosen = picker.pick(cycle, candidates, cast("Sequence[float]", totals))
        self._picker_series.observe(time.perf_counter() - started)
        result = ProfileResult(self.name, chosen, candidates, totals, per_scorer)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %s profile %s: %s", request.request_id, self.name, describe(result))
        return result


def describe(result: ProfileResult) -> dict[str, object]:
    """A profile's decision as the debug log prints it: per candidate the total and each scorer's
    raw score, and the endpoints chosen."""
    return {
        "scores": {
            ep.key: {
                "total": round(float(result.totals[i]), 4),
                **{name: round(float(scores[i]), 4) for name, scores in result.scorer_scores.items()},
            }
            for i, ep in enumerate(result.candidates)
        },
        "picked": [ep.key for ep in result.endpoints],
    }
