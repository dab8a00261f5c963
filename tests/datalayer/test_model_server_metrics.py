"""Parsing model servers' Prometheus text into snapshots."""

from __future__ import annotations

import pytest

from epp.datalayer.model_server_metrics import (
    DEFAULT_ENGINES,
    SGLANG,
    TRITON,
    TRITON_TENSORRT_LLM,
    TRTLLM_SERVE,
    VLLM,
    MetricOverrides,
    MetricSpec,
    build_engine_table,
    names_for_engine,
    parse_metric_spec,
    parse_metrics,
)
from epp.errors import MetricsParseError

VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B"} 7.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B"} 0.42
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql,chat",waiting_lora_adapters=""} 1.7e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters="x"} 1.6e+09
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="27000"} 1.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_count{model_name="m"} 0.0
"""


def test_vllm_snapshot() -> None:
    m = parse_metrics(VLLM_TEXT, VLLM, now=12.5)
    assert (m.waiting_queue_size, m.running_requests, m.kv_cache_usage) == (7, 3, 0.42)
    assert m.running_loras == {"sql", "chat"} and m.waiting_loras == frozenset() and m.max_loras == 4
    assert (m.block_size, m.num_gpu_blocks, m.updated_at) == (16, 27000, 12.5)


def test_a_data_parallel_pod_adds_its_engines_requests_and_averages_their_kv_use() -> None:
    """vLLM with several data-parallel engines reports a series each: the pod's queue is theirs
    together, its KV use their mean (a sum would read 1.1 as full, and the pod as saturated)."""
    text = (
        'vllm:num_requests_waiting{engine="0"} 2\nvllm:num_requests_waiting{engine="1"} 3\n'
        'vllm:num_requests_running{engine="0"} 4\nvllm:num_requests_running{engine="1"} 4\n'
        'vllm:kv_cache_usage_perc{engine="0"} 0.6\nvllm:kv_cache_usage_perc{engine="1"} 0.5\n'
    )
    m = parse_metrics(text, VLLM, now=1)
    assert (m.waiting_queue_size, m.running_requests) == (5, 8)
    assert m.kv_cache_usage == pytest.approx(0.55)


def test_older_vllm_gpu_cache_name() -> None:
    text = VLLM_TEXT.replace("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    assert parse_metrics(text, VLLM, now=1).kv_cache_usage == 0.42


def test_sglang_names_by_engine_label() -> None:
    text = "sglang:num_queue_reqs 4\nsglang:num_running_reqs 2\nsglang:token_usage 0.5\n"
    m = parse_metrics(text, names_for_engine("sglang"), now=1)
    assert (m.waiting_queue_size, m.running_requests, m.kv_cache_usage) == (4, 2, 0.5)
    assert names_for_engine(None) is VLLM and names_for_engine("SGLang") is SGLANG


@pytest.mark.parametrize(
    "text", ["", "# nothing here\n", "other_metric 1\n", "vllm:num_requests_waiting{ 1\n"]
)
def test_unusable_text_is_an_error(text: str) -> None:
    with pytest.raises(MetricsParseError):
        parse_metrics(text, VLLM, now=1)


@pytest.mark.parametrize("value", ["NaN", "+Inf", "-Inf"])
def test_non_finite_values_are_rejected_not_passed_to_scorers(value: str) -> None:
    text = VLLM_TEXT.replace(
        'model_name="meta-llama/Llama-3.1-8B"} 0.42', f'model_name="meta-llama/Llama-3.1-8B"}} {value}'
    )
    with pytest.raises(MetricsParseError, match="kv_cache_usage_perc"):
        parse_metrics(text, VLLM, now=1)


def test_odd_values_give_a_sane_snapshot() -> None:
    """A negative series does not cancel another engine's load (a pod with one engine full read as
    empty); sums too large for a count are capped, not an OverflowError the scraper cannot read;
    a LoRA series whose value is NaN does not hide the real one after it."""
    text = (
        'vllm:num_requests_waiting{engine="0"} -50\nvllm:num_requests_waiting{engine="1"} 3\n'
        'vllm:num_requests_running{engine="0"} 1e308\nvllm:num_requests_running{engine="1"} 1e308\n'
        'vllm:kv_cache_usage_perc{engine="0"} -5\nvllm:kv_cache_usage_perc{engine="1"} 0.95\n'
        'vllm:lora_requests_info{max_lora="9",running_lora_adapters="stale",waiting_lora_adapters=""} NaN\n'
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql",waiting_lora_adapters=""} 1.7e9\n'
    )
    m = parse_metrics(text, VLLM, now=1)
    assert m.waiting_queue_size == 3 and m.running_requests == 1_000_000_000
    assert m.kv_cache_usage == pytest.approx(0.475)
    assert (m.running_loras, m.max_loras) == ({"sql"}, 2)


@pytest.mark.parametrize("blank", ["\r\n", "   \n", "\t\n"])
def test_a_blank_line_inside_a_family_does_not_end_it(blank: str) -> None:
    """As prometheus_client reads it: a CRLF page's empty line, or a line of blanks, between two
    series of one family leaves both counted."""
    nl = "\r\n" if blank == "\r\n" else "\n"
    text = f'vllm:num_requests_waiting{{e="0"}} 1{nl}{blank}vllm:num_requests_waiting{{e="1"}} 2{nl}'
    assert parse_metrics(text, VLLM, now=1).waiting_queue_size == 3


def test_absurd_label_values_do_not_break_the_snapshot() -> None:
    text = VLLM_TEXT.replace('num_gpu_blocks="27000"', 'num_gpu_blocks="inf"')
    assert parse_metrics(text, VLLM, now=1).num_gpu_blocks is None


# --- metric specs and engine mappings (the Go core-metrics-extractor's) ---------------------------


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("vllm:num_requests_waiting", MetricSpec("vllm:num_requests_waiting")),
        (' q { tier = "gold" } ', MetricSpec("q", (("tier", "gold"),))),
        ("q{tier=gold,zone=a}", MetricSpec("q", (("tier", "gold"), ("zone", "a")))),
        ("q{}", MetricSpec("q")),
    ],
)
def test_metric_specs_as_go_reads_them(text: str, spec: MetricSpec) -> None:
    assert parse_metric_spec(text) == spec


@pytest.mark.parametrize("text", ["", "9lives", "q{tier}", "q{tier=gold", "q{tier=gold,}", "a b"])
def test_bad_metric_specs_are_errors(text: str) -> None:
    with pytest.raises(ValueError, match="metric specification"):
        parse_metric_spec(text)


def test_label_selected_series_and_gauge_cache_info() -> None:
    text = (
        'nv_trt_llm_request_metrics{model="m",request_type="waiting"} 5\n'
        'nv_trt_llm_request_metrics{model="m",request_type="scheduled"} 3\n'
        'nv_trt_llm_request_metrics{model="m",request_type="context"} 99\n'
        'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"} 0.25\n'
        'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per"} 32\n'
        'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max"} 1000\n'
    )
    m = parse_metrics(text, TRITON_TENSORRT_LLM, now=1)
    assert (m.waiting_queue_size, m.running_requests, m.kv_cache_usage) == (5, 3, 0.25)
    assert (m.block_size, m.num_gpu_blocks) == (32, 1000)
    trt = "trtllm_num_requests_waiting 1\ntrtllm_kv_cache_tokens_per_block 64\ntrtllm_kv_cache_max_blocks 8\n"
    m = parse_metrics(trt, TRTLLM_SERVE, now=1)
    assert (m.waiting_queue_size, m.block_size, m.num_gpu_blocks) == (1, 64, 8)


def test_sglang_cache_info_uses_its_own_label_names() -> None:
    text = 'sglang:num_queue_reqs 1\nsglang:cache_config_info{page_size="1",num_pages="50000"} 1\n'
    m = parse_metrics(text, SGLANG, now=1)
    assert (m.block_size, m.num_gpu_blocks) == (1, 50000)


def test_the_engine_comes_from_the_pod_label_else_the_default_engine() -> None:
    assert DEFAULT_ENGINES.for_labels({}) is VLLM
    assert DEFAULT_ENGINES.for_labels({"llm-d.ai/engine-type": "sglang"}) is SGLANG
    assert DEFAULT_ENGINES.for_labels({"inference.networking.k8s.io/engine-type": "sglang"}) is SGLANG
    assert DEFAULT_ENGINES.for_labels({"llm-d.ai/engine-type": "tgi"}) is VLLM  # unknown: the default
    table = build_engine_table(default_engine="sglang", label_key="engine")
    # An SGLang pool without the label is read with SGLang's names.
    assert table.for_labels({}) is SGLANG and table.for_labels({"engine": "vllm"}) is VLLM
    assert table.for_labels({"llm-d.ai/engine-type": "vllm"}) is SGLANG  # the configured key only


def test_engine_configs_replace_a_mapping_whole_and_add_engines() -> None:
    table = build_engine_table(
        [
            {"name": "vllm", "queuedRequestsSpec": "vllm:num_requests_waiting"},
            {"name": "tgi", "queuedRequestsSpec": "tgi_queue_size", "kvUsageSpec": "tgi_kv{kind=used}"},
        ],
        default_engine="tgi",
    )
    assert table.engines["vllm"].running == () and table.engines["vllm"].lora_info is None
    text = 'tgi_queue_size 4\ntgi_kv{kind="used"} 0.5\ntgi_kv{kind="free"} 0.5\n'
    m = parse_metrics(text, table.for_labels({}), now=1)
    assert (m.waiting_queue_size, m.running_requests, m.kv_cache_usage) == (4, 0, 0.5)
    with pytest.raises(ValueError, match="defaultEngine 'nope' not found"):
        build_engine_table(default_engine="nope")
    with pytest.raises(ValueError, match="already exists"):
        build_engine_table([{"name": "a"}, {"name": "a"}])


def test_metric_flags_override_the_built_in_names_and_yield_to_the_config() -> None:
    flags = MetricOverrides(waiting='my_queue{tier="gold"}', kv_usage="my_kv")
    table = build_engine_table(overrides=flags)
    text = 'my_queue{tier="gold"} 2\nmy_queue{tier="free"} 40\nmy_kv 0.3\nvllm:num_requests_running 1\n'
    m = parse_metrics(text, table.for_labels({}), now=1)
    assert (m.waiting_queue_size, m.running_requests, m.kv_cache_usage) == (2, 1, 0.3)
    assert table.engines["sglang"].waiting == (MetricSpec("my_queue", (("tier", "gold"),)),)
    # An engineConfigs entry wins over the flags (config > flags > defaults, as in Go).
    configured = build_engine_table([{"name": "vllm", "queuedRequestsSpec": "cfg_queue"}], overrides=flags)
    assert configured.engines["vllm"].waiting == (MetricSpec("cfg_queue"),)
    with pytest.raises(ValueError, match="--total-running-requests-metric: not a valid metric specification"):
        build_engine_table(overrides=MetricOverrides(running="bad{"))


def test_triton_counters_are_read_by_the_name_the_page_gives() -> None:
    # prometheus-client calls the samples of counter `x` `x_total`; Go's parser, whose specs these
    # are, keeps `x`. A spec given twice (queue and running) is counted once for each.
    text = (
        "# TYPE nv_inference_pending_request_count gauge\n"
        'nv_inference_pending_request_count{model="a"} 3\nnv_inference_pending_request_count{model="b"} 1\n'
        "# TYPE nv_inference_exec_count counter\n"
        'nv_inference_exec_count{model="a"} 12\n'
    )
    m = parse_metrics(text, TRITON, now=1)
    assert (m.waiting_queue_size, m.running_requests) == (4, 12)
    same = build_engine_table([{"name": "x", "queuedRequestsSpec": "q", "runningRequestsSpec": "q"}], "x")
    assert parse_metrics("q 5\n", same.default, now=1).running_requests == 5
