"""What plugins read: endpoints with their scraped metrics and in-flight counts, the parsed
request, and what a scheduling cycle chose.

The scheduler hands plugins the live `Endpoint` objects of the datastore (never copies). An
endpoint's scraped metrics are an immutable `EndpointMetrics` snapshot that the scraper replaces
whole, so a plugin reads a consistent set of values without locks or copies.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from epp.framework.columns import EndpointColumns

# Pod label naming an endpoint's role in prefill/decode disaggregation.
ROLE_LABEL = "llm-d.ai/role"


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

    def stamped(self, updated_at: float) -> EndpointMetrics:
        """The same values, read again by a scrape at `updated_at` (an idle server's page, every
        poll): the slots set one by one, at half the cost of the frozen `__init__` (a field
        added to the class must be added here: tests/framework compare with `replace`)."""
        copy = _new_object(EndpointMetrics)
        _set_waiting_queue_size(copy, self.waiting_queue_size)
        _set_running_requests(copy, self.running_requests)
        _set_kv_cache_usage(copy, self.kv_cache_usage)
        _set_running_loras(copy, self.running_loras)
        _set_waiting_loras(copy, self.waiting_loras)
        _set_max_loras(copy, self.max_loras)
        _set_block_size(copy, self.block_size)
        _set_num_gpu_blocks(copy, self.num_gpu_blocks)
        _set_updated_at(copy, updated_at)
        return copy


EMPTY_METRICS = EndpointMetrics()
_new_object = object.__new__
(
    _set_waiting_queue_size, _set_running_requests, _set_kv_cache_usage, _set_running_loras,
    _set_waiting_loras, _set_max_loras, _set_block_size, _set_num_gpu_blocks, _set_updated_at,
) = (getattr(EndpointMetrics, f.name).__set__ for f in fields(EndpointMetrics))  # fmt: skip

# One score per candidate, in candidate order: a list, or a numpy float array (what the in-tree
# scorers built on `metric_columns` return, and the profile's weighted totals at many endpoints).
Scores = Sequence[float] | npt.NDArray[np.float64]


class Endpoint:
    """One serving endpoint (a pod and target port). Owned by the datastore; plugins read it.

    `inflight_requests` / `inflight_tokens` are epp's own count of what it has routed to this
    endpoint and not yet seen finish: fresher than scraped metrics. Only the in-flight ledger
    (`epp.framework.InFlightLedger`) changes them.

    Assigning `metrics` also writes the new values into the endpoint's slot of the datastore's
    metric columns (`epp.framework.metric_columns`), when it belongs to a datastore.
    """

    __slots__ = (
        "_column_set",
        "_column_slot",
        "address",
        "go_id",
        "inflight_requests",
        "inflight_tokens",
        "key",
        "labels",
        "metrics",
        "name",
        "namespace",
        "pod_name",
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
        go_id: str = "",
        pod_name: str = "",
    ):
        # The datastore's metric columns this endpoint has a row in, and the row (see columns.py).
        self._column_set: EndpointColumns | None = None
        self._column_slot = 0
        self.address = address
        self.port = port
        # What Envoy is told in x-gateway-destination-endpoint; IPv6 addresses in brackets.
        self.key = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        self.name = name or self.key
        self.namespace = namespace
        # The Go EPP's name for the endpoint, `<namespace>/<pod>-rank-<index of its port among the
        # pool's target ports>`, which Kubernetes discovery sets (its session tokens carry it);
        # else `namespaced_name`.
        self.go_id = go_id or self.namespaced_name
        self.pod_name = pod_name or self.name  # the pod's own name (a pod with two ports: one each)
        self.labels: Mapping[str, str] = dict(labels or {})
        self.metrics: EndpointMetrics = EMPTY_METRICS
        self.inflight_requests = 0
        self.inflight_tokens = 0
        self.scrape_errors = 0  # failed polls of /metrics in a row (reset by a good one)

    if not TYPE_CHECKING:  # hidden from type checkers, which still check attribute names

        def __setattr__(self, name: str, value: Any) -> None:
            # A hook on writes rather than a property: reads of `ep.metrics` (every scorer, per
            # endpoint) stay a plain slot read (a property measured 5x slower to read).
            object.__setattr__(self, name, value)
            if name == "metrics":
                columns = self._column_set
                if columns is not None:
                    columns.write(self._column_slot, value)

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


@dataclass(slots=True)
class ProfileResult:
    """What one scheduling profile chose (primary first, then fallbacks), and the numbers behind
    it: the candidates that passed the filters, each scorer's raw scores and the weighted totals,
    in candidate order. Kept by reference on every cycle (no copies), so the debug log, tests and
    `--emit-endpoint-scores` all read the same values."""

    profile_name: str
    endpoints: list[Endpoint]
    candidates: Sequence[Endpoint] = ()
    totals: Scores = ()  # a numpy array above a few candidates
    scorer_scores: Mapping[str, Scores] = field(default_factory=dict)  # scorer name -> raw

    @property
    def scores(self) -> dict[str, float]:
        """Endpoint key -> weighted total score."""
        totals = self.totals.tolist() if isinstance(self.totals, np.ndarray) else self.totals
        return {ep.key: total for ep, total in zip(self.candidates, totals, strict=True)}


@dataclass(slots=True)
class SchedulingResult:
    """The outcome of a scheduling cycle across all profiles that ran.

    `headers` (from the profile handler's `routing_headers`) are set on the request forwarded to
    the primary endpoint, or removed from it when the value is None: e.g. P/D's
    `x-prefiller-host-port`, which tells the decode pod's sidecar where to run the prefill.
    """

    primary_profile: str
    profiles: dict[str, ProfileResult]
    headers: Mapping[str, str | None] | None = None

    @property
    def primary(self) -> ProfileResult:
        return self.profiles[self.primary_profile]

    def targets(self) -> list[Endpoint]:
        """The primary endpoint of every profile that chose one, each once, the primary profile's
        first: the endpoints this request loads (for P/D, the decode and the prefill pod)."""
        out = [self.primary.endpoints[0]] if self.primary.endpoints else []
        for profile in self.profiles.values():
            if profile.endpoints and all(profile.endpoints[0] is not ep for ep in out):
                out.append(profile.endpoints[0])
        return out
