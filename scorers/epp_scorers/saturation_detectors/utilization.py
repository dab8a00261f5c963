"""`utilization-detector`: pool saturation from scraped queue depth and KV-cache use (the Go
EPP's default detector, a "roofline" over the two resources).

Per endpoint: max(waiting / queueDepthThreshold, kvCacheUsage / kvCacheUtilThreshold); an
endpoint whose metrics are older than metricsStalenessThreshold (or never scraped) counts as 1.0
(fully saturated: fail closed). The pool's saturation is the mean over endpoints; an empty pool
reads 1.0. Flow control stops dispatching at >= 1.0.

Placed in a scheduling profile it is also a filter that protects each endpoint: it keeps the
endpoints with fresh metrics below queueDepthThreshold x (1 + headroom) waiting requests and
kvCacheUtilThreshold x (1 + headroom) KV use; when that leaves none, it keeps them all (fail open),
as the Go detector does.

    plugins:
    - type: utilization-detector
      parameters:
        queueDepthThreshold: 5
        kvCacheUtilThreshold: 0.8
        metricsStalenessThreshold: 200ms
    flowControl:
      saturationDetector:
        pluginRef: utilization-detector
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Self

import numpy as np

from epp.framework import (
    SMALL_POOL_SIZE,
    ConfigError,
    CycleState,
    Endpoint,
    Filter,
    InferenceRequest,
    ParamDoc,
    Params,
    PluginHandle,
    SaturationDetector,
    metric_columns,
)
from epp_scorers.saturation_detectors import go_duration_s

DEFAULT_QUEUE_DEPTH_THRESHOLD = 5
DEFAULT_KV_CACHE_UTIL_THRESHOLD = 0.8
DEFAULT_METRICS_STALENESS_S = 0.2


class UtilizationDetector(SaturationDetector, Filter):
    """Saturation from scraped metrics: the mean over endpoints of max(queue depth /
    queueDepthThreshold, KV-cache use / kvCacheUtilThreshold); stale or missing metrics count as
    fully saturated. The Go EPP's default detector. In a profile, a filter dropping stale
    endpoints and those past the thresholds x (1 + headroom), keeping all when none is left."""

    type_name = "utilization-detector"
    parameters = (
        ParamDoc(
            "queueDepthThreshold", "int", "5", "Waiting requests at which one endpoint counts as full (> 0)."
        ),
        ParamDoc(
            "kvCacheUtilThreshold", "float", "0.8", "KV-cache use (0-1] at which one endpoint counts as full."
        ),
        ParamDoc(
            "metricsStalenessThreshold",
            "duration",
            "200ms",
            "Metrics older than this count the endpoint as fully saturated.",
        ),
        ParamDoc(
            "headroom",
            "float",
            "0.0",
            "As a filter: an endpoint is dropped past the thresholds x (1 + headroom) (>= 0).",
        ),
    )

    def __init__(
        self,
        name: str = "",
        queue_depth_threshold: int = DEFAULT_QUEUE_DEPTH_THRESHOLD,
        kv_cache_util_threshold: float = DEFAULT_KV_CACHE_UTIL_THRESHOLD,
        staleness_s: float = DEFAULT_METRICS_STALENESS_S,
        headroom: float = 0.0,
    ) -> None:
        super().__init__(name)
        if queue_depth_threshold <= 0:
            raise ConfigError(f"queueDepthThreshold must be > 0, got {queue_depth_threshold}")
        if not 0.0 < kv_cache_util_threshold <= 1.0:
            raise ConfigError(f"kvCacheUtilThreshold must be in (0, 1], got {kv_cache_util_threshold}")
        if headroom < 0:
            raise ConfigError(f"headroom must be >= 0, got {headroom}")
        if staleness_s <= 0:
            raise ConfigError(f"metricsStalenessThreshold must be > 0, got {staleness_s}s")
        self.queue_depth_threshold = queue_depth_threshold
        self.kv_cache_util_threshold = kv_cache_util_threshold
        self.staleness_s = staleness_s
        self.metrics_max_age_s = staleness_s
        self.queue_limit = queue_depth_threshold * (1.0 + headroom)
        self.kv_limit = kv_cache_util_threshold * (1.0 + headroom)

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        return cls(
            name,
            params.get_int("queueDepthThreshold", DEFAULT_QUEUE_DEPTH_THRESHOLD),
            params.get_float("kvCacheUtilThreshold", DEFAULT_KV_CACHE_UTIL_THRESHOLD),
            go_duration_s(params.get_str("metricsStalenessThreshold", "200ms"), "metricsStalenessThreshold"),
            params.get_float("headroom", 0.0),
        )

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        if not endpoints:
            return 1.0
        cutoff = time.monotonic() - self.staleness_s
        q, kv = self.queue_depth_threshold, self.kv_cache_util_threshold
        if len(endpoints) > SMALL_POOL_SIZE:  # flow control asks at every arrival: on the columns
            cols = metric_columns(endpoints)
            updated = cols.updated_at
            each = np.where(
                (updated <= 0.0) | (updated < cutoff),
                1.0,
                np.maximum(cols.waiting_queue_size / q, cols.kv_cache_usage / kv),
            )
            values: list[float] = each.tolist()
            return sum(values) / len(endpoints)  # summed in order, as the loop below
        total = 0.0
        for ep in endpoints:
            m = ep.metrics
            if m.updated_at <= 0.0 or m.updated_at < cutoff:
                total += 1.0
            else:
                total += max(m.waiting_queue_size / q, m.kv_cache_usage / kv)
        return total / len(endpoints)

    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        cutoff = time.monotonic() - self.staleness_s
        q, kv = self.queue_limit, self.kv_limit
        if len(endpoints) > SMALL_POOL_SIZE:
            cols = metric_columns(endpoints)
            updated = cols.updated_at
            fine = (
                (updated > 0.0)
                & (updated >= cutoff)
                & (cols.waiting_queue_size < q)
                & (cols.kv_cache_usage < kv)
            )
            if fine.all():
                return endpoints
            rows = np.flatnonzero(fine).tolist()
            return [endpoints[i] for i in rows] if rows else endpoints
        kept = [
            ep
            for ep in endpoints
            if ep.metrics.updated_at > 0.0
            and ep.metrics.updated_at >= cutoff
            and ep.metrics.waiting_queue_size < q
            and ep.metrics.kv_cache_usage < kv
        ]
        return kept if kept else endpoints
