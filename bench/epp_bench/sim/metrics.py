"""vLLM's Prometheus metrics for one instance, in one CollectorRegistry per instance.

Gauges and counters are read from the engine at scrape time by a custom collector, so the hot path
only bumps plain ints; the histograms are prometheus_client Histograms observed once per request.
Names, labels and buckets follow vLLM v1 (`model_name` and `engine` labels on engine metrics).
Latency histograms are in simulated seconds (real / time_factor), so they read like a GPU pod's
whatever the time scaling of the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from epp_bench.sim.config import BLOCK_SIZE_TOKENS
from epp_bench.sim.engine import Engine, Observers

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
# vLLM's inter-token latency buckets (vllm/v1/metrics/loggers.py).
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)  # fmt: skip
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


class _EngineCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.labels = {"model_name": engine.cfg.model, "engine": "0"}
        self.lora_stamp = 0.0

    def collect(self) -> Iterator[Metric]:
        engine, stats, labels = self.engine, self.engine.stats, self.labels
        names, values = list(labels), list(labels.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", engine.num_running
        )
        yield gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", engine.num_waiting
        )
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", engine.kv.usage)
        cache_info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=["block_size", "num_gpu_blocks"],
        )
        cache_info.add_metric([str(BLOCK_SIZE_TOKENS), str(engine.cfg.kv_cache_blocks)], 1.0)
        yield cache_info
        # vLLM sets this gauge to the time of its last update, which happens on engine steps, so
        # an idle engine's stays put; readers keep the newest sample.
        if engine.num_running or engine.num_waiting or not self.lora_stamp:
            self.lora_stamp = time.time()
        lora = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        lora.add_metric(["", "", "0"], self.lora_stamp)
        yield lora
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in queried tokens.",
            stats.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in cached tokens.", stats.prefix_cache_hits
        )
        # The names vLLM used for the same two counters before it dropped the `gpu_` prefix
        # (still read by older dashboards and routers); same values, in tokens.
        yield counter(
            "vllm:gpu_prefix_cache_queries",
            "GPU prefix cache queries, in terms of number of queried tokens.",
            stats.prefix_cache_queries,
        )
        yield counter(
            "vllm:gpu_prefix_cache_hits",
            "GPU prefix cache hits, in terms of number of cached tokens.",
            stats.prefix_cache_hits,
        )
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens)
        yield counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", stats.generation_tokens
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*names, "finished_reason"],
        )
        success.add_metric([*values, "length"], stats.requests_succeeded)  # max_tokens is always reached
        yield success


class SimMetrics:
    """The registries of one instance plus the per-request observers the engine calls.

    Rendering is what a scrape costs the simulator's event loop, which also runs the engine's
    steps: prometheus_client renders this page in about 1.4 ms, so a router polling 8 simulators
    of one process every 50 ms would hold their steps back by milliseconds each time (a real vLLM
    serves /metrics from its API server process, apart from the engine core). The histograms only
    change when a request ends, so their text is rendered again only then; the gauges and
    counters, read from the engine, are rendered at every scrape.
    """

    def __init__(self, engine: Engine) -> None:
        # The gauges and counters. Described (as prometheus-client's global registry, which
        # vLLM's /metrics serves), so that `?name[]=` selects among them as it does on vLLM.
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(engine))
        self.histograms = CollectorRegistry(auto_describe=False)
        self._histograms_version = 0  # bumped by every observation
        self._histograms_text = b""
        self._rendered_version = -1
        model = engine.cfg.model
        labels = ("model_name", "engine")
        registry = self.histograms
        ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.", labels,
                         registry=registry, buckets=TTFT_BUCKETS)  # fmt: skip
        e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds.", labels,
                        registry=registry, buckets=LATENCY_BUCKETS)  # fmt: skip
        queue = Histogram("vllm:request_queue_time_seconds", "Time spent in WAITING phase.", labels,
                          registry=registry, buckets=LATENCY_BUCKETS)  # fmt: skip
        itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        labels, registry=registry, buckets=ITL_BUCKETS)  # fmt: skip
        itl_child = itl.labels(model, "0")

        def observed(observe: Callable[[float], None]) -> Callable[[float], None]:
            def bump_and_observe(value: float) -> None:
                self._histograms_version += 1
                observe(value)

            return bump_and_observe

        def observe_itl(mean_gap_s: float, gaps: int) -> None:
            # vLLM observes each gap; the simulator's decode steps are even, so a request's gaps
            # are its mean gap, observed once per gap (at the end: the engine stays per-request).
            self._histograms_version += 1
            for _ in range(gaps):
                itl_child.observe(mean_gap_s)

        engine.observers = Observers(
            queue_time=observed(queue.labels(model, "0").observe),
            ttft=observed(ttft.labels(model, "0").observe),
            e2e=observed(e2e.labels(model, "0").observe),
            itl=observe_itl,
        )

    def render(self, names: Sequence[str] = ()) -> bytes:
        """The page; with `names` (the query's `name[]`), only those series, as prometheus-client
        renders a restricted registry for vLLM."""
        if names:
            return generate_latest(self.registry.restricted_registry(names)) + generate_latest(
                self.histograms.restricted_registry(names)
            )
        if self._rendered_version != self._histograms_version:
            self._histograms_text = generate_latest(self.histograms)
            self._rendered_version = self._histograms_version
        return generate_latest(self.registry) + self._histograms_text
