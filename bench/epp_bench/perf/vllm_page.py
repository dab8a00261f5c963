"""A realistic vLLM /metrics page: every family a vLLM 0.11 (V1 engine) OpenAI server exports for
one model, histograms included, in the size and shape of the real page (about 45 kB).

The families, labels and buckets follow vLLM's `PrometheusStatLogger` (vllm/v1/metrics/loggers.py:
engine gauges and counters, the token and latency histograms, `cache_config_info`,
`lora_requests_info`), prometheus-client's process and Python collectors, and the HTTP metrics of
prometheus-fastapi-instrumentator that vLLM's server adds; values are made up but plausible.
`page(waiting, running, kv)` renders it with the three gauges epp reads set.
"""

from __future__ import annotations

from typing import Any

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
_ENGINE = f'engine="0",model_name="{MODEL}"'
_TTFT = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_ITL = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_LATENCY = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
_TOKENS = (
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1000,
    2000,
    5000,
    10000,
    20000,
    50000,
    100000,
)  # max_model_len 131072
_ITERATION = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_N = (1, 2, 5, 10, 20)
_HTTP = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    2.5,
    3.0,
    3.5,
    4.0,
    4.5,
    5.0,
    7.5,
    10.0,
    30.0,
    60.0,
)
_HTTP_COARSE = (0.1, 0.5, 1.0)
_HANDLERS = ("/v1/completions", "/v1/chat/completions", "/health", "/v1/models")


def _method(handler: str) -> str:
    return "GET" if handler in ("/health", "/v1/models") else "POST"


