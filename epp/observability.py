"""epp's own Prometheus metrics, under the Go EPP's (llm-d-router's) names, types, labels and
buckets, so its dashboards and alerts carry over.

Every metric has its canonical `llm_d_epp_*` name; those that had an older name in the Go EPP
(`inference_objective_*`, `inference_pool_*`, `inference_extension_*`,
`llm_d_inference_scheduler_*`) are also exposed under it, marked deprecated in its HELP text, as
llm-d-router does during its migration. The request path writes the canonical series only: an
alias is computed from its canonical metric when /metrics is scraped (summed over the labels the
old name did not have), so the two always agree. docs/metrics.md lists them all.

Label values taken from a request (model names, the fairness id) are capped as the Go EPP caps
them: past 1000 distinct values, new ones are reported as "other", so no client can grow the
series set without bound.

All metrics live in one registry created by the composition root (no module-level state), served
on --metrics-port. Plugins register their own metrics in the same registry through their handle
(e.g. the prefix index size, the P/D decisions); this module knows none of them.

The request path touches cached label children only (`RequestMetrics`, resolved once per label
set): `labels()` costs microseconds a call, a cached child does not. epp's histograms are
`LeanHistogram`s (no locks, a bisect per observation): a streaming response observes one per
chunk.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epp import __version__
from epp.framework import CappedChildren, Endpoint

# The fairness id helpers live in the plugin API (plugins read it too); re-exported here.
from epp.framework.fairness import DEFAULT_FAIRNESS_ID as DEFAULT_FAIRNESS_ID
from epp.framework.fairness import fairness_id as fairness_id

# The request path's histogram lives in the plugin API (plugins record on the path too).
from epp.framework.histogram import HistogramChild as HistogramChild
from epp.framework.histogram import LeanHistogram as LeanHistogram

PREFIX = "llm_d_epp_"

# --- label caps (llm-d-router pkg/common/observability/metrics/cardinality.go) -------------------

OVERFLOW_VALUE = "other"
MAX_MODEL_LABEL_VALUES = 1000  # shared by model_name and target_model_name
MAX_FAIRNESS_LABEL_VALUES = 1000
# epp's own caps (not in llm-d-router): a value this long, and a request label set past this
# many, fold to "other". Each label is capped alone, but a client choosing the model, the rewrite
# target and the fairness id could still make 1000 x 1000 x 1000 sets of request series, each
# one holding a few kB and adding about 47 kB to every /metrics page.
MAX_LABEL_VALUE_CHARS = 1024
MAX_REQUEST_LABEL_SETS = 2000

# The priority label of a request without an InferenceObjective (and of every error series): the
# Go EPP's default priority.
DEFAULT_PRIORITY = "0"

# The data source whose polls fail, in llm_d_epp_datalayer_poll_errors_total{source_type}.
METRICS_SOURCE_TYPE = "metrics-data-source"

# --- buckets (llm-d-router pkg/epp/metrics) -------------------------------------------------------

_LATENCY_BUCKETS = (
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45,
    60, 120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600,
)  # fmt: skip
_TTFT_BUCKETS = _LATENCY_BUCKETS[: _LATENCY_BUCKETS.index(120) + 1]
_TPOT_BUCKETS = (
    0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6,
    0.8, 1, 2,
)  # fmt: skip
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2)
_NTPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_REQUEST_SIZE_BUCKETS = tuple(2.0**k for k in range(6, 31))  # 64 B .. 1 GiB
# Go's list, 32778 (not 32768) included.
_RESPONSE_SIZE_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536)
_INPUT_TOKEN_BUCKETS = (*_RESPONSE_SIZE_BUCKETS, 131072, 262144, 524288, 1048576)
_OUTPUT_TOKEN_BUCKETS = _RESPONSE_SIZE_BUCKETS[: _RESPONSE_SIZE_BUCKETS.index(8192) + 1]
_SCHEDULER_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
_PLUGIN_BUCKETS = _SCHEDULER_BUCKETS
_REQUEST_PROCESSING_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.04, 0.06, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip
_RESPONSE_PROCESSING_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
)  # fmt: skip
_STREAM_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600)

_MODEL = ("model_name", "target_model_name")
_REQUEST = (*_MODEL, "fairness_id", "priority")
_POOL = ("name",)


def _help(text: str) -> str:
    return f"[ALPHA] {text}"


def _deprecated(canonical: str, text: str) -> str:
    return f"[ALPHA] [Deprecated: Use {canonical}] {text}"


class BoundedLabel:
    """Caps the distinct values a label takes: past `limit`, new values become "other", as does a
    value longer than MAX_LABEL_VALUE_CHARS. A value once admitted always maps to itself, so
    paired gauge updates stay balanced; "" passes through; pinned values never fold and take no
    slot."""

    __slots__ = ("_limit", "_pinned", "_seen")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._pinned: set[str] = set()

    def bound(self, value: str) -> str:
        if not value or value in self._seen or value in self._pinned:
            return value
        if len(self._seen) >= self._limit or len(value) > MAX_LABEL_VALUE_CHARS:
            return OVERFLOW_VALUE
        self._seen.add(value)
        return value

    def pin(self, value: str) -> None:
        if value:
            self._pinned.add(value)


class _Alias(Collector):
    """A deprecated name of a canonical metric, computed from it when /metrics is scraped: its
    series summed over the labels the old name does not have, labels renamed where the old name
    called them differently. The hot path writes the canonical metric once."""

    def __init__(
        self,
        source: Counter | Gauge | LeanHistogram,
        name: str,
        documentation: str,
        labels: Sequence[str | tuple[str, str]],
    ) -> None:
        (family,) = source.describe()
        self._source = source
        self._type = family.type
        self._name = name.removesuffix("_total") if family.type == "counter" else name
        self._documentation = documentation
        # (canonical label, alias label)
        self._labels = [(label, label) if isinstance(label, str) else label for label in labels]

    def describe(self) -> Iterator[Metric]:
        yield Metric(self._name, self._documentation, self._type)

    def collect(self) -> Iterator[Metric]:
        out = Metric(self._name, self._documentation, self._type)
        sums: dict[tuple[str, tuple[str, ...]], float] = {}
        for family in self._source.collect():
            skip = len(family.name)
            for sample in family.samples:
                suffix = sample.name[skip:]
                values = tuple(sample.labels[label] for label, _ in self._labels)
                if "le" in sample.labels:
                    values += (sample.labels["le"],)
                key = (suffix, values)
                sums[key] = sums.get(key, 0.0) + sample.value
        names = [alias for _, alias in self._labels]
        for (suffix, values), value in sums.items():
            keys = names if len(values) == len(names) else [*names, "le"]
            out.add_sample(self._name + suffix, dict(zip(keys, values, strict=True)), value)
        yield out


class RequestMetrics:
    """The metric children one request touches, resolved once per (model, target model, fairness
    id, priority) after the caps. `running` is None for a request without a model (the Go EPP
    counts no running request for those). The streaming-only series are made on first use, so a
    model that never streams shows none."""

    __slots__ = (
        "_labels",
        "_metrics",
        "_streaming",
        "_ttft",
        "cached_tokens",
        "duration",
        "input_tokens",
        "ntpot",
        "output_tokens",
        "request_size",
        "requests",
        "response_size",
        "running",
    )

    def __init__(self, m: EppMetrics, model: str, target: str, fairness: str, priority: str) -> None:
        labels = self._labels = (model, target, fairness, priority)
        self._metrics = m
        self.requests: Counter = m.request_total.labels(*labels)
        self.running: Gauge | None = m.request_running.labels(*labels) if model else None
        self.duration: HistogramChild = m.request_duration.labels(*labels)
        self.request_size: HistogramChild = m.request_size.labels(*labels)
        self.response_size: HistogramChild = m.response_size.labels(*labels)
        self.input_tokens: HistogramChild = m.input_tokens.labels(*labels)
        self.output_tokens: HistogramChild = m.output_tokens.labels(*labels)
        self.cached_tokens: HistogramChild = m.cached_tokens.labels(*labels)
        self.ntpot: HistogramChild = m.ntpot.labels(*labels)
        self._ttft: dict[bool, HistogramChild] = {}
        self._streaming: tuple[HistogramChild, HistogramChild] | None = None

    def ttft(self, streaming: bool) -> HistogramChild:
        child = self._ttft.get(streaming)
        if child is None:
            flag = "true" if streaming else "false"
            child = self._ttft[streaming] = self._metrics.ttft.labels(*self._labels, flag)
        return child

    def _streaming_children(self) -> tuple[HistogramChild, HistogramChild]:
        if self._streaming is None:
            m = self._metrics
            self._streaming = (m.itl.labels(*self._labels), m.tpot.labels(*self._labels))
        return self._streaming

    @property
    def itl(self) -> HistogramChild:
        """Inter-token latency (streaming responses)."""
        return self._streaming_children()[0]

    @property
    def tpot(self) -> HistogramChild:
        """Time per output token after the first (streaming responses)."""
        return self._streaming_children()[1]


class StreamMetrics:
    """The ext_proc stream metrics (--enable-grpc-stream-metrics): open streams, how long each
    stayed open, and how each ended (its gRPC code, as Go names codes)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.inflight = Gauge(
            PREFIX + "extproc_streams_inflight",
            _help("Number of ext_proc gRPC streams currently open."),
            registry=registry,
        )
        self.duration = Histogram(
            PREFIX + "extproc_stream_duration_seconds",
            _help("Duration an ext_proc gRPC stream stays open, in seconds."),
            buckets=_STREAM_DURATION_BUCKETS,
            registry=registry,
        )
        self.total = Counter(
            PREFIX + "extproc_streams_total",
            _help("Total ext_proc gRPC streams completed, by gRPC status code."),
            ["code"],
            registry=registry,
        )
        self._codes: dict[str, Counter] = {}

    def started(self) -> None:
        self.inflight.inc()

    def finished(self, code: str, seconds: float) -> None:
        self.inflight.dec()
        self.duration.observe(seconds)
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self.total.labels(code)
        child.inc()


