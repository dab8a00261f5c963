"""`kv-cache-utilization-scorer`: prefer endpoints with more free KV cache: 1 - usage.

Usage is `vllm:kv_cache_usage_perc` (0..1); an endpoint never scraped counts as empty (score 1).
Above `SMALL_POOL_SIZE` candidates the scores are a numpy array, computed on the datastore's
metric columns (`epp.framework.metric_columns`); a list below (faster there).

Consumes: scraped metrics. Produces: nothing. Parameters: none.

    plugins:
    - type: kv-cache-utilization-scorer
    schedulingProfiles:
    - name: default
      plugins:
      - pluginRef: kv-cache-utilization-scorer
        weight: 1
"""

from __future__ import annotations

from collections.abc import Sequence

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


class KvCacheUtilizationScorer(Scorer):
    """Prefers endpoints with more free KV cache: 1 - `vllm:kv_cache_usage_perc`. An endpoint never
    scraped counts as empty."""

    type_name = "kv-cache-utilization-scorer"

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Scores:
        if len(endpoints) <= SMALL_POOL_SIZE:
            return [1.0 - ep.metrics.kv_cache_usage for ep in endpoints]
        scores: Column = 1.0 - metric_columns(endpoints).kv_cache_usage
        return scores
