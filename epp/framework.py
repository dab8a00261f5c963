"""The public plugin API: what filters, scorers, pickers, producers and lifecycle hooks see.

Everything a plugin author needs is in this module; `scorers/` imports nothing else from `epp`.

The scheduler hands plugins the live `Endpoint` objects of the datastore (never copies). An
endpoint's scraped metrics are an immutable `EndpointMetrics` snapshot that the scraper replaces
whole, so a plugin reads a consistent set of values without locks or copies.

One request is one scheduling cycle:

    DataProducer.produce            (once per request, before any profile; e.g. prefix matching)
    per profile: Filter* -> Scorer* -> Picker
    PreRequest.pre_request          (after the pick, off the reply path)
    ResponseHeaders.response_headers  (when the model server's response headers arrive)
    ResponseComplete.response_complete  (when the response ends or the stream goes away)

Plugins share per-request data through `CycleState`; data that one plugin produces for others is
named by a data key (`data_key(kind, producer_name)`), and the loader adds a default producer
when a plugin consumes data that no configured plugin produces.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

# Pod label naming an endpoint's role in prefill/decode disaggregation.
ROLE_LABEL = "llm-d.ai/role"

# Extension points, as the `extension_point` label of inference_extension_plugin_duration_seconds.
FILTER_POINT = "Filter"
SCORER_POINT = "Scorer"
PICKER_POINT = "Picker"
PROFILE_PICKER_POINT = "ProfilePicker"
DATA_PRODUCER_POINT = "DataProducer"
PRE_REQUEST_POINT = "PreRequest"
RESPONSE_RECEIVED_POINT = "ResponseReceived"
RESPONSE_COMPLETE_POINT = "ResponseComplete"

# --- Data shared between plugins -----------------------------------------------------------------

# Kinds of data a producer offers. The data key of one producer's output is
# data_key(kind, producer name); the default producer of a kind is named after its type.
PREFIX_MATCH_DATA = "prefix-cache-match"  # a PrefixMatch
INFLIGHT_LOAD_DATA = "inflight-load"  # an InFlightLoad
DEFAULT_PREFIX_PRODUCER = "approx-prefix-cache-producer"
DEFAULT_INFLIGHT_PRODUCER = "inflight-load-producer"

# Cycle-state keys written by the default prefix producer and read by others (director, P/D decider).
PREFIX_MATCHED_BLOCKS_KEY = "prefix-cache/matched-blocks"  # dict endpoint key -> matched blocks
PREFIX_TOTAL_BLOCKS_KEY = "prefix-cache/total-blocks"  # blocks hashed from the prompt
PREFIX_BLOCK_SIZE_TOKENS_KEY = "prefix-cache/block-size-tokens"

# Prefill/decode disaggregation: the profile handler writes its decision for the request under this
# cycle-state key (one of the DISAGG_* values); the director counts it in
# llm_d_inference_scheduler_disagg_decision_total.
DISAGG_DECISION_KEY = "disagg/decision"
DISAGG_DECODE_ONLY = "decode-only"
DISAGG_PREFILL_DECODE = "prefill-decode"


def data_key(kind: str, producer: str) -> str:
    """The cycle-state key under which producer `producer` publishes data of `kind`."""
    return f"{kind}/{producer}"


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """How much of this request's prompt each endpoint probably holds in its KV cache.

    `matched` maps endpoint key -> blocks matched from the start of the prompt (absent = 0).
    """

    matched: Mapping[str, int]
    total_blocks: int
    block_size_tokens: int

    def ratio(self, endpoint: Endpoint) -> float:
        """Matched blocks / prompt blocks; 0 when the prompt has no block."""
        if not self.total_blocks:
            return 0.0
        return self.matched.get(endpoint.key, 0) / self.total_blocks

    def uncached_tokens(self, endpoint: Endpoint, input_tokens: int) -> int:
        """Input tokens this endpoint would have to prefill: the unmatched blocks plus the tail
        beyond the hashed blocks."""
        size = self.block_size_tokens
        indexed = self.total_blocks * size
        matched = self.matched.get(endpoint.key, 0) * size
        return max(0, indexed - matched) + max(0, input_tokens - indexed)


class InFlightLoad(Protocol):
    """epp's own count of what it has sent to each endpoint and not yet seen finish, as one
    request sees it."""

    def requests(self, endpoint: Endpoint) -> int:
        """Requests in flight to the endpoint."""
        ...

    def tokens(self, endpoint: Endpoint) -> int:
        """Tokens in flight to the endpoint."""
        ...

    def request_tokens(self, endpoint: Endpoint) -> int:
        """Tokens this request would add to the endpoint (its uncached input, and an output
        estimate when configured)."""
        ...


# --- Endpoints and requests ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointMetrics:
    """One scrape of a model server's /metrics. Replaced whole, never mutated."""

    waiting_queue_size: int = 0
    running_requests: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    running_loras: frozenset[str] = frozenset()
    waiting_loras: frozenset[str] = frozenset()
    max_loras: int = 0
    block_size: int | None = None  # tokens per KV block, from vllm:cache_config_info
    num_gpu_blocks: int | None = None
    # time.monotonic() of the scrape that produced these values; 0 = never scraped.
    updated_at: float = 0.0


