"""The public plugin API: what filters, scorers, pickers and lifecycle hooks see.

Everything a plugin author needs is in this module; `scorers/` imports nothing else from `epp`.

The scheduler hands plugins the live `Endpoint` objects of the datastore (never copies). An
endpoint's scraped metrics are an immutable `EndpointMetrics` snapshot that the scraper replaces
whole, so a plugin reads a consistent set of values without locks or copies.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

# Pod label naming an endpoint's role in prefill/decode disaggregation.
ROLE_LABEL = "llm-d.ai/role"

# Cycle-state keys written by the prefix-cache scorer and read by others (director, P/D decider).
PREFIX_MATCHED_BLOCKS_KEY = "prefix-cache/matched-blocks"  # dict endpoint key -> matched blocks
PREFIX_TOTAL_BLOCKS_KEY = "prefix-cache/total-blocks"  # blocks hashed from the prompt
PREFIX_BLOCK_SIZE_TOKENS_KEY = "prefix-cache/block-size-tokens"


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

    __slots__ = ("active_requests", "address", "key", "labels", "metrics", "name", "port", "scrape_errors")

    def __init__(self, address: str, port: int, name: str = "", labels: Mapping[str, str] | None = None):
        self.address = address
        self.port = port
        # What Envoy is told in x-gateway-destination-endpoint; IPv6 addresses in brackets.
        self.key = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        self.name = name or self.key
        self.labels: Mapping[str, str] = dict(labels or {})
        self.metrics: EndpointMetrics = EMPTY_METRICS
        self.active_requests = 0  # epp's own count of requests in flight to this endpoint
        self.scrape_errors = 0

    @property
    def role(self) -> str | None:
        return self.labels.get(ROLE_LABEL)

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

    def __post_init__(self) -> None:
        if not self.target_model:
            self.target_model = self.model

    @property
    def input_tokens_estimate(self) -> int:
        # The field's convention without a tokenizer: 4 characters a token.
        return len(self.prompt_text) // 4


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
    """The outcome of a scheduling cycle across all profiles that ran."""

    primary_profile: str
    profiles: dict[str, ProfileResult]

    @property
    def primary(self) -> ProfileResult:
        return self.profiles[self.primary_profile]


class ConfigError(ValueError):
    """A plugin's configuration is wrong. The message names what and why."""


class Params:
    """A plugin's `parameters` mapping with typed getters that fail with a clear message."""

    __slots__ = ("_plugin", "_raw")

    def __init__(self, raw: Mapping[str, Any] | None, plugin: str = "plugin") -> None:
        if raw is not None and not isinstance(raw, Mapping):
            raise ConfigError(f"parameters must be a mapping, got {type(raw).__name__}")
        self._raw: Mapping[str, Any] = raw or {}
        self._plugin = plugin

    def keys(self) -> set[str]:
        return set(self._raw)

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], kind_name: str) -> Any:
        value = self._raw.get(key, default)
        if value is default:
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

    def get_float(self, key: str, default: float, minimum: float | None = None) -> float:
        value = float(self._get(key, default, (int, float), "a number"))
        if minimum is not None and value < minimum:
            raise ConfigError(f"parameter {key!r} must be >= {minimum}, got {value}")
        return value

    def get_bool(self, key: str, default: bool) -> bool:
        value: bool = self._get(key, default, (bool,), "true or false")
        return value

    def get_str(self, key: str, default: str) -> str:
        value: str = self._get(key, default, (str,), "a string")
        return value

    def get_mapping(self, key: str) -> Mapping[str, Any]:
        value: Mapping[str, Any] = self._get(key, {}, (dict,), "a mapping")
        return value


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
class PreRequest(Protocol):
    """Lifecycle hook: runs after the pick, before the request is forwarded (off the reply path)."""

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None: ...


@runtime_checkable
class ResponseComplete(Protocol):
    """Lifecycle hook: runs when the response has completed (or the stream ended)."""

    def response_complete(self, request: InferenceRequest, endpoint: Endpoint) -> None: ...


@runtime_checkable
class EndpointListener(Protocol):
    """Optional for plugins that keep per-endpoint state: told when an endpoint leaves the pool."""

    def endpoint_removed(self, endpoint: Endpoint) -> None: ...
