"""`session-affinity-scorer`: keep a session on the endpoint that served it before.

Two strategies (`strategy`), as in the Go EPP:

- `encoded_endpoint_header` (default, stateless): the response carries header `x-session-token`
  (`encodedEndpointHeaderConfig.header`) = base64 of the serving endpoint's name as the Go EPP
  writes it (`namespace/pod-rank-N` in Kubernetes; a token of an earlier epp's `namespace/name`
  is read too); a client that sends it back scores 1 on that endpoint, 0 elsewhere.
- `session_id` (stateful): the client sends an opaque id (`sessionIdConfig.sources`, default header
  `x-session-id`); epp remembers which endpoint the id was routed to and scores that endpoint 1
  while it is a candidate. An unbound id scores 0 everywhere. A binding moves only when its
  endpoint was not a candidate; it expires after `evictionTtlSeconds` (300) unused. epp keeps at
  most MAX_SESSIONS bindings (the least recently used go first) and remembers an id longer than
  MAX_SESSION_ID_CHARS by its hash: the ids are the clients' to choose.

`profileName` (P/D): token and binding name that profile's endpoint instead of the primary's.

A token or binding is looked up by name among the candidates, in a map made once per candidate
tuple (the datastore's tuple is new whenever an endpoint's name changes; the last NAME_MAPS_KEPT
are kept): at 1,000 endpoints 2-4 us a request, where a pass building each `namespace/name` took
160. A plain list of candidates (in-tree code hands a tuple, the same one while the same
endpoints are stale) is scanned.

Consumes: request headers. Produces: nothing. Hooks: pre-request (binds a session id, strategy
`session_id`), response headers (adds the session token, strategy `encoded_endpoint_header`).
Parameters: `strategy`, `profileName`, `encodedEndpointHeaderConfig.header`,
`sessionIdConfig.sources` (a list of `{header: <name>}`; `attribute` sources are not implemented),
`sessionIdConfig.evictionTtlSeconds` (300), `sessionIdConfig.evictionSweepSeconds` (10).

    plugins:
    - type: session-affinity-scorer
      parameters:
        strategy: session_id
        sessionIdConfig:
          sources:
          - header: x-conversation-id
          evictionTtlSeconds: 600
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Self

from epp.framework import (
    ConfigError,
    CycleState,
    DataKey,
    Endpoint,
    InferenceRequest,
    ParamDoc,
    Params,
    PerTuple,
    PluginHandle,
    PreRequest,
    ResponseHeaders,
    SchedulingResult,
    Scorer,
    bounded_id,
)

DEFAULT_TOKEN_HEADER = "x-session-token"
NAME_MAPS_KEPT = 4  # candidate tuples whose name -> positions maps are kept
DEFAULT_SESSION_ID_HEADER = "x-session-id"
STRATEGY_ENCODED = "encoded_endpoint_header"
STRATEGY_SESSION_ID = "session_id"
MAX_SESSIONS: Final = 100_000
MAX_SESSION_ID_CHARS: Final = 256


def encode_token(endpoint: Endpoint) -> str:
    """The session token naming `endpoint`: base64 (standard alphabet, padded) of the Go EPP's name
    for it (`namespace/pod-rank-N` in Kubernetes), as the Go EPP writes it, so a client's tokens
    carry over from one to the other."""
    return base64.b64encode(endpoint.go_id.encode()).decode()


def decode_token(token: str) -> str:
    """The endpoint name in a token; "" when the token is not valid base64."""
    if not token:
        return ""
    try:
        return base64.b64decode(token, validate=True).decode()
    except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8 once decoded
        return ""


class _NamePositions:
    """Where each name is among a sequence of candidates: by `go_id` and by `namespaced_name`."""

    __slots__ = ("by_go_id", "by_name")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.by_go_id: dict[str, list[int]] = {}
        self.by_name: dict[str, list[int]] = {}
        for i, ep in enumerate(endpoints):
            self.by_go_id.setdefault(ep.go_id, []).append(i)
            self.by_name.setdefault(ep.namespaced_name, []).append(i)


def _header_name(value: str) -> str:
    return value.strip().lower() or DEFAULT_TOKEN_HEADER


class SessionAffinityScorer(Scorer, PreRequest, ResponseHeaders):
    """Keeps a session on the endpoint that served it before: 1 on that endpoint, 0 elsewhere. The
    endpoint is named by a base64 token the response carries (`encoded_endpoint_header`) or
    remembered per session id (`session_id`)."""

    type_name = "session-affinity-scorer"
    parameters = (
        ParamDoc(
            "strategy",
            "string",
            STRATEGY_ENCODED,
            f"`{STRATEGY_ENCODED}` (stateless token in a response header) or `{STRATEGY_SESSION_ID}`"
            " (epp remembers the endpoint of each session id).",
        ),
        ParamDoc(
            "profileName",
            "string",
            "",
            "Profile whose endpoint the token or binding names (P/D); default: the primary's.",
        ),
        ParamDoc(
            "encodedEndpointHeaderConfig.header",
            "string",
            DEFAULT_TOKEN_HEADER,
            "Header carrying the session token, in the response and in later requests.",
        ),
        ParamDoc(
            "sessionIdConfig.sources",
            "list of mappings",
            f"[{{header: {DEFAULT_SESSION_ID_HEADER}}}]",
            "Where the session id is read, first present wins: `{header: <name>}` entries.",
        ),
        ParamDoc(
            "sessionIdConfig.evictionTtlSeconds",
            "float",
            "300",
            "Seconds an unused session binding lives.",
        ),
        ParamDoc(
            "sessionIdConfig.evictionSweepSeconds",
            "float",
            "10",
            "Least interval between sweeps of expired bindings.",
        ),
    )

    def __init__(
        self,
        name: str = "",
        *,
        strategy: str = STRATEGY_ENCODED,
        profile_name: str = "",
        token_header: str = DEFAULT_TOKEN_HEADER,
        session_id_headers: Sequence[str] = (DEFAULT_SESSION_ID_HEADER,),
        eviction_ttl_seconds: float = 300.0,
        eviction_sweep_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name)
        self.strategy = strategy
        self.profile_name = profile_name
        self.token_header = _header_name(token_header)
        self.id_headers: list[str] = [h.strip().lower() for h in session_id_headers] or [
            DEFAULT_SESSION_ID_HEADER
        ]
        self.ttl_s = eviction_ttl_seconds
        self.sweep_s = eviction_sweep_seconds
        self._clock = clock
        # session id -> (endpoint name, last seen), least recently seen first
        self._bindings: dict[str, tuple[str, float]] = {}
        self._last_sweep = clock()
        self._present_key = DataKey[bool](f"{self.type_name}/bound-present", self.name)
        # The last few candidate tuples' positions by the two names a token or binding may hold
        # (a tuple's identity stands for its endpoints' names: the datastore makes a new one when
        # a name changes), so a request with a session costs a lookup, not a pass over the pool.
        # A few: P/D's two profiles each hand their own tuple.
        self._names: PerTuple[_NamePositions] = PerTuple(NAME_MAPS_KEPT)

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        strategy = params.get_str("strategy", STRATEGY_ENCODED, (STRATEGY_ENCODED, STRATEGY_SESSION_ID))
        profile_name = params.get_str("profileName", "")
        encoded = params.sub("encodedEndpointHeaderConfig")
        token_header = encoded.get_str("header", DEFAULT_TOKEN_HEADER)
        session = params.sub("sessionIdConfig")
        id_headers: list[str] = []
        for i, source in enumerate(session.get_list("sources")):
            where = f"sessionIdConfig.sources[{i}]"
            if not isinstance(source, Mapping) or set(source) - {"header", "attribute", "producer"}:
                raise ConfigError(f"{where} must be a mapping with 'header' or 'attribute'")
            header, attribute = source.get("header") or "", source.get("attribute") or ""
            if bool(header) == bool(attribute):
                raise ConfigError(f"{where}: exactly one of header or attribute must be set")
            if attribute:
                raise ConfigError(f"{where}: attribute sources are not implemented by epp; use a header")
            if not isinstance(header, str):
                raise ConfigError(f"{where}.header must be a string")
            id_headers.append(header)
        ttl_s = session.get_float("evictionTtlSeconds", 300.0)
        sweep_s = session.get_float("evictionSweepSeconds", 10.0)
        if strategy == STRATEGY_SESSION_ID and (ttl_s <= 0 or sweep_s <= 0):
            raise ConfigError("evictionTtlSeconds and evictionSweepSeconds must be > 0")
        return cls(
            name,
            strategy=strategy,
            profile_name=profile_name,
            token_header=token_header,
            session_id_headers=id_headers,
            eviction_ttl_seconds=ttl_s,
            eviction_sweep_seconds=sweep_s,
        )

    # --- scoring ---------------------------------------------------------------------------------

    def _session_id(self, request: InferenceRequest) -> str:
        for header in self.id_headers:
            value = request.headers.get(header, "").strip()
            if value:
                return bounded_id(value, MAX_SESSION_ID_CHARS)  # a long one kept by its hash
        return ""

    def _wanted(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> str:
        if self.strategy == STRATEGY_ENCODED:
            return decode_token(request.headers.get(self.token_header, ""))
        session = self._session_id(request)
        binding = self._bindings.get(session) if session else None
        if binding is None or self._clock() - binding[1] > self.ttl_s:
            return ""
        positions = self._positions(endpoints)
        present = (
            binding[0] in positions.by_name
            if positions is not None
            else any(ep.namespaced_name == binding[0] for ep in endpoints)
        )
        cycle.write(self._present_key, present)
        return binding[0]

    def _positions(self, endpoints: Sequence[Endpoint]) -> _NamePositions | None:
        """The candidates' positions by name, kept for the last few tuples; None for a list (it
        may change under the same identity: the caller scans it)."""
        return self._names.get(endpoints, _NamePositions) if isinstance(endpoints, tuple) else None

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        wanted = self._wanted(cycle, request, endpoints)
        if not wanted:
            return [0.0] * len(endpoints)
        # A token names the endpoint as the Go EPP does (go_id); an earlier epp wrote its
        # namespaced_name, which a session binding also holds.
        positions = self._positions(endpoints)
        if positions is None:
            return [1.0 if wanted in (ep.go_id, ep.namespaced_name) else 0.0 for ep in endpoints]
        scores = [0.0] * len(endpoints)
        for i in (*positions.by_go_id.get(wanted, ()), *positions.by_name.get(wanted, ())):
            scores[i] = 1.0
        return scores

    # --- lifecycle -------------------------------------------------------------------------------

    def _target(self, result: SchedulingResult | None, endpoint: Endpoint | None) -> Endpoint | None:
        if not self.profile_name:
            return endpoint if endpoint is not None or result is None else result.primary.endpoints[0]
        profile = result.profiles.get(self.profile_name) if result is not None else None
        return profile.endpoints[0] if profile is not None and profile.endpoints else None

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        if self.strategy != STRATEGY_SESSION_ID:
            return
        session = self._session_id(request)
        target = self._target(result, None)
        if not session or target is None:
            return
        now = self._clock()
        bindings = self._bindings
        if now - self._last_sweep >= self.sweep_s:
            self._last_sweep = now
            # Least recently seen first: the sweep stops at the first binding still in use.
            while bindings and now - next(iter(bindings.values()))[1] > self.ttl_s:
                del bindings[next(iter(bindings))]
        name = target.namespaced_name
        existing = bindings.get(session)
        if (
            existing is None
            or existing[0] == name
            or now - existing[1] > self.ttl_s
            or cycle.read(self._present_key) is False  # the bound endpoint was gone: the session moves
        ):
            bindings.pop(session, None)  # seen now: it goes to the end
            bindings[session] = (name, now)
            if len(bindings) > MAX_SESSIONS:
                del bindings[next(iter(bindings))]

    def response_headers(
        self, request: InferenceRequest, result: SchedulingResult | None, endpoint: Endpoint
    ) -> Mapping[str, str] | None:
        if self.strategy != STRATEGY_ENCODED:
            return None
        target = self._target(result, endpoint)
        if target is None:
            return None
        return {self.token_header: encode_token(target)}
