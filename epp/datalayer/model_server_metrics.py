"""Read a model server's Prometheus text into an EndpointMetrics snapshot.

The text is parsed by prometheus-client's parser. vLLM's /metrics is large (histograms for every
latency), and the parser is slow in Python, so lines are first narrowed to the few families epp
reads: a cheap byte-prefix test that keeps the parse proportional to what is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from epp.errors import MetricsParseError
from epp.framework import EndpointMetrics


@dataclass(frozen=True)
class MetricNames:
    """Which series hold each value, per engine (pod label llm-d.ai/engine-type)."""

    waiting: tuple[str, ...]
    running: tuple[str, ...]
    kv_usage: tuple[str, ...]
    lora_info: str | None = None
    cache_config: str | None = None

    def all_names(self) -> tuple[str, ...]:
        extra = tuple(n for n in (self.lora_info, self.cache_config) if n)
        return self.waiting + self.running + self.kv_usage + extra

    def line_prefixes(self) -> tuple[str, ...]:
        """Lines worth handing to the parser: the samples and TYPE/HELP of the families read."""
        names = self.all_names()
        return names + tuple(f"# TYPE {n}" for n in names) + tuple(f"# HELP {n}" for n in names)


VLLM = MetricNames(
    waiting=("vllm:num_requests_waiting",),
    running=("vllm:num_requests_running",),
    # Newer vLLM renamed gpu_cache_usage_perc; either is accepted, the newer wins.
    kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    lora_info="vllm:lora_requests_info",
    cache_config="vllm:cache_config_info",
)
SGLANG = MetricNames(
    waiting=("sglang:num_queue_reqs",),
    running=("sglang:num_running_reqs",),
    kv_usage=("sglang:token_usage",),
)
ENGINES = {"vllm": VLLM, "sglang": SGLANG}
ENGINE_LABEL = "llm-d.ai/engine-type"


def names_for_engine(engine: str | None) -> MetricNames:
    return ENGINES.get((engine or "vllm").lower(), VLLM)


# Per engine, computed once: names read and the line prefixes that keep them.
_WANTED = {id(n): (frozenset(n.all_names()), n.line_prefixes()) for n in (VLLM, SGLANG)}


def _wanted(names: MetricNames) -> tuple[frozenset[str], tuple[str, ...]]:
    cached = _WANTED.get(id(names))
    return cached if cached is not None else (frozenset(names.all_names()), names.line_prefixes())


def _keep_lines(text: str, prefixes: tuple[str, ...]) -> str:
    return "\n".join(line for line in text.splitlines() if line.startswith(prefixes)) + "\n"


def _split_adapters(value: str) -> frozenset[str]:
    return frozenset(a for a in (s.strip() for s in value.split(",")) if a)


def parse_metrics(text: str, names: MetricNames, now: float) -> EndpointMetrics:
    """Build a snapshot from Prometheus text. Raises MetricsParseError when nothing usable is there."""
    wanted, prefixes = _wanted(names)
    try:
        families = list(text_string_to_metric_families(_keep_lines(text, prefixes)))
    except Exception as exc:  # the parser raises ValueError and others on malformed text
        raise MetricsParseError(f"bad Prometheus text: {exc}") from None
    values: dict[str, float] = {}
    lora_best: tuple[float, dict[str, str]] | None = None
    cache_labels: dict[str, str] | None = None
    for family in families:
        for sample in family.samples:
            if sample.name == names.lora_info:
                if lora_best is None or sample.value > lora_best[0]:
                    lora_best = (sample.value, sample.labels)
            elif sample.name == names.cache_config:
                cache_labels = sample.labels
            elif sample.name in wanted:
                if not math.isfinite(sample.value):  # NaN/inf would poison every score
                    raise MetricsParseError(f"{sample.name} is {sample.value}")
                # Several series (e.g. per model_name label): sum them, as a pod serves them all.
                values[sample.name] = values.get(sample.name, 0.0) + sample.value

    def first(candidates: tuple[str, ...]) -> float | None:
        for name in candidates:
            if name in values:
                return values[name]
        return None

    waiting, running, kv = first(names.waiting), first(names.running), first(names.kv_usage)
    if waiting is None and running is None and kv is None:
        raise MetricsParseError("no queue, running or KV-cache metric found")
    running_loras: frozenset[str] = frozenset()
    waiting_loras: frozenset[str] = frozenset()
    max_loras = 0
    if lora_best is not None:
        labels = lora_best[1]
        running_loras = _split_adapters(labels.get("running_lora_adapters", ""))
        waiting_loras = _split_adapters(labels.get("waiting_lora_adapters", ""))
        max_loras = _int_or(labels.get("max_lora"), 0) or 0
    block_size = num_blocks = None
    if cache_labels is not None:
        block_size = _int_or(cache_labels.get("block_size"), None)
        num_blocks = _int_or(cache_labels.get("num_gpu_blocks"), None)
    return EndpointMetrics(
        waiting_queue_size=int(waiting or 0),
        running_requests=int(running or 0),
        kv_cache_usage=min(max(float(kv or 0.0), 0.0), 1.0),
        running_loras=running_loras,
        waiting_loras=waiting_loras,
        max_loras=max_loras,
        block_size=block_size,
        num_gpu_blocks=num_blocks,
        updated_at=now,
    )


def _int_or(value: str | None, default: int | None) -> int | None:
    try:
        return int(float(value)) if value not in (None, "", "None") else default
    except (ValueError, OverflowError):
        return default
