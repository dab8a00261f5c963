"""Read a model server's Prometheus text into an EndpointMetrics snapshot.

Which series hold each value depends on the engine, as in the Go EPP's `core-metrics-extractor`
(llm-d-router `pkg/epp/framework/plugins/datalayer/extractor/metrics`): built-in mappings for
vLLM, SGLang, trtllm-serve, Triton with TensorRT-LLM and plain Triton; the engine is the pod label
`llm-d.ai/engine-type` (or the older `inference.networking.k8s.io/engine-type`), and a pod
without it, or with an engine that has no mapping, is read with the default engine's (vLLM unless
the config's `defaultEngine` says otherwise). Each value is a metric spec in PromQL selector form,
`name` or `name{label="value",...}`; the config's `engineConfigs` and the Go `*-metric` flags
replace them (`build_engine_table`).

vLLM's /metrics is large (histograms for every latency: 40-60 kB and 450-630 lines for one model,
about 280 kB with eight data-parallel engines) and epp reads five of its families, so a page is
read as it arrives (`PageReader`): each family is searched for until its lines are over, only
those lines are decoded and parsed, into running sums; the rest is never kept. The scraper keeps
where each family was in an endpoint's last page, and the next search starts there; a sample
line seen before is not parsed again (a pod's next page repeats most of them). A realistic 59 kB
page (`epp_bench.perf.vllm_page`) costs about 18 µs on the 2-core development machine (57 µs
without those two), where prometheus-client's parser takes 22 ms on the whole of it; a hostile
page costs time in proportion to its bytes, in small slices, with bounded memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any
from urllib.parse import quote

from epp.errors import MetricsParseError
from epp.framework import EndpointMetrics

ENGINE_LABEL = "llm-d.ai/engine-type"
# The Gateway API Inference Extension's label, still read when the llm-d one is absent (as Go does).
LEGACY_ENGINE_LABEL = "inference.networking.k8s.io/engine-type"
DEFAULT_ENGINE = "vllm"
# The Go extractor registers the default engine's mapping under this name; a config may not use it.
RESERVED_ENGINE_NAME = "default"

# --- metric specs ------------------------------------------------------------------------------

_METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SPEC_RE = re.compile(rf"^\s*({_METRIC_NAME})\s*(?:\{{([^}}]*)\}})?\s*$")
_LABEL_PAIR_RE = re.compile(r'^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*(?:"([^"]*)"|([^",}\s]+))\s*$')


@dataclass(frozen=True)
class MetricSpec:
    """One series selector: a metric name and labels the series must carry with these values."""

    name: str
    labels: tuple[tuple[str, str], ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels)

    def __str__(self) -> str:
        if not self.labels:
            return self.name
        return self.name + "{" + ",".join(f'{k}="{v}"' for k, v in self.labels) + "}"


def parse_metric_spec(text: str) -> MetricSpec:
    """`name` or `name{label="value",...}` (quotes optional), as the Go EPP reads its `*Spec`
    parameters and `*-metric` flags. Raises ValueError naming the spec."""
    m = _SPEC_RE.match(text)
    if m is None:
        raise ValueError(f'not a valid metric specification: {text!r} (use name or name{{label="value"}})')
    labels: list[tuple[str, str]] = []
    block = (m.group(2) or "").strip()
    if block:
        for pair in block.split(","):
            lm = _LABEL_PAIR_RE.match(pair)
            if lm is None:
                raise ValueError(f"invalid label pair {pair.strip()!r} in metric specification {text!r}")
            labels.append((lm.group(1), lm.group(2) if lm.group(2) is not None else lm.group(3)))
    return MetricSpec(m.group(1), tuple(labels))


def _spec(text: str) -> MetricSpec:
    return parse_metric_spec(text)


# --- one engine's mapping ------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricNames:
    """Which series hold each value for one engine. A value with no spec is not read (it stays 0);
    several specs for one value are tried in order (vLLM renamed its KV-cache metric)."""

    waiting: tuple[MetricSpec, ...]
    running: tuple[MetricSpec, ...]
    kv_usage: tuple[MetricSpec, ...]
    lora_info: MetricSpec | None = None
    # An info-style gauge whose labels carry the KV block size and the number of blocks ...
    cache_info: MetricSpec | None = None
    block_size_label: str = "block_size"
    num_blocks_label: str = "num_gpu_blocks"
    # ... or, for engines that export them as values, one gauge each.
    block_size: MetricSpec | None = None
    num_blocks: MetricSpec | None = None
    # Go's `customMetrics` (attribute key -> spec): parsed and checked; no epp plugin reads them.
    custom: tuple[tuple[str, MetricSpec], ...] = field(default=(), compare=False)

    def specs(self) -> tuple[MetricSpec, ...]:
        single = (self.lora_info, self.cache_info, self.block_size, self.num_blocks)
        return self.waiting + self.running + self.kv_usage + tuple(s for s in single if s is not None)

    def all_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.name for s in self.specs()))

    @cached_property
    def wanted(self) -> frozenset[str]:
        return frozenset(self.all_names())

    @cached_property
    def read_plan(self) -> _ReadPlan:
        """What a PageReader looks for, worked out once per mapping (not hashed per poll)."""
        return _plan(self)

    @cached_property
    def families_query(self) -> str:
        """The query that asks a Prometheus client library for these families alone (`name[]`,
        which prometheus-client's exposition honours on its default registry, as vLLM serves it)."""
        return "&".join(f"name%5B%5D={quote(n, safe=':')}" for n in self.all_names())

    @cached_property
    def line_prefixes(self) -> tuple[str, ...]:
        """Lines worth handing to the parser: the samples and TYPE/HELP of the families read."""
        names = self.all_names()
        return names + tuple(f"# TYPE {n}" for n in names) + tuple(f"# HELP {n}" for n in names)


VLLM = MetricNames(
    waiting=(_spec("vllm:num_requests_waiting"),),
    running=(_spec("vllm:num_requests_running"),),
    # Newer vLLM renamed gpu_cache_usage_perc; either is accepted, the newer wins.
    kv_usage=(_spec("vllm:kv_cache_usage_perc"), _spec("vllm:gpu_cache_usage_perc")),
    lora_info=_spec("vllm:lora_requests_info"),
    cache_info=_spec("vllm:cache_config_info"),
)
SGLANG = MetricNames(
    waiting=(_spec("sglang:num_queue_reqs"),),
    running=(_spec("sglang:num_running_reqs"),),
    kv_usage=(_spec("sglang:token_usage"),),
    cache_info=_spec("sglang:cache_config_info"),
    block_size_label="page_size",
    num_blocks_label="num_pages",
)
TRTLLM_SERVE = MetricNames(
    waiting=(_spec("trtllm_num_requests_waiting"),),
    running=(_spec("trtllm_num_requests_running"),),
    kv_usage=(_spec("trtllm_kv_cache_utilization"),),
    block_size=_spec("trtllm_kv_cache_tokens_per_block"),
    num_blocks=_spec("trtllm_kv_cache_max_blocks"),
)
TRITON_TENSORRT_LLM = MetricNames(
    waiting=(_spec("nv_trt_llm_request_metrics{request_type=waiting}"),),
    running=(_spec("nv_trt_llm_request_metrics{request_type=scheduled}"),),
    kv_usage=(_spec("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}"),),
    block_size=_spec("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}"),
    num_blocks=_spec("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}"),
)
# Triton Inference Server for non-LLM models (no KV cache).
TRITON = MetricNames(
    waiting=(_spec("nv_inference_pending_request_count"),),
    running=(_spec("nv_inference_exec_count"),),
    kv_usage=(),
)
BUILTIN_ENGINES: Mapping[str, MetricNames] = {
    "vllm": VLLM,
    "sglang": SGLANG,
    "trtllm-serve": TRTLLM_SERVE,
    "triton-tensorrt-llm": TRITON_TENSORRT_LLM,
    "triton": TRITON,
}
# Kept for callers that know the two engines epp started with.
ENGINES = BUILTIN_ENGINES


# --- the engine table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineTable:
    """Every engine's mapping, the default one, and the pod label naming an endpoint's engine."""

    engines: Mapping[str, MetricNames]
    default_engine: str = DEFAULT_ENGINE
    label_key: str = ENGINE_LABEL

    @property
    def default(self) -> MetricNames:
        return self.engines[self.default_engine]

    def lookup(self, engine: str | None) -> MetricNames:
        """The mapping of an engine name; a missing or unknown one gets the default engine's.
        Built-in names also match case-insensitively (`SGLang`)."""
        if engine:
            names = self.engines.get(engine) or self.engines.get(engine.lower())
            if names is not None:
                return names
        return self.default

    def for_labels(self, labels: Mapping[str, str]) -> MetricNames:
        return self.lookup(labels.get(self.label_key) or labels.get(LEGACY_ENGINE_LABEL))


DEFAULT_ENGINES = EngineTable(BUILTIN_ENGINES)


def names_for_engine(engine: str | None) -> MetricNames:
    """The built-in mapping for an engine label value (vLLM's when absent or unknown)."""
    return DEFAULT_ENGINES.lookup(engine)


@dataclass(frozen=True)
class MetricOverrides:
    """The Go EPP's `--total-queued-requests-metric`, `--total-running-requests-metric`,
    `--kv-cache-usage-percentage-metric`, `--lora-info-metric` and `--cache-info-metric`, each a
    spec or None (not given)."""

    waiting: str | None = None
    running: str | None = None
    kv_usage: str | None = None
    lora_info: str | None = None
    cache_info: str | None = None

    def given(self) -> bool:
        return any(
            v is not None
            for v in (self.waiting, self.running, self.kv_usage, self.lora_info, self.cache_info)
        )

    def apply(self, names: MetricNames) -> MetricNames:
        """`names` with every given flag's spec in place of the engine's own."""
        changes: dict[str, Any] = {}
        for attr, flag in (
            ("waiting", "total-queued-requests-metric"),
            ("running", "total-running-requests-metric"),
            ("kv_usage", "kv-cache-usage-percentage-metric"),
        ):
            text = getattr(self, attr)
            if text is not None:
                changes[attr] = (_flag_spec(flag, text),)
        if self.lora_info is not None:
            changes["lora_info"] = _flag_spec("lora-info-metric", self.lora_info)
        if self.cache_info is not None:
            changes["cache_info"] = _flag_spec("cache-info-metric", self.cache_info)
        return replace(names, **changes) if changes else names


def _flag_spec(flag: str, text: str) -> MetricSpec:
    try:
        return parse_metric_spec(text)
    except ValueError as exc:
        raise ValueError(f"--{flag}: {exc}") from None


# Go's engineConfigs fields: (config key, MetricNames attribute).
ENGINE_CONFIG_SPECS = (
    ("queuedRequestsSpec", "waiting"),
    ("runningRequestsSpec", "running"),
    ("kvUsageSpec", "kv_usage"),
    ("loraSpec", "lora_info"),
    ("cacheInfoSpec", "cache_info"),
    ("cacheBlockSizeSpec", "block_size"),
    ("cacheNumBlocksSpec", "num_blocks"),
)
ENGINE_CONFIG_LABELS = (
    ("cacheBlockSizeLabelName", "block_size_label"),
    ("cacheNumBlocksLabelName", "num_blocks_label"),
)
ENGINE_CONFIG_FIELDS = (
    "name",
    *(k for k, _ in ENGINE_CONFIG_SPECS),
    *(k for k, _ in ENGINE_CONFIG_LABELS),
    "customMetrics",
)
_TUPLE_ATTRS = frozenset({"waiting", "running", "kv_usage"})


def engine_from_config(config: Mapping[str, Any]) -> MetricNames:
    """One `engineConfigs` entry (Go field names; a spec left out or empty is not read), as the
    Go extractor builds it. Raises ValueError naming what is wrong."""
    name = config.get("name")
    values: dict[str, Any] = {}
    errors: list[str] = []
    for key, attr in ENGINE_CONFIG_SPECS:
        text = config.get(key) or ""
        spec: MetricSpec | None = None
        if text:
            try:
                spec = parse_metric_spec(text)
            except ValueError as exc:
                errors.append(f"{key}: {exc}")
        if attr in _TUPLE_ATTRS:
            values[attr] = (spec,) if spec is not None else ()
        else:
            values[attr] = spec
    for key, attr in ENGINE_CONFIG_LABELS:
        values[attr] = config.get(key) or MetricNames.__dataclass_fields__[attr].default
    custom: list[tuple[str, MetricSpec]] = []
    seen: set[str] = set()
    for entry in config.get("customMetrics") or ():
        key = entry.get("attributeKey") or ""
        if not key:
            errors.append("custom metric attributeKey cannot be empty")
            continue
        if key in seen:
            errors.append(f"custom metric attributeKey {key!r} is duplicated")
            continue
        seen.add(key)
        text = entry.get("metricSpec") or ""
        if not text:
            errors.append(f"custom metric {key!r} spec cannot be empty")
            continue
        try:
            custom.append((key, parse_metric_spec(text)))
        except ValueError as exc:
            errors.append(f"custom metric {key!r}: {exc}")
    if errors:
        raise ValueError(f"engine {name!r}: {'; '.join(errors)}")
    return MetricNames(custom=tuple(custom), **values)


def build_engine_table(
    engine_configs: Sequence[Mapping[str, Any]] = (),
    default_engine: str | None = None,
    label_key: str | None = None,
    overrides: MetricOverrides | None = None,
) -> EngineTable:
    """The engines a `core-metrics-extractor`'s parameters describe, over the built-in ones.

    Precedence, lowest first (as the Go EPP ranks its built-in defaults, its deprecated flags and
    the config): the built-in mapping; the `*-metric` flags (`overrides`), which the Go EPP applied
    to every model server it read; an `engineConfigs` entry, which replaces that engine's mapping
    whole. Raises ValueError (an empty or reserved engine name, a bad spec, a `defaultEngine`
    with no mapping)."""
    overrides = overrides or MetricOverrides()
    engines: dict[str, MetricNames] = {}
    for config in engine_configs:
        name = config.get("name") or ""
        if not name:
            raise ValueError("engine config name cannot be empty")
        if name == RESERVED_ENGINE_NAME:
            raise ValueError(f"engine config name cannot be {RESERVED_ENGINE_NAME!r} (reserved)")
        if name in engines:
            raise ValueError(f"mapping for engine type {name!r} already exists")
        engines[name] = engine_from_config(config)
    for name, names in BUILTIN_ENGINES.items():
        if name not in engines:
            engines[name] = overrides.apply(names)
    default = default_engine or DEFAULT_ENGINE
    if default not in engines:
        raise ValueError(
            f"defaultEngine {default!r} not found in engineConfigs (known: {', '.join(engines)})"
        )
    return EngineTable(engines, default, label_key or ENGINE_LABEL)


# --- parsing -------------------------------------------------------------------------------------

# A wanted sample line longer than this is an error (vLLM's longest, the LoRA info gauge with its
# adapter lists, is well under 1 kB); an unwanted one of any length is skipped without keeping it.
MAX_LINE_BYTES = 64 * 1024
# Samples of the families read, per page. vLLM has one per engine and family; Triton one per
# model. More is a page that would cost parse time for nothing.
MAX_SAMPLES = 10_000

# Possessive quantifiers: no backtracking, about four times faster than the plain pattern.
_SAMPLE_RE = re.compile(
    r"([a-zA-Z_:][a-zA-Z0-9_:]*+)"  # the name
    r'(?:[ \t]*+\{((?:[^"}]++|"(?:[^"\\]++|\\.)*+")*+)\}[ \t]*+|[ \t]++)'  # labels; "}" may be quoted
    r"([^ \t]++)"  # the value
    r"(?:[ \t]++-?[0-9]++)?[ \t]*+\r?"  # an optional timestamp
)
_LABEL_RE = re.compile(r'[ \t]*+([a-zA-Z_][a-zA-Z0-9_]*+)[ \t]*+=[ \t]*+"((?:[^"\\]++|\\.)*+)"[ \t]*+(?:,|$)')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
_ESCAPE_RE = re.compile(r"\\.")


# Where a family was in an endpoint's last page is where it is looked for first in the next one,
# from this many bytes before (values change length from poll to poll).
HINT_SLACK_BYTES = 4096
# A page at most this long is compared with the endpoint's last one before it is parsed
# (RepeatAwareReader): the families read alone, filtered by the server, are about 1.3 kB on vLLM.
MEMO_MAX_BYTES = 16 * 1024
# A hints dict holds one offset a family read; past this many (engine mappings changed), it is emptied.
MAX_HINTS = 64


class PageLimitError(MetricsParseError):
    """A page past a limit (size, line length, samples): the scraper backs off from it."""


class NoValuesError(MetricsParseError):
    """A page without any of the queue, running and KV-cache families."""


class HttpStatusError(MetricsParseError):
    """An answer with an HTTP status other than 200 (its body is not read)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


# Label sets parsed, by their text: a pod's label sets (cache_config_info's 15 labels) repeat from
# poll to poll and across pods. Bounded in entries and in each text's length (a longer one, e.g. a
# LoRA info line listing many adapters, is parsed each time); emptied when full. Read only: never
# mutate a result.
_LABEL_CACHE: dict[str, Mapping[str, str]] = {}
_LABEL_CACHE_SIZE = 4096
_LABEL_CACHE_TEXT_CHARS = 2048


# Samples parsed, by their line's bytes: (name, value, label text). A pod's page repeats most of
# the lines epp reads from poll to poll (the info gauges always; every line of an idle pod).
# Bounded in entries and in each key's length; emptied when full. Only valid samples go in.
_SAMPLE_CACHE: dict[bytes, tuple[str, float, str]] = {}
_SAMPLE_CACHE_SIZE = 4096
_SAMPLE_CACHE_LINE_BYTES = 1024


def _cached_labels(text: str, raw_line: bytes) -> Mapping[str, str]:
    labels = _LABEL_CACHE.get(text)
    if labels is None:
        labels = _parse_labels(text, raw_line.decode())
        if len(text) <= _LABEL_CACHE_TEXT_CHARS:
            if len(_LABEL_CACHE) >= _LABEL_CACHE_SIZE:
                _LABEL_CACHE.clear()
            _LABEL_CACHE[text] = labels
    return labels


def _parse_labels(text: str, line: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    at, end = 0, len(text)
    while at < end and not text[at:].isspace():
        m = _LABEL_RE.match(text, at)
        if m is None:
            raise MetricsParseError(f"bad labels in {line[:200]!r}")
        value = m.group(2)
        if "\\" in value:
            value = _ESCAPE_RE.sub(lambda e: _ESCAPES.get(e.group(0), e.group(0)), value)
        labels[m.group(1)] = value
        at = m.end()
    return labels


@dataclass(frozen=True)
class _ReadPlan:
    """What a PageReader for one engine mapping looks for, worked out once per mapping."""

    names: tuple[bytes, ...]  # the families read, as their samples' lines start, in spec order
    specs: tuple[MetricSpec, ...]  # the value specs, each summed in its slot (its position here)
    by_name: Mapping[str, tuple[tuple[int, MetricSpec], ...]]  # each name's value specs and slots
    # The slots of each value's specs, in the order they are tried; the gauges' slots, or None.
    waiting: tuple[int, ...]
    running: tuple[int, ...]
    kv_usage: tuple[int, ...]
    block_size: int | None
    num_blocks: int | None
    label_names: frozenset[str]  # the names whose labels are read
    # A value's later specs are fallbacks (vLLM renamed its KV-cache metric): once an earlier one
    # matched, the later ones' names need not be looked for, unless something else reads them.
    superseded: Mapping[int, frozenset[bytes]]
    by_family: Mapping[bytes, tuple[int, ...]]  # each family's value slots, by its name as bytes


def _plan(names: MetricNames) -> _ReadPlan:
    specs = tuple(
        dict.fromkeys(
            s
            for s in (*names.waiting, *names.running, *names.kv_usage, names.block_size, names.num_blocks)
            if s is not None
        )
    )
    by_name: dict[str, tuple[tuple[int, MetricSpec], ...]] = {}
    for slot, spec in enumerate(specs):
        by_name[spec.name] = (*by_name.get(spec.name, ()), (slot, spec))
    label_names = frozenset(
        s.name
        for s in (*names.specs(), names.lora_info, names.cache_info)
        if s is not None and (s.labels or s is names.lora_info or s is names.cache_info)
    )
    superseded: dict[int, frozenset[bytes]] = {}
    for value in (names.waiting, names.running, names.kv_usage):
        for i, spec in enumerate(value):
            later = {s.name for s in value[i + 1 :]}
            others = [s.name for s in names.specs() if s not in value[i + 1 :]]
            dropped = frozenset(n.encode() for n in later if n not in others)
            if dropped:
                superseded[specs.index(spec)] = dropped

    def slots(value: Iterable[MetricSpec | None]) -> tuple[int, ...]:
        return tuple(specs.index(s) for s in value if s is not None)

    return _ReadPlan(
        names=tuple(n.encode() for n in names.all_names()),
        specs=specs,
        by_name=by_name,
        waiting=slots(names.waiting),
        running=slots(names.running),
        kv_usage=slots(names.kv_usage),
        block_size=specs.index(names.block_size) if names.block_size is not None else None,
        num_blocks=specs.index(names.num_blocks) if names.num_blocks is not None else None,
        label_names=label_names,
        superseded=superseded,
        by_family={n.encode(): tuple(slot for slot, _ in pairs) for n, pairs in by_name.items()},
    )


class PageReader:
    """Reads a Prometheus text page piece by piece, as it arrives, into an EndpointMetrics
    snapshot: `feed(bytes)` as often as needed, then `finish(now)`.

    Only the lines of the families `names` reads are parsed, and the page is searched for each
    family only until its group of lines is over: the text format keeps a family's lines together,
    and the families epp reads are few. Each is looked for with `bytes.find` (C speed; on vLLM's
    page the gauges come first, the info gauges last), its lines parsed, and once the line after
    them is another family's, it is not looked for again; a value's fallback name (vLLM's older
    KV-cache gauge) is not looked for once the newer one was read. Everything else (vLLM's
    histograms, most of its page) is skipped without being decoded or kept. Memory is one partial
    line, never the page; work per chunk is at most one search per family still missing. Sample
    names are matched as the page gives them, as the Go extractor matches them (a counter `x` is
    `x`, not `x_total`). A family whose lines come in two groups (which the format forbids) is
    read from its first (with `hints`, from either: below).

    `hints` (optional, one dict per endpoint, kept from poll to poll) remembers where each family's
    first line was in the endpoint's last page. A model server renders its page the same way
    every time, so the next search for a family starts just before that offset, and a search of
    the whole page (about half the work on vLLM's, where the info gauges come last) is made only
    when the family is not found there. A line found that way is taken as the family's first only
    when the lines before it are not the family's; so a page whose families moved is read right,
    more slowly. (A page that holds a family in two groups, which the format forbids, may then be
    read from either.)

    Raises MetricsParseError for a wanted line that is not a valid sample (or a non-finite value
    of a value read), PageLimitError past `max_line_bytes` or `max_samples`."""

    def __init__(
        self,
        names: MetricNames,
        *,
        max_line_bytes: int = MAX_LINE_BYTES,
        max_samples: int = MAX_SAMPLES,
        hints: dict[bytes, int] | None = None,
    ) -> None:
        self._names = names
        plan = self._plan = names.read_plan
        self._missing = list(plan.names)  # families not read yet, in spec order
        self._open: bytes | None = None  # the family whose lines ran to the last chunk's end
        self._max_line = max_line_bytes
        self._max_samples = max_samples
        self._carry = b""
        self._skipping = False  # inside an over-long unwanted line: drop up to its newline
        self.bytes_read = 0
        self.samples = 0
        self._summed: list[float | None] = [None] * len(plan.specs)  # by slot
        self._series: list[int] = [0] * len(plan.specs)  # the series summed, by slot
        self._lora_best: tuple[float, Mapping[str, str]] | None = None
        self._cache_labels: Mapping[str, str] | None = None
        if hints is not None and len(hints) > MAX_HINTS:
            hints.clear()
        self._hints = hints
        self._base = 0  # the page offset of the data being scanned

    def feed(self, chunk: bytes) -> None:
        start = self.bytes_read
        self.bytes_read += len(chunk)
        if self._skipping:
            nl = chunk.find(b"\n")
            if nl < 0:
                return
            chunk = chunk[nl + 1 :]
            start += nl + 1
            self._skipping = False
        self._base = start - len(self._carry)
        data = self._carry + chunk if self._carry else chunk
        end = data.rfind(b"\n")
        if end < 0:
            self._carry = data
        else:
            if self._missing:
                self._scan(data, end)
            self._carry = data[end + 1 :]
        if len(self._carry) > self._max_line:
            if self._carry.startswith(self._plan.names):
                raise PageLimitError(
                    f"a line of {self._carry[:60]!r}... is longer than {self._max_line} bytes"
                )
            self._carry = b""
            self._skipping = True

    def _scan(self, data: bytes, end: int) -> None:
        """The wanted lines among the complete ones, data[:end] (data starts at a line start)."""
        if self._open is not None:
            name, self._open = self._open, None
            at = _past_comments(data, 0, end)
            if at > end:
                self._open = name  # nothing but comments here: its lines may still go on
                return
            if data.startswith(name, at):
                self._group(data, at, end, name, read=True)
                if self._open is not None:
                    return  # every line here was that family's, and its lines go on
            else:
                self._read(name)  # its lines ended with the last chunk
        for name in tuple(self._missing):
            if name not in self._missing:
                continue  # superseded by a name read above
            at = self._hinted(data, name, end)
            if at < 0 or not self._group(data, at, end, name):
                at = 0 if data.startswith(name) else _line_starting(data, name, 0, end)
                while at >= 0 and not self._group(data, at, end, name):
                    at = _line_starting(data, name, data.find(b"\n", at, end + 1), end)
            if at >= 0 and self._hints is not None:
                self._hints[name] = self._base + at

    def _hinted(self, data: bytes, name: bytes, end: int) -> int:
        """The start of `name`'s first line in data[:end], looked for near where the endpoint's
        last page had it; -1 when there is no hint, or it is not found there for certain."""
        hint = self._hints.get(name) if self._hints is not None else None
        if hint is None or not 0 <= hint - self._base <= end:
            return -1
        at = hint - self._base
        if not (data.startswith(name, at) and (at == 0 or data[at - 1] == _NEWLINE)):
            at = _line_starting(data, name, max(0, at - HINT_SLACK_BYTES - 1), end)
            if at < 0:
                return -1
        # Not the first line if a line of the family comes before it (plain comments between).
        before = at - 1
        while before > 0:
            line = data.rfind(b"\n", 0, before) + 1
            if data.startswith(name, line):
                return -1
            if not data.startswith((b"#", b"\n"), line) or data.startswith((b"# HELP ", b"# TYPE "), line):
                break
            before = line - 1
        return at

    def _group(self, data: bytes, at: int, end: int, name: bytes, read: bool = False) -> bool:
        """Parse the lines from `at` (one that starts with `name`) while they are `name`'s.
        Returns True when the family is read (its lines are over, or run past this chunk)."""
        wanted = name.decode()
        while True:
            nl = data.find(b"\n", at, end + 1)
            parsed = self._line(data[at:nl], wanted)
            if parsed == wanted:
                read = True
            elif read:
                break  # a longer name right after the family: its lines are over
            else:
                return False  # a longer name that starts like this one: look further
            at = _past_comments(data, nl + 1, end)
            if at > end:
                self._open = name  # its lines may go on in the next chunk
                return True
            if not data.startswith(name, at):
                break
        self._read(name)
        return True

    def _read(self, name: bytes) -> None:
        """`name`'s lines are over: stop looking for it, and for the names a value read from it
        makes needless."""
        if name in self._missing:
            self._missing.remove(name)
        for slot in self._plan.by_family.get(name, ()):
            if self._summed[slot] is not None:
                for other in self._plan.superseded.get(slot, ()):
                    if other in self._missing:
                        self._missing.remove(other)

    def _line(self, raw: bytes, family: str) -> str | None:
        """Parse one line that starts with `family`'s name and record it if it is that family's
        sample; returns the sample's name, or None when it is not a sample (a longer name that is
        not a valid one)."""
        sample = _SAMPLE_CACHE.get(raw)
        if sample is None:
            try:
                line = raw.decode()
            except UnicodeDecodeError:
                raise MetricsParseError(f"a line starting {raw[:60]!r} is not UTF-8") from None
            m = _SAMPLE_RE.fullmatch(line)
            if m is None:
                bad = _SPEC_NAME_RE.match(line)
                if bad is not None and bad.group(0) in self._names.wanted:
                    raise MetricsParseError(f"not a valid sample: {line[:200]!r}")
                return None  # a longer name that starts like a wanted one
            if m.group(1) != family:
                return str(m.group(1))  # a longer name: another family (read when looked for)
            try:
                sample = (family, float(m.group(3)), m.group(2) or "")
            except ValueError:
                raise MetricsParseError(f"bad value in {line[:200]!r}") from None
            if len(raw) <= _SAMPLE_CACHE_LINE_BYTES:
                if len(_SAMPLE_CACHE) >= _SAMPLE_CACHE_SIZE:
                    _SAMPLE_CACHE.clear()
                _SAMPLE_CACHE[raw] = sample
        name, value, label_text = sample
        if name != family:
            return name  # a longer name: another family (read, if wanted, when it is looked for)
        self.samples += 1
        if self.samples > self._max_samples:
            raise PageLimitError(f"more than {self._max_samples} samples of the metrics read")
        labels: Mapping[str, str] = (
            _cached_labels(label_text, raw) if label_text and name in self._plan.label_names else {}
        )
        names = self._names
        lora = names.lora_info
        if (
            lora is not None
            and name == lora.name
            and lora.matches(labels)
            and math.isfinite(value)  # a NaN first would never be replaced (nothing is > NaN)
            and (self._lora_best is None or value > self._lora_best[0])
        ):
            self._lora_best = (value, labels)
        cache = names.cache_info
        if cache is not None and name == cache.name and cache.matches(labels):
            self._cache_labels = labels
        summed = self._summed
        for slot, spec in self._plan.by_name.get(name, ()):
            if not spec.labels or spec.matches(labels):
                if not math.isfinite(value):  # NaN/inf would poison every score
                    raise MetricsParseError(f"{spec} is {value}")
                # Counts and usage are never negative: one negative series must not cancel
                # another's load (a pod with one engine full reading as empty).
                summed[slot] = (summed[slot] or 0.0) + max(value, 0.0)
                self._series[slot] += 1
        return name

    def finish(self, now: float) -> EndpointMetrics:
        """The snapshot of everything fed. Raises MetricsParseError when nothing usable was there."""
        if self._carry and not self._skipping:
            carry, self._carry = self._carry, b""
            self._base = self.bytes_read - len(carry)
            self._scan(carry + b"\n", len(carry))
        return self._snapshot(now)

    def found(self) -> frozenset[str]:
        """The families read that had a sample in the page (after `finish`)."""
        plan = self._plan
        found = {spec.name for slot, spec in enumerate(plan.specs) if self._summed[slot] is not None}
        if self._lora_best is not None and self._names.lora_info is not None:
            found.add(self._names.lora_info.name)
        if self._cache_labels is not None and self._names.cache_info is not None:
            found.add(self._names.cache_info.name)
        return frozenset(found)

    def _snapshot(self, now: float) -> EndpointMetrics:
        names, plan, summed = self._names, self._plan, self._summed

        def first(slots: tuple[int, ...], mean: bool = False) -> float | None:
            for slot in slots:
                if (value := summed[slot]) is not None:
                    return value / self._series[slot] if mean else value
            return None

        # Requests add up over a pod's series (its data-parallel engines); a usage fraction does
        # not: the pod's is their mean (the engines' caches are alike).
        waiting, running, kv = first(plan.waiting), first(plan.running), first(plan.kv_usage, mean=True)
        if (
            waiting is None
            and running is None
            and kv is None
            and (names.waiting or names.running or names.kv_usage)
        ):
            raise NoValuesError(
                "no queue, running or KV-cache metric found (looked for "
                + ", ".join(str(s) for s in (*names.waiting, *names.running, *names.kv_usage))
                + ")"
            )
        running_loras: frozenset[str] = frozenset()
        waiting_loras: frozenset[str] = frozenset()
        max_loras = 0
        if self._lora_best is not None:
            labels = self._lora_best[1]
            running_loras = _split_adapters(labels.get("running_lora_adapters", ""))
            waiting_loras = _split_adapters(labels.get("waiting_lora_adapters", ""))
            max_loras = _int_or(labels.get("max_lora"), 0) or 0
        block_size = num_blocks = None
        if self._cache_labels is not None:
            block_size = _int_or(self._cache_labels.get(names.block_size_label), None)
            num_blocks = _int_or(self._cache_labels.get(names.num_blocks_label), None)
        if plan.block_size is not None and (value := summed[plan.block_size]) is not None:
            block_size = _int_or(str(value), None)
        if plan.num_blocks is not None and (value := summed[plan.num_blocks]) is not None:
            num_blocks = _int_or(str(value), None)
        return EndpointMetrics(
            waiting_queue_size=_count(waiting),
            running_requests=_count(running),
            kv_cache_usage=min(max(float(kv or 0.0), 0.0), 1.0),
            running_loras=running_loras,
            waiting_loras=waiting_loras,
            max_loras=max_loras,
            block_size=block_size,
            num_gpu_blocks=num_blocks,
            updated_at=now,
        )


class LastPage:
    """An endpoint's last small page and what it read as (kept from poll to poll by the scraper)."""

    __slots__ = ("found", "metrics", "names", "page")

    def __init__(self) -> None:
        self.page: bytes | None = None
        self.names: MetricNames | None = None
        self.metrics: EndpointMetrics | None = None
        self.found: frozenset[str] = frozenset()


class RepeatAwareReader:
    """A PageReader that does not parse a page again when it is the endpoint's last page, byte
    for byte: the last snapshot is reused with the new time. A page of at most
    `MEMO_MAX_BYTES` (the families epp reads alone, as a filtered scrape returns them: about 1.3
    kB on vLLM) is held until complete and compared in one `==`; an idle model server's is the
    same every poll, so its poll parses nothing. A larger page is handed to the reader as it
    arrives and not remembered (a whole vLLM page changes every poll anyway: its process and
    HTTP counters move). Same interface as PageReader (`feed`, `finish`, `found`, `bytes_read`)."""

    def __init__(self, names: MetricNames, last: LastPage, hints: dict[bytes, int] | None = None) -> None:
        self.names = names  # the engine mapping read (the poll asks for its families)
        self._last = last
        self._hints = hints
        self._reader: PageReader | None = None  # made only for a page that must be parsed
        self._chunks: list[bytes] | None = []  # None: past MEMO_MAX_BYTES, streaming
        self._found: frozenset[str] = frozenset()
        self.bytes_read = 0

    def reset(self) -> None:
        """Ready for the endpoint's next page (with the same names)."""
        self._reader, self._chunks, self._found, self.bytes_read = None, [], frozenset(), 0

    def _parser(self) -> PageReader:
        if self._reader is None:
            self._reader = PageReader(self.names, hints=self._hints)
        return self._reader

    def feed(self, chunk: bytes) -> None:
        self.bytes_read += len(chunk)
        chunks = self._chunks
        if chunks is None:
            self._parser().feed(chunk)
            return
        chunks.append(chunk)
        if self.bytes_read > MEMO_MAX_BYTES:
            self._chunks = None
            reader = self._parser()
            for held in chunks:
                reader.feed(held)

    def finish(self, now: float) -> EndpointMetrics:
        """Raises MetricsParseError as PageReader.finish (and for what `feed` would have raised
        on a held page)."""
        last, chunks = self._last, self._chunks
        if chunks is None:
            last.page = None
            reader = self._parser()
            metrics = reader.finish(now)
            self._found = reader.found()
            return metrics
        page = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if last.metrics is not None and last.page == page and last.names is self.names:
            self._found = last.found
            return last.metrics.stamped(now)  # an idle server's page: every poll
        last.page = None
        reader = self._parser()
        reader.feed(page)
        metrics = reader.finish(now)
        self._found = reader.found()
        last.page, last.names, last.metrics, last.found = page, self.names, metrics, self._found
        return metrics

    def found(self) -> frozenset[str]:
        """The families read that had a sample (after `finish`)."""
        return self._found

    @property
    def remembered(self) -> bool:
        """After a `finish` that returned: the page is the endpoint's `LastPage`, with what it read
        as (it was small enough to be held)."""
        return self._chunks is not None


_SPEC_NAME_RE = re.compile(_METRIC_NAME)
_NEWLINE = ord("\n")
_NO_ADAPTERS: frozenset[str] = frozenset()


def _line_starting(data: bytes, name: bytes, start: int, end: int) -> int:
    """The start of the first line after data[start] (a newline, or 0) and before `end` that
    begins with `name`, or -1."""
    at = data.find(b"\n" + name, start, end)
    return at + 1 if at >= 0 else -1


def _past_comments(data: bytes, at: int, end: int) -> int:
    """The start of the first line from `at` that is neither blank nor a plain comment (a HELP or
    TYPE line starts the next family), or past `end` when there is none before it. A line that
    starts with a blank (a CRLF page's empty line, a line of spaces) counts as blank: it does not
    end the family (a sample written after leading blanks is skipped with it)."""
    while at <= end and data.startswith((b"\n", b"#", b"\r", b" ", b"\t"), at):
        if data.startswith((b"# HELP ", b"# TYPE "), at):
            break
        at = data.find(b"\n", at, end + 1) + 1
    return at


MAX_COUNT = 1_000_000_000  # requests waiting or running: more is a server's bug, not a load


def _count(value: float | None) -> int:
    """A request count from a sum of samples (finite and non-negative each): a sum that overflowed
    to inf, or a 300-digit number, is capped rather than raised from int() (or carried to numpy)."""
    if value is None:
        return 0
    return int(value) if value < MAX_COUNT else MAX_COUNT


def _split_adapters(value: str) -> frozenset[str]:
    if not value:
        return _NO_ADAPTERS
    return frozenset(a for a in (s.strip() for s in value.split(",")) if a)


def parse_metrics(text: str | bytes, names: MetricNames, now: float) -> EndpointMetrics:
    """Build a snapshot from a whole Prometheus text page (see PageReader). Raises
    MetricsParseError when nothing usable is there.

    Several series matching one spec (e.g. one per `model_name`) are summed: a pod serves them all.
    For the LoRA info gauge, whose value is a timestamp, the newest matching series wins."""
    reader = PageReader(names)
    reader.feed(text.encode() if isinstance(text, str) else text)
    return reader.finish(now)


def _int_or(value: str | None, default: int | None) -> int | None:
    try:
        return int(float(value)) if value not in (None, "", "None") else default
    except (ValueError, OverflowError):
        return default