EMPTY_METRICS = EndpointMetrics()


class Endpoint:
    """One serving endpoint (a pod and target port). Owned by the datastore; plugins read it."""

    __slots__ = (
        "active_requests",
        "address",
        "key",
        "labels",
        "metrics",
        "name",
        "namespace",
        "port",
        "scrape_errors",
    )

    def __init__(
        self,
        address: str,
        port: int,
        name: str = "",
        labels: Mapping[str, str] | None = None,
        namespace: str = "",
    ):
        self.address = address
        self.port = port
        # What Envoy is told in x-gateway-destination-endpoint; IPv6 addresses in brackets.
        self.key = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        self.name = name or self.key
        self.namespace = namespace
        self.labels: Mapping[str, str] = dict(labels or {})
        self.metrics: EndpointMetrics = EMPTY_METRICS
        self.active_requests = 0  # epp's own count of requests in flight to this endpoint
        self.scrape_errors = 0  # failed polls of /metrics in a row (reset by a good one)

    @property
    def role(self) -> str | None:
        return self.labels.get(ROLE_LABEL)

    @property
    def namespaced_name(self) -> str:
        """`namespace/name` as the Go EPP names endpoints (just `name` without a namespace)."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def __repr__(self) -> str:
        return f"Endpoint({self.key!r}, name={self.name!r})"


class Api(enum.Enum):
    """The OpenAI-style API a request uses, from its :path."""

    COMPLETIONS = "/v1/completions"
    CHAT_COMPLETIONS = "/v1/chat/completions"
    EMBEDDINGS = "/v1/embeddings"
    RESPONSES = "/v1/responses"
    OTHER = ""


@dataclass(slots=True)
class InferenceRequest:
    """A parsed inference request, as plugins see it."""

    request_id: str
    model: str
    api: Api
    # The text the prefix index hashes: the prompt, or the serialized messages/input.
    prompt_text: str
    headers: Mapping[str, str]
    body: Mapping[str, Any]
    streaming: bool = False
    target_model: str = ""  # model after any rewrite; equals `model` for now
    _prompt_bytes: bytes | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.target_model:
            self.target_model = self.model

    @property
    def prompt_bytes(self) -> bytes:
        """The prompt text as UTF-8, encoded once: what the prefix index hashes in blocks."""
        if self._prompt_bytes is None:
            self._prompt_bytes = self.prompt_text.encode()
        return self._prompt_bytes

    @property
    def input_tokens_estimate(self) -> int:
        # The field's convention without a tokenizer: 4 bytes a token (the Go EPP counts bytes
        # too), so the estimate and the prefix blocks agree for non-ASCII prompts.
        return len(self.prompt_bytes) // 4


class CycleState:
    """Scratch space shared by the plugins of one scheduling cycle (one request)."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}

    def read(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def write(self, key: str, value: Any) -> None:
        self._data[key] = value


@dataclass(slots=True)
class ProfileResult:
    """What one scheduling profile chose: primary first, then fallbacks."""

    profile_name: str
    endpoints: list[Endpoint]
    scores: Mapping[str, float] = field(default_factory=dict)  # endpoint key -> total score


@dataclass(slots=True)
class SchedulingResult:
    """The outcome of a scheduling cycle across all profiles that ran.

    `headers` (from a `RoutingHeaders` profile handler) are set on the request forwarded to the
    primary endpoint, or removed from it when the value is None: e.g. P/D's
    `x-prefiller-host-port`, which tells the decode pod's sidecar where to run the prefill.
    """

    primary_profile: str
    profiles: dict[str, ProfileResult]
    headers: Mapping[str, str | None] | None = None

    @property
    def primary(self) -> ProfileResult:
        return self.profiles[self.primary_profile]


# --- Configuration -------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A plugin's configuration is wrong. The message names what and why."""


_MISSING: Any = object()


class Params:
    """A plugin's `parameters` mapping with typed getters that fail with a clear message.

    The loader rejects parameters that the plugin never read (the Go EPP decodes strictly), so a
    typo is an error rather than a silently ignored setting. A plugin that reads the mapping by
    other means calls `raw()`. Go parameters that epp accepts but does not act on are declared
    with `unimplemented()`, which turns their presence into a warning.
    """

    __slots__ = ("_children", "_plugin", "_raw", "_read", "warnings")

    def __init__(self, raw: Mapping[str, Any] | None, plugin: str = "plugin") -> None:
        if raw is not None and not isinstance(raw, Mapping):
            raise ConfigError(f"parameters must be a mapping, got {type(raw).__name__}")
        self._raw: Mapping[str, Any] = raw or {}
        self._plugin = plugin
        self._read: set[str] = set()
        self._children: dict[str, Params] = {}
        self.warnings: list[str] = []

    def keys(self) -> set[str]:
        return set(self._raw)

    def __contains__(self, key: str) -> bool:
        return key in self._raw

    def raw(self) -> Mapping[str, Any]:
        """The whole mapping; every key counts as read."""
        self._read.update(self._raw)
        return self._raw

    def unread(self) -> list[str]:
        """Keys given in the config that the plugin never asked for (nested ones as `a.b`)."""
        out = [k for k in self._raw if k not in self._read]
        for key, child in self._children.items():
            out.extend(f"{key}.{k}" for k in child.unread())
        return sorted(out)

    def warn(self, message: str) -> None:
        """A configuration remark the loader reports (e.g. a value replaced by its default)."""
        self.warnings.append(message)

    def unimplemented(self, *keys: str, reason: str = "") -> None:
        """Accept Go parameters that epp does not act on; warn when one is set."""
        for key in keys:
            if key in self._raw:
                self._read.add(key)
                why = f": {reason}" if reason else ""
                self.warn(f"parameter {key!r} is not implemented by epp and is ignored{why}")

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], kind_name: str) -> Any:
        self._read.add(key)
        value = self._raw.get(key, _MISSING)
        if value is _MISSING or value is None:
            return default
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(f"parameter {key!r} must be {kind_name}, got {value!r}")
        if not isinstance(value, kinds):
            raise ConfigError(f"parameter {key!r} must be {kind_name}, got {value!r}")
        return value

    def get_int(self, key: str, default: int, minimum: int | None = None) -> int:
        value: int = self._get(key, default, (int,), "an integer")
        if minimum is not None and value < minimum:
            raise ConfigError(f"parameter {key!r} must be >= {minimum}, got {value}")
        return value

    def get_float(
        self, key: str, default: float, minimum: float | None = None, maximum: float | None = None
    ) -> float:
        value = float(self._get(key, default, (int, float), "a number"))
        if minimum is not None and value < minimum:
            raise ConfigError(f"parameter {key!r} must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"parameter {key!r} must be <= {maximum}, got {value}")
        return value

    def get_bool(self, key: str, default: bool) -> bool:
        value: bool = self._get(key, default, (bool,), "true or false")
        return value

    def get_str(self, key: str, default: str, choices: Collection[str] | None = None) -> str:
        value: str = self._get(key, default, (str,), "a string")
        if choices is not None and value not in choices:
            options = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"parameter {key!r} must be one of {options}, got {value!r}")
        return value

    def get_str_list(self, key: str) -> list[str]:
        value = self._get(key, [], (list,), "a list of strings")
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"parameter {key!r} must be a list of strings, got {value!r}")
        return list(value)

    def get_list(self, key: str) -> list[Any]:
        value: list[Any] = self._get(key, [], (list,), "a list")
        return value

    def get_mapping(self, key: str) -> Mapping[str, Any]:
        value: Mapping[str, Any] = self._get(key, {}, (dict,), "a mapping")
        return value

    def sub(self, key: str) -> Params:
        """A nested mapping as Params of its own (its keys are checked the same way)."""
        nested = Params(self.get_mapping(key), f"{self._plugin}.{key}")
        nested.warnings = self.warnings  # one list: the loader reports them all
        self._children[key] = nested
        return nested


