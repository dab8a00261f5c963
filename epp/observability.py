"""epp's own Prometheus metrics, under the Go EPP's names so dashboards carry over.

All metrics live in one registry created by the composition root (no module-level state), served
on --metrics-port. Plugins register their own metrics in the same registry through their handle
(e.g. the prefix index size, the P/D decisions); this module knows none of them.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from epp.framework import Endpoint

_LATENCY_BUCKETS = (
    0.005,
    0.025,
    0.05,
    0.1,
    0.2,
    0.4,
    0.6,
    0.8,
    1,
    1.25,
    1.5,
    2,
    3,
    4,
    5,
    6,
    8,
    10,
    15,
    20,
    30,
    45,
    60,
    120,
    180,
    240,
    300,
    360,
    480,
    600,
    900,
    1200,
    1800,
    2700,
    3600,
)
_SCHEDULER_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
_PLUGIN_BUCKETS = (0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class ModelMetrics:
    """The per-model metric children one request touches, resolved once per (model, target):
    `labels()` costs microseconds per call on the hot path, a cached child does not."""

    __slots__ = ("duration", "input_tokens", "output_tokens", "requests", "running")

    def __init__(self, m: EppMetrics, model: str, target: str) -> None:
        self.requests = m.request_total.labels(model, target)
        self.running = m.running_requests.labels(model)
        self.duration = m.request_duration.labels(model, target)
        self.input_tokens = m.input_tokens.labels(model, target)
        self.output_tokens = m.output_tokens.labels(model, target)


class EppMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        model_labels = ["model_name", "target_model_name"]
        self.request_total = Counter(
            "inference_objective_request", "Requests received, by model.", model_labels, registry=r
        )
        self.request_errors = Counter(
            "inference_objective_request_error",
            "Requests that failed, by error code.",
            [*model_labels, "error_code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "inference_objective_request_duration_seconds",
            "Request latency, headers to end of response.",
            model_labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.input_tokens = Histogram(
            "inference_objective_input_tokens",
            "Prompt tokens per request (from the response usage).",
            model_labels,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.output_tokens = Histogram(
            "inference_objective_output_tokens",
            "Completion tokens per request (from the response usage).",
            model_labels,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.running_requests = Gauge(
            "inference_objective_running_requests",
            "Requests in flight, by model.",
            ["model_name"],
            registry=r,
        )
        self.pool_kv_cache = Gauge(
            "inference_pool_average_kv_cache_utilization",
            "Mean KV-cache usage over the pool's endpoints.",
            ["name"],
            registry=r,
        )
        self.pool_queue = Gauge(
            "inference_pool_average_queue_size",
            "Mean waiting-queue length over the pool's endpoints.",
            ["name"],
            registry=r,
        )
        self.pool_ready = Gauge("inference_pool_ready_pods", "Endpoints in the pool.", ["name"], registry=r)
        self.scheduler_e2e = Histogram(
            "inference_extension_scheduler_e2e_duration_seconds",
            "Time to schedule one request.",
            buckets=_SCHEDULER_BUCKETS,
            registry=r,
        )
        self.plugin_duration = Histogram(
            "inference_extension_plugin_duration_seconds",
            "Time spent in each plugin.",
            ["extension_point", "plugin_type", "plugin_name"],
            buckets=_PLUGIN_BUCKETS,
            registry=r,
        )
        self.fallback_served = Counter(
            "epp_fallback_endpoint_served",
            "Requests that Envoy reported a fallback endpoint (not the primary) served.",
            registry=r,
        )
        self.scrape_errors = Counter(
            "epp_endpoint_scrape_errors", "Failed polls of an endpoint's /metrics.", ["endpoint"], registry=r
        )
        self._model_children: dict[tuple[str, str], ModelMetrics] = {}
        self._plugin_children: dict[tuple[str, str, str], Histogram] = {}

    def for_model(self, model: str, target: str) -> ModelMetrics:
        key = (model, target)
        children = self._model_children.get(key)
        if children is None:
            children = self._model_children[key] = ModelMetrics(self, model, target)
        return children

    def count_error(self, model: str, target: str, code: str) -> None:
        self.request_errors.labels(model, target, code).inc()

    def forget_endpoint(self, endpoint: Endpoint) -> None:
        with contextlib.suppress(KeyError):
            self.scrape_errors.remove(endpoint.key)

    def observe_plugin(self, point: str, plugin_type: str, plugin_name: str, seconds: float) -> None:
        key = (point, plugin_type, plugin_name)
        child = self._plugin_children.get(key)
        if child is None:  # labels() is slow; cache the child per plugin
            child = self._plugin_children[key] = self.plugin_duration.labels(point, plugin_type, plugin_name)
        child.observe(seconds)