class PoolSummary:
    """The pool gauges' values: over the endpoints with fresh metrics, the mean and the sample
    standard deviation (n - 1, as the Go EPP) of KV-cache usage, waiting queue and running
    requests, rounded to two decimals."""

    __slots__ = ("kv_cache", "queue", "ready", "running")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.ready = len(endpoints)
        self.kv_cache = _mean_sd([ep.metrics.kv_cache_usage for ep in endpoints])
        self.queue = _mean_sd([float(ep.metrics.waiting_queue_size) for ep in endpoints])
        self.running = _mean_sd([float(ep.metrics.running_requests) for ep in endpoints])


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return round(mean, 2), round(math.sqrt(variance), 2)


class _PerEndpointQueue(Collector):
    """llm_d_epp_per_endpoint_queue_size (and its deprecated twin), read from the datastore when
    /metrics is scraped, so a departed endpoint leaves no series behind. Endpoints sharing a pod
    name (several ports of one pod) are summed: the label names the pod."""

    def __init__(self) -> None:
        self.pool_name = ""
        self.endpoints: Callable[[], Sequence[Endpoint]] | None = None

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                PREFIX + "per_endpoint_queue_size",
                _help(
                    "The total number of requests pending in the model server queue for each underlying "
                    "endpoint."
                ),
                labels=["name", "model_server_endpoint"],
            ),
            GaugeMetricFamily(
                "inference_pool_per_pod_queue_size",
                _deprecated(
                    PREFIX + "per_endpoint_queue_size",
                    "The total number of requests pending in the model server queue for each underlying pod.",
                ),
                labels=["name", "model_server_pod"],
            ),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        new, old = self._families()
        if self.endpoints is not None:
            queues: dict[str, float] = {}
            for ep in self.endpoints():
                name = ep.go_id.rpartition("/")[2]  # the Go EPP's endpoint name: pod-rank-N
                queues[name] = queues.get(name, 0.0) + ep.metrics.waiting_queue_size
            for name, queue in queues.items():
                new.add_metric([self.pool_name, name], queue)
                old.add_metric([self.pool_name, name], queue)
        yield new
        yield old


class EppMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # No `*_created` series (the Go EPP exposes none); process-wide, for plugins' metrics too.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.models = BoundedLabel(MAX_MODEL_LABEL_VALUES)
        self.fairness = BoundedLabel(MAX_FAIRNESS_LABEL_VALUES)
        p = PREFIX

        def alias(
            source: Counter | Gauge | LeanHistogram,
            old: str,
            text: str,
            labels: Sequence[str | tuple[str, str]],
        ) -> None:
            (family,) = source.describe()
            canonical = family.name + ("_total" if family.type == "counter" else "")
            r.register(_Alias(source, old, _deprecated(canonical, text), labels))

        def counter(name: str, text: str, labels: Sequence[str]) -> Counter:
            return Counter(name, _help(text), labels, registry=r)

        def histogram(name: str, text: str, labels: Sequence[str], buckets: Sequence[float]) -> LeanHistogram:
            return LeanHistogram(name, _help(text), labels, buckets, r)

        def gauge(name: str, text: str, labels: Sequence[str]) -> Gauge:
            return Gauge(name, _help(text), labels, registry=r)

        # --- requests and latency ---------------------------------------------------------------
        self.request_total = counter(p + "request_total", "Total number of processed requests.", _REQUEST)
        alias(
            self.request_total,
            "inference_objective_request_total",
            "Counter of inference objective requests broken out for each model and target model.",
            (*_MODEL, "priority"),
        )
        self.request_errors = counter(
            p + "request_error_total", "Total number of request errors.", (*_REQUEST, "error_code")
        )
        alias(
            self.request_errors,
            "inference_objective_request_error_total",
            "Counter of inference objective requests errors broken out for each model and target model.",
            (*_MODEL, "error_code"),
        )
        self.request_duration = histogram(
            p + "request_duration_seconds",
            "End-to-end request latency distribution in seconds.",
            _REQUEST,
            _LATENCY_BUCKETS,
        )
        alias(
            self.request_duration,
            "inference_objective_request_duration_seconds",
            "Inference objective response latency distribution in seconds for each model and target model.",
            _MODEL,
        )
        self.request_size = histogram(
            p + "request_size_bytes",
            "Incoming request body size distribution in bytes.",
            _REQUEST,
            _REQUEST_SIZE_BUCKETS,
        )
        alias(
            self.request_size,
            "inference_objective_request_sizes",
            "Inference objective requests size distribution in bytes for each model and target model.",
            _MODEL,
        )
        self.response_size = histogram(
            p + "response_size_bytes",
            "Outgoing response body size distribution in bytes.",
            _REQUEST,
            _RESPONSE_SIZE_BUCKETS,
        )
        alias(
            self.response_size,
            "inference_objective_response_sizes",
            "Inference objective responses size distribution in bytes for each model and target model.",
            _MODEL,
        )
        self.input_tokens = histogram(
            p + "request_input_tokens",
            "Input token count distribution per request.",
            _REQUEST,
            _INPUT_TOKEN_BUCKETS,
        )
        alias(
            self.input_tokens,
            "inference_objective_input_tokens",
            "Inference objective input token count distribution for requests in each model.",
            _MODEL,
        )
        self.output_tokens = histogram(
            p + "request_output_tokens",
            "Output token count distribution per request.",
            _REQUEST,
            _OUTPUT_TOKEN_BUCKETS,
        )
        alias(
            self.output_tokens,
            "inference_objective_output_tokens",
            "Inference objective output token count distribution for requests in each model.",
            _MODEL,
        )
        self.cached_tokens = histogram(
            p + "request_cached_tokens",
            "Distribution of prompt tokens read from cache per request, as reported by the model server "
            "in the response.",
            _REQUEST,
            _INPUT_TOKEN_BUCKETS,
        )
        alias(
            self.cached_tokens,
            "inference_objective_prompt_cached_tokens",
            "Inference objective prompt cached token count distribution for requests in each model.",
            _MODEL,
        )
        self.request_running = gauge(
            p + "request_running", "Current number of active running requests.", _REQUEST
        )
        alias(
            self.request_running,
            "inference_objective_running_requests",
            "Inference objective number of running requests in each model.",
            ("model_name",),
        )
        self.ntpot = histogram(
            p + "request_ntpot_seconds",
            "Normalized time per output token in seconds (end-to-end latency divided by output token count).",
            _REQUEST,
            _NTPOT_BUCKETS,
        )
        alias(
            self.ntpot,
            "inference_objective_normalized_time_per_output_token_seconds",
            "Inference objective latency divided by number of output tokens in seconds for each model and "
            "target model.",
            _MODEL,
        )
        self.ttft = histogram(
            p + "request_ttft_seconds",
            "Time to first token in seconds, measured from request received to first response byte. For "
            "non-streaming requests, this equals total request duration.",
            (*_REQUEST, "streaming"),
            _TTFT_BUCKETS,
        )
        self.tpot = histogram(
            p + "request_streaming_tpot_seconds",
            "Average time per output token in seconds for streaming requests, computed as (e2e - TTFT) / "
            "(output_tokens - 1).",
            _REQUEST,
            _TPOT_BUCKETS,
        )
        self.itl = histogram(
            p + "request_streaming_itl_seconds",
            "Inter-token latency in seconds for streaming requests, measured as the time between "
            "consecutive response body chunks.",
            _REQUEST,
            _ITL_BUCKETS,
        )

        # --- EPP processing overhead --------------------------------------------------------------
        self.request_processing = histogram(
            p + "request_processing_duration_seconds",
            "EPP request processing latency distribution in seconds, from request receipt until the "
            "request body has been handled, including admission control.",
            (),
            _REQUEST_PROCESSING_BUCKETS,
        ).labels()
        self.response_processing = histogram(
            p + "response_processing_duration_seconds",
            "EPP response processing latency distribution in seconds: the sum of per-chunk handler time "
            "for a response.",
            (),
            _RESPONSE_PROCESSING_BUCKETS,
        ).labels()

        # --- the pool -------------------------------------------------------------------------------
        self._pool_gauges: list[Gauge] = []
        for name, text in (
            (
                "average_kv_cache_utilization",
                "The average kv cache utilization for an inference server pool.",
            ),
            ("average_queue_size", "The average number of requests pending in the model server queue."),
            (
                "average_running_requests",
                "The average number of running requests across model servers in the pool.",
            ),
        ):
            average = gauge(p + name, text, _POOL)
            alias(average, "inference_pool_" + name, text, _POOL)
            std_dev_name = "std_dev_" + name.removeprefix("average_")
            std_dev = gauge(p + std_dev_name, text.replace("average", "standard deviation"), _POOL)
            self._pool_gauges += [average, std_dev]
        self.pool_ready = gauge(
            p + "ready_endpoints", "The number of ready endpoints in the inference server pool.", _POOL
        )
        alias(
            self.pool_ready,
            "inference_pool_ready_pods",
            "The number of ready pods in the inference server pool.",
            _POOL,
        )
        self._per_endpoint_queue = _PerEndpointQueue()
        r.register(self._per_endpoint_queue)

        # --- scheduling and plugins -----------------------------------------------------------------
        scheduling_text = "End-to-end scheduling latency distribution in seconds."
        scheduler_e2e = histogram(
            p + "scheduler_e2e_duration_seconds", scheduling_text, (), _SCHEDULER_BUCKETS
        )
        alias(scheduler_e2e, "inference_extension_scheduler_e2e_duration_seconds", scheduling_text, ())
        self.scheduler_e2e = scheduler_e2e.labels()
        self.scheduler_attempts = counter(
            p + "scheduler_attempts_total",
            "Total number of scheduling attempts.",
            ("status", "target_model_name", "endpoint_name", "namespace", "port"),
        )
        alias(
            self.scheduler_attempts,
            "inference_extension_scheduler_attempts_total",
            "Total number of scheduling attempts.",
            ("status", "target_model_name", ("endpoint_name", "pod_name"), "namespace", "port"),
        )
        plugin_text = (
            "Plugin processing latency distribution in seconds for each extension point, plugin type and "
            "plugin name."
        )
        plugin_labels = ("extension_point", "plugin_type", "plugin_name")
        self.plugin_duration = histogram(
            p + "plugin_duration_seconds", plugin_text, plugin_labels, _PLUGIN_BUCKETS
        )
        alias(self.plugin_duration, "inference_extension_plugin_duration_seconds", plugin_text, plugin_labels)

        # --- model rewrites (InferenceModelRewrite) ---------------------------------------------------
        rewrite_text = "Total number of inference model rewrite decisions."
        rewrite_labels = ("model_rewrite_name", "model_name", "target_model")
        self.rewrite_decisions = counter(p + "model_rewrite_decisions_total", rewrite_text, rewrite_labels)
        old_rewrites = "inference_extension_model_rewrite_decisions_total"
        alias(self.rewrite_decisions, old_rewrites, rewrite_text, rewrite_labels)

        # --- build info -----------------------------------------------------------------------------
        info = gauge(
            p + "info",
            "General information of the current build of Inference Extension.",
            ("commit", "build_ref"),
        )
        alias(
            info,
            "inference_extension_info",
            "General information of the current build of Inference Extension.",
            ("commit", "build_ref"),
        )
        info.labels("", __version__).set(1)

        # --- the data layer -------------------------------------------------------------------------
        poll_errors = counter(
            p + "datalayer_poll_errors_total", "Data-source poll errors per source type.", ("source_type",)
        )
        alias(
            poll_errors,
            "llm_d_inference_scheduler_datalayer_poll_errors_total",
            "Data-source poll errors per source type.",
            ("source_type",),
        )
        self.poll_errors: Counter = poll_errors.labels(METRICS_SOURCE_TYPE)

        # --- epp's own (no Go counterpart) ------------------------------------------------------------
        self.fallback_served = Counter(
            "epp_fallback_endpoint_served",
            "Requests that Envoy reported a fallback endpoint (not the primary) served.",
            registry=r,
        )
        self.scrape_errors = Counter(
            "epp_endpoint_scrape_errors", "Failed polls of an endpoint's /metrics.", ["endpoint"], registry=r
        )

        self.streams: StreamMetrics | None = None  # enable_stream_metrics()
        # Past MAX_REQUEST_LABEL_SETS sets, a new one reports as (other, other, other, priority).
        self._requests: CappedChildren[tuple[str, str, str, str], RequestMetrics] = CappedChildren(
            MAX_REQUEST_LABEL_SETS,
            lambda key: RequestMetrics(self, *key),
            lambda key: (OVERFLOW_VALUE, OVERFLOW_VALUE, OVERFLOW_VALUE, key[3]),
        )
        self._errors: CappedChildren[tuple[str, str, str, str, str], Counter] = CappedChildren(
            MAX_REQUEST_LABEL_SETS,
            lambda key: self.request_errors.labels(*key),
            lambda key: (OVERFLOW_VALUE, OVERFLOW_VALUE, OVERFLOW_VALUE, key[3], key[4]),
        )
        # (status, model, endpoint key, pod name) -> the child and the pod labels it was made with:
        # a pod replaced at the same address and port is a new pod name, so a new series.
        self._attempts: dict[tuple[str, str, str, str], tuple[Counter, tuple[str, str, str]]] = {}

    # --- requests ---------------------------------------------------------------------------------

    def for_request(
        self, model: str, target: str, fairness: str = DEFAULT_FAIRNESS_ID, priority: str = DEFAULT_PRIORITY
    ) -> RequestMetrics:
        """The request's metric children, after the label caps."""
        bound = self.models.bound
        return self._requests.get((bound(model), bound(target), self.fairness.bound(fairness), priority))

    def count_error(
        self,
        model: str,
        target: str,
        code: str,
        fairness: str = DEFAULT_FAIRNESS_ID,
        priority: str = DEFAULT_PRIORITY,
    ) -> None:
        bound = self.models.bound
        self._errors.get((bound(model), bound(target), self.fairness.bound(fairness), priority, code)).inc()

    # --- scheduling -------------------------------------------------------------------------------

    def count_schedule_attempt(self, target_model: str, endpoint: Endpoint | None) -> None:
        """One scheduling attempt: a success with the primary endpoint it chose, or a failure (None)."""
        target = self.models.bound(target_model)
        status = "success" if endpoint is not None else "failure"
        key = (status, target, endpoint.key, endpoint.pod_name) if endpoint else (status, target, "", "")
        entry = self._attempts.get(key)
        if entry is None:
            # The pod's name, as the Go EPP labels it (two ports of a pod differ by endpoint_port).
            where = (endpoint.pod_name, endpoint.namespace, str(endpoint.port)) if endpoint else ("", "", "")
            entry = self._attempts[key] = (self.scheduler_attempts.labels(status, target, *where), where)
        entry[0].inc()

    def count_rewrite(self, rewrite: str, model: str, target: str) -> None:
        """An InferenceModelRewrite rule chose `target` for a request naming `model` (capped, as
        upstream caps it; the rewrite's name and target come from the configured objects)."""
        self.rewrite_decisions.labels(rewrite, self.models.bound(model), target).inc()

    def plugin_series(self, point: str, plugin_type: str, plugin_name: str) -> HistogramChild:
        """One plugin's series of the plugin-duration histogram at one extension point (the
        scheduler resolves each once; a plugin run then costs one observation)."""
        return self.plugin_duration.labels(point, plugin_type, plugin_name, exposed_before_observed=False)

    # --- the pool and its endpoints ---------------------------------------------------------------

    def watch_endpoints(self, pool_name: str, endpoints: Callable[[], Sequence[Endpoint]]) -> None:
        """Where the per-endpoint queue gauge reads the endpoints when /metrics is scraped."""
        self._per_endpoint_queue.pool_name = pool_name
        self._per_endpoint_queue.endpoints = endpoints

    def set_pool(self, name: str, summary: PoolSummary) -> None:
        """The pool gauges. With no fresh endpoint only the ready count changes (as in Go)."""
        self.pool_ready.labels(name).set(summary.ready)
        if not summary.ready:
            return
        values = (*summary.kv_cache, *summary.queue, *summary.running)
        for gauge, value in zip(self._pool_gauges, values, strict=True):
            gauge.labels(name).set(value)

    def count_scrape_error(self, endpoint: Endpoint) -> None:
        """A failed poll of an endpoint's /metrics."""
        self.scrape_errors.labels(endpoint.key).inc()
        self.poll_errors.inc()

    def forget_endpoint(self, endpoint: Endpoint) -> None:
        """A departed endpoint: drop its series (pods come and go; a restart is a new IP)."""
        with contextlib.suppress(KeyError):
            self.scrape_errors.remove(endpoint.key)
        for key in [k for k in self._attempts if k[2] == endpoint.key]:
            _, where = self._attempts.pop(key)  # every pod that served at this address and port
            with contextlib.suppress(KeyError):
                self.scheduler_attempts.remove(key[0], key[1], *where)

    # --- ext_proc streams -------------------------------------------------------------------------

    def enable_stream_metrics(self) -> StreamMetrics:
        """Register the ext_proc stream metrics (--enable-grpc-stream-metrics); idempotent."""
        if self.streams is None:
            self.streams = StreamMetrics(self.registry)
        return self.streams
