"""`queue-scorer` and `running-requests-size-scorer`: load scorers on scraped queue metrics,
min-max normalised over the candidates.

- `queue-scorer`: (maxQ - q) / (maxQ - minQ) on the waiting queue (`vllm:num_requests_waiting`).
- `running-requests-size-scorer`: the same on running requests (`vllm:num_requests_running`).

The shortest queue scores 1, the longest 0; when every candidate has the same value, all score 1
(no preference). An endpoint never scraped counts as 0. Above `SMALL_POOL_SIZE` candidates the
scores are a numpy array, computed on the datastore's metric columns
(`epp.framework.metric_columns`); a list below (faster there).

Consumes: scraped metrics. Produces: nothing. Parameters: none.

    plugins:
    - type: queue-scorer
    schedulingProfiles:
    - name: default
      plugins:
      - pluginRef: queue-scorer
        weight: 2
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from epp.framework import (
    SMALL_POOL_SIZE,
    Column,
    CycleState,
    Endpoint,
    InferenceRequest,
    Scorer,
    Scores,
    metric_columns,
)


def low_is_better_list(values: Sequence[int]) -> list[float]:
    """`low_is_better` on a short list, in plain Python."""
    if not values:
        return []
    low, high = min(values), max(values)
    if high == low:
        return [1.0] * len(values)
    span = high - low
    return [(high - v) / span for v in values]


def low_is_better(values: Column) -> Column:
    """(max - v) / (max - min) for each value; all 1.0 when max == min. The same floats as
    Python's int arithmetic gives: counts are exact in a double, and the division is rounded
    once either way."""
    if not len(values):
        return np.zeros(0)
    low, high = values.min(), values.max()
    if high == low:
        return np.ones(len(values))
    scores: Column = (high - values) / (high - low)
    return scores


class QueueScorer(Scorer):
    """Prefers endpoints with a shorter waiting queue (`vllm:num_requests_waiting`), min-max
    normalised over the candidates: shortest 1, longest 0, all equal 1."""

    type_name = "queue-scorer"

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Scores:
        if len(endpoints) <= SMALL_POOL_SIZE:
            return low_is_better_list([ep.metrics.waiting_queue_size for ep in endpoints])
        return low_is_better(metric_columns(endpoints).waiting_queue_size)


class RunningRequestsSizeScorer(Scorer):
    """Prefers endpoints with fewer running requests (`vllm:num_requests_running`), min-max
    normalised over the candidates."""

    type_name = "running-requests-size-scorer"

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Scores:
        if len(endpoints) <= SMALL_POOL_SIZE:
            return low_is_better_list([ep.metrics.running_requests for ep in endpoints])
        return low_is_better(metric_columns(endpoints).running_requests)