# --- Plugin interfaces ---------------------------------------------------------------------------


@runtime_checkable
class Filter(Protocol):
    """Narrows the candidate list. Returning an empty list stops the profile."""

    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]: ...


@runtime_checkable
class Scorer(Protocol):
    """Scores each candidate in [0, 1] (one value per endpoint, same order). Synchronous, no I/O.

    The profile clamps each value into [0, 1] and multiplies it by the scorer's weight.
    """

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[float]: ...


@runtime_checkable
class Picker(Protocol):
    """Chooses the endpoints (primary first) from the scored candidates."""

    def pick(
        self, cycle: CycleState, endpoints: Sequence[Endpoint], scores: Sequence[float]
    ) -> list[Endpoint]: ...


@runtime_checkable
class ProfileHandler(Protocol):
    """Decides which profiles run, in rounds, and which result is the primary one."""

    def pick_profiles(
        self,
        cycle: CycleState,
        request: InferenceRequest,
        profile_names: Sequence[str],
        results: Mapping[str, ProfileResult | None],
    ) -> list[str]:
        """Profiles to run next given the results so far (None = ran, chose nothing); [] to stop."""
        ...

    def primary_profile(self, results: Mapping[str, ProfileResult | None]) -> str: ...


@runtime_checkable
class RoutingHeaders(Protocol):
    """Optional for a profile handler: request headers that carry the outcome of the other
    profiles to the model-server side (value None: remove a header the client sent)."""

    def routing_headers(
        self, request: InferenceRequest, result: SchedulingResult
    ) -> Mapping[str, str | None] | None: ...