def _histogram(
    lines: list[str], name: str, help_: str, labels: str, buckets: tuple[float, ...], count: int
) -> None:
    lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    first = f"{labels}," if labels else ""
    braces = f"{{{labels}}}" if labels else ""
    cumulative = 0
    for i, le in enumerate(buckets):
        cumulative = min(count, cumulative + count * (i + 1) // (len(buckets) * 2) + 1)
        lines.append(f'{name}_bucket{{{first}le="{float(le)}"}} {float(cumulative)}')
    lines.append(f'{name}_bucket{{{first}le="+Inf"}} {float(count)}')
    lines.append(f"{name}_count{braces} {float(count)}")
    lines.append(f"{name}_sum{braces} {count * 0.731:.6f}")
    created = f"{name}_created"
    lines += [f"# HELP {created} {help_}", f"# TYPE {created} gauge", f"{created}{braces} 1.7316e+09"]


def _counter(lines: list[str], name: str, help_: str, samples: list[tuple[str, float]]) -> None:
    lines += [f"# HELP {name}_total {help_}", f"# TYPE {name}_total counter"]
    lines += [f"{name}_total{{{labels}}} {value}" for labels, value in samples]
    lines += [f"# HELP {name}_created {help_}", f"# TYPE {name}_created gauge"]
    lines += [f"{name}_created{{{labels}}} 1.7316e+09" for labels, _ in samples]


def _gauge(lines: list[str], name: str, help_: str, samples: list[tuple[str, float]]) -> None:
    lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
    lines += [f"{name}{{{labels}}} {value}" if labels else f"{name} {value}" for labels, value in samples]


def page(waiting: int = 3, running: int = 12, kv: float = 0.42) -> bytes:
    lines: list[str] = []
    for gen in range(3):
        lines += [f'python_gc_objects_collected_total{{generation="{gen}"}} {12345.0 * (gen + 1)}']
    lines[:0] = [
        "# HELP python_gc_objects_collected_total Objects collected during gc",
        "# TYPE python_gc_objects_collected_total counter",
    ]
    _gauge(
        lines,
        "python_gc_objects_uncollectable_total",
        "Uncollectable objects found during GC",
        [(f'generation="{g}"', 0.0) for g in range(3)],
    )
    _gauge(
        lines,
        "python_gc_collections_total",
        "Number of times this generation was collected",
        [(f'generation="{g}"', 1234.0 // (g + 1)) for g in range(3)],
    )
    _gauge(
        lines,
        "python_info",
        "Python platform information",
        [('implementation="CPython",major="3",minor="12",patchlevel="11",version="3.12.11"', 1.0)],
    )
    for name, help_, value in (
        ("process_virtual_memory_bytes", "Virtual memory size in bytes.", 9.3e10),
        ("process_resident_memory_bytes", "Resident memory size in bytes.", 4.1e9),
        ("process_start_time_seconds", "Start time of the process since unix epoch in seconds.", 1.7316e9),
        ("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", 8123.4),
        ("process_open_fds", "Number of open file descriptors.", 187.0),
        ("process_max_fds", "Maximum number of open file descriptors.", 1048576.0),
    ):
        _gauge(lines, name, help_, [("", value)])
    http_samples = [(f'handler="{h}",method="{_method(h)}",status="2xx"', 1000.0) for h in _HANDLERS]
    _counter(lines, "http_requests", "Total number of requests by method, status and handler.", http_samples)
    for name, help_ in (
        ("http_request_size_bytes", "Content length of incoming requests by handler."),
        ("http_response_size_bytes", "Content length of outgoing responses by handler."),
    ):
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} summary"]
        for h in _HANDLERS:
            lines += [f'{name}_count{{handler="{h}"}} 1000.0', f'{name}_sum{{handler="{h}"}} 2.5e+06']
        lines += [f"# HELP {name}_created {help_}", f"# TYPE {name}_created gauge"]
        lines += [f'{name}_created{{handler="{h}"}} 1.7316e+09' for h in _HANDLERS]
    for h in _HANDLERS:
        method = _method(h)
        _histogram(
            lines,
            "http_request_duration_seconds",
            "Latency with only few buckets by handler.",
            f'handler="{h}",method="{method}"',
            _HTTP_COARSE,
            1000,
        )
    _histogram(
        lines,
        "http_request_duration_highr_seconds",
        "Latency with many buckets but no API specific labels.",
        "",
        _HTTP,
        4000,
    )
    # vLLM's own families.
    _gauge(
        lines,
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        [(_ENGINE, float(running))],
    )
    _gauge(
        lines,
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        [(_ENGINE, float(waiting))],
    )
    _gauge(
        lines,
        "vllm:engine_sleep_state",
        "Engine sleep state; awake = 0 means engine is sleeping; "
        "awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; "
        "discard_all = 1 means sleep level 2.",
        [
            (f'{_ENGINE},sleep_state="{s}"', 1.0 if s == "awake" else 0.0)
            for s in ("awake", "weights_offloaded", "discard_all")
        ],
    )
    _gauge(lines, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", [(_ENGINE, kv)])
    for name, help_ in (
        ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."),
        ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
        (
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, "
            "in terms of number of queried tokens.",
        ),
        (
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, "
            "in terms of number of cached tokens.",
        ),
        ("vllm:mm_cache_queries", "Multi-modal cache queries, in terms of number of queried items."),
        ("vllm:mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items."),
        ("vllm:num_preemptions", "Cumulative number of preemption from the engine."),
        ("vllm:prompt_tokens", "Number of prefill tokens processed."),
        ("vllm:generation_tokens", "Number of generation tokens processed."),
    ):
        _counter(lines, name, help_, [(_ENGINE, 1234567.0)])
    _counter(
        lines,
        "vllm:request_success",
        "Count of successfully processed requests.",
        [(f'{_ENGINE},finished_reason="{r}"', 1000.0) for r in ("stop", "length", "abort", "error")],
    )
    for name, help_, buckets in (
        ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", _TOKENS),
        ("vllm:request_generation_tokens", "Number of generation tokens processed.", _TOKENS),
        ("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", _ITERATION),
        (
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            _TOKENS,
        ),
        ("vllm:request_params_n", "Histogram of the n request parameter.", _N),
        ("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", _TOKENS),
        ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", _TTFT),
        (
            "vllm:time_per_output_token_seconds",
            "DEPRECATED: Use vllm:inter_token_latency_seconds instead. "
            "Histogram of time per output token in seconds.",
            _ITL,
        ),
        ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", _ITL),
        (
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            _ITL,
        ),
        ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", _LATENCY),
        (
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            _LATENCY,
        ),
        (
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            _LATENCY,
        ),
        (
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            _LATENCY,
        ),
        (
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            _LATENCY,
        ),
    ):
        _histogram(lines, name, help_, _ENGINE, buckets, 1000)
    cache_labels = (
        'block_size="16",cache_dtype="auto",calculate_kv_scales="False",cpu_offload_gb="0",'
        'enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.9",is_attention_free="False",'
        'num_cpu_blocks="None",num_gpu_blocks="29127",num_gpu_blocks_override="None",'
        'prefix_caching_hash_algo="sha256",sliding_window="None",swap_space="4",'
        'swap_space_bytes="4294967296"'
    )
    _gauge(lines, "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", [(cache_labels, 1.0)])
    _gauge(
        lines,
        "vllm:lora_requests_info",
        "Running stats on lora requests.",
        [('max_lora="0",running_lora_adapters="",waiting_lora_adapters=""', 1.7316e9)],
    )
    return ("\n".join(lines) + "\n").encode()


def only_families(text: bytes, query: str) -> bytes:
    """`text` as a prometheus-client server answers `?name[]=...` (`query`): parsed, and rendered
    again by prometheus-client's own exposition from a registry restricted to those names, which
    is what vLLM's /metrics (prometheus-client's ASGI app on its global registry, which knows its
    collectors' names) returns for such a query."""
    from urllib.parse import parse_qs

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families = list(text_string_to_metric_families(text.decode()))

    class _Page:
        def collect(self) -> list[Any]:
            return families

    registry = CollectorRegistry(auto_describe=True)  # as prometheus-client's global REGISTRY
    registry.register(_Page())
    return generate_latest(registry.restricted_registry(parse_qs(query).get("name[]", [])))
