"""Parsing model servers' Prometheus text into snapshots."""

from __future__ import annotations

import pytest

from epp.datalayer.model_server_metrics import SGLANG, VLLM, names_for_engine, parse_metrics
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


def test_absurd_label_values_do_not_break_the_snapshot() -> None:
    text = VLLM_TEXT.replace('num_gpu_blocks="27000"', 'num_gpu_blocks="inf"')
    assert parse_metrics(text, VLLM, now=1).num_gpu_blocks is None
