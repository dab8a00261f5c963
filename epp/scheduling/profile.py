"""A scheduling profile: filters in order, then weighted scorers, then a picker."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from epp.framework import CycleState, Endpoint, Filter, InferenceRequest, Picker, ProfileResult, Scorer

log = logging.getLogger("epp.scheduling.decisions")

# (extension point, plugin type, plugin name, seconds) -> None; feeds the plugin-duration histogram.
PluginTimer = Callable[[str, str, str, float], None]


def plugin_type(plugin: Any) -> str:
    return str(getattr(plugin, "type_name", type(plugin).__name__))


def plugin_name(plugin: Any) -> str:
    return str(getattr(plugin, "name", plugin_type(plugin)))


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
        self._timer = timer
        # Resolved once: the metric labels of every plugin.
        self._labels = {
            id(p): (plugin_type(p), plugin_name(p)) for p in [*filters, *[s.scorer for s in scorers], picker]
        }

    def _observe(self, point: str, plugin: object, started: float) -> None:
        if self._timer is not None:
            kind, name = self._labels[id(plugin)]
            self._timer(point, kind, name, time.perf_counter() - started)

    def run(
        self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]
    ) -> ProfileResult | None:
        """The chosen endpoints, or None when the filters left no candidate."""
        for flt in self.filters:
            started = time.perf_counter()
            candidates = flt.filter(cycle, request, candidates)
            self._observe("Filter", flt, started)
            if not candidates:
                return None
        if not candidates:
            return None
        n = len(candidates)
        totals = [0.0] * n
        debug = log.isEnabledFor(logging.DEBUG)
        per_scorer: dict[str, Sequence[float]] = {}
        for weighted in self.scorers:
            started = time.perf_counter()
            scores = weighted.scorer.score(cycle, request, candidates)
            self._observe("Scorer", weighted.scorer, started)
            if len(scores) != n:
                raise RuntimeError(
                    f"scorer {plugin_name(weighted.scorer)} returned {len(scores)} scores for {n} endpoints"
                )
            w = weighted.weight
            for i, s in enumerate(scores):
                # Clamp: a scorer outside [0, 1] must not outweigh the others.
                totals[i] += w * (0.0 if s < 0.0 else 1.0 if s > 1.0 else s)
            if debug:
                per_scorer[plugin_name(weighted.scorer)] = scores
        started = time.perf_counter()
        chosen = self.picker.pick(cycle, candidates, totals)
        self._observe("Picker", self.picker, started)
        if debug:
            log.debug(
                "request %s profile %s: %s -> %s",
                request.request_id,
                self.name,
                {
                    ep.key: {
                        "total": round(totals[i], 4),
                        **{k: round(v[i], 4) for k, v in per_scorer.items()},
                    }
                    for i, ep in enumerate(candidates)
                },
                [ep.key for ep in chosen],
            )
        return ProfileResult(
            self.name, chosen, {ep.key: totals[i] for i, ep in enumerate(candidates)} if debug else {}
        )
