"""Flow-control metrics under upstream's names (llm-d-router docs/metrics.md): the canonical
`llm_d_epp_flow_control_*` and, where upstream keeps one, the deprecated
`inference_extension_flow_control_*` twin.
Model labels are empty: the model rewrite is resolved after admission (docs/flow-control.md)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from epp.observability import (
    MAX_FAIRNESS_LABEL_VALUES,
    PREFIX,
    BoundedLabel,
    LeanHistogram,
    _Alias,
    _deprecated,
    _help,
)

OLD_PREFIX = "inference_extension_"
_QUEUE_DURATION_BUCKETS = (
    0.0001,
    0.0005,
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
_QUEUE_LABELS = ("fairness_id", "priority", "inference_pool", "model_name", "target_model_name")


class FlowControlMetrics:
    def __init__(self, registry: CollectorRegistry, pool: str) -> None:
        self.pool = pool
        self.fairness = BoundedLabel(MAX_FAIRNESS_LABEL_VALUES)

        def twin(
            source: Counter | Gauge | LeanHistogram, name: str, text: str, labels: tuple[str, ...]
        ) -> None:
            canonical = PREFIX + name + ("_total" if isinstance(source, Counter) else "")
            registry.register(_Alias(source, OLD_PREFIX + name, _deprecated(canonical, text), labels))

        text = "Total requests processed by the Flow Control layer, by terminal outcome."
        labels: tuple[str, ...] = ("outcome", "priority", "inference_pool")
        # No deprecated twin: upstream has none for this one.
        self.requests = Counter(PREFIX + "flow_control_requests", _help(text), labels, registry=registry)
        text = "Total time requests spend in the Flow Control layer (from enqueue to final outcome)."
        labels = ("fairness_id", "priority", "outcome", "inference_pool", "model_name", "target_model_name")
        self.queue_duration = LeanHistogram(
            PREFIX + "flow_control_request_queue_duration_seconds",
            _help(text),
            labels,
            _QUEUE_DURATION_BUCKETS,
            registry,
        )
        twin(self.queue_duration, "flow_control_request_queue_duration_seconds", text, labels)
        text = "Current number of requests actively held in the Flow Control queue."
        self.queue_size = Gauge(
            PREFIX + "flow_control_queue_size", _help(text), _QUEUE_LABELS, registry=registry
        )
        twin(self.queue_size, "flow_control_queue_size", text, _QUEUE_LABELS)
        text = "Current total size in bytes of requests actively held in the Flow Control queue."
        self.queue_bytes = Gauge(
            PREFIX + "flow_control_queue_bytes", _help(text), _QUEUE_LABELS, registry=registry
        )
        twin(self.queue_bytes, "flow_control_queue_bytes", text, _QUEUE_LABELS)
        text = "Pool saturation signal gating dispatch (1.0 is the set point)."
        self.saturation = Gauge(
            PREFIX + "flow_control_pool_saturation",
            _help(text),
            ("inference_pool", "stage"),
            registry=registry,
        )
        twin(self.saturation, "flow_control_pool_saturation", text, ("inference_pool", "stage"))

    def outcome(self, outcome: str, fairness_id: str, priority: int, waited_s: float | None) -> None:
        """A request's terminal outcome; `waited_s` None for one that never entered a queue."""
        prio = str(priority)
        self.requests.labels(outcome, prio, self.pool).inc()
        if waited_s is not None:
            fid = self.fairness.bound(fairness_id)
            self.queue_duration.labels(fid, prio, outcome, self.pool, "", "").observe(waited_s)

    def queued(self, fairness_id: str, priority: int, byte_size: int, sign: int) -> None:
        labels = (self.fairness.bound(fairness_id), str(priority), self.pool, "", "")
        self.queue_size.labels(*labels).inc(sign)
        self.queue_bytes.labels(*labels).inc(sign * byte_size)

    def observe_saturation(self, value: float) -> None:
        self.saturation.labels(self.pool, "effective").set(value)