@runtime_checkable
class PdDecider(Protocol):
    """Decides, once the decode endpoint is picked, whether the prompt is prefilled on a separate
    prefill endpoint (P/D disaggregation). Synchronous, no I/O; reads producers' data from the cycle."""

    def disaggregate(
        self, cycle: CycleState, request: InferenceRequest, decode_endpoint: Endpoint
    ) -> bool: ...


@runtime_checkable
class PluginReferrer(Protocol):
    """Optional for a plugin whose parameters name other plugins or profiles (e.g. a profile
    handler naming its decider). The loader calls `bind` once every plugin exists, before adding
    default producers. Returns remarks to report; raises ConfigError for a dangling or wrong
    reference."""

    def bind(self, plugins: Mapping[str, object], profile_names: Sequence[str]) -> list[str]: ...


@runtime_checkable
class DataProducer(Protocol):
    """Runs once per request before the profiles and publishes data in the cycle state under the
    keys `produces()` names, for scorers and filters to read. Synchronous, no I/O."""

    def produces(self) -> Collection[str]: ...

    def produce(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> None: ...


@runtime_checkable
class DataConsumer(Protocol):
    """A plugin that reads producers' data declares the data keys it needs; the loader adds the
    default producer of a key that no configured plugin produces."""

    def consumes(self) -> Collection[str]: ...


@runtime_checkable
class PreRequest(Protocol):
    """Lifecycle hook: runs after the pick, before the request is forwarded (off the reply path)."""

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None: ...


@runtime_checkable
class ResponseHeaders(Protocol):
    """Lifecycle hook: the model server's response headers arrived; return headers to add to the
    response the client sees (or None). `result` is None for a request routed without scheduling
    (no body)."""

    def response_headers(
        self, request: InferenceRequest, result: SchedulingResult | None, endpoint: Endpoint
    ) -> Mapping[str, str] | None: ...


@runtime_checkable
class ResponseComplete(Protocol):
    """Lifecycle hook: runs when the response has completed (or the stream ended)."""

    def response_complete(self, request: InferenceRequest, endpoint: Endpoint) -> None: ...


@runtime_checkable
class EndpointListener(Protocol):
    """Optional for plugins that keep per-endpoint state: told when an endpoint leaves the pool."""

    def endpoint_removed(self, endpoint: Endpoint) -> None: ...
