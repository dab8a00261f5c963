"""Prefill/decode disaggregation: `disagg-profile-handler`, the P/D deciders, and the older
`pd-profile-handler`, as llm-d-router's `profilehandler/disagg` defines them.

One request runs up to two profiles:

1. `decode`, always; it is the primary (the pod Envoy routes to, which generates the tokens).
2. The decider looks at the decode pick. `prefix-based-pd-decider`: disaggregate when the tokens
   the decode pod would have to prefill (input tokens at 4 characters each, minus the prefix blocks
   it probably holds) are at least `nonCachedTokens`. `always-disagg-pd-decider`: always.
3. If it says yes, `prefill` picks a prefill pod. Its `ip:port` reaches the decode pod in request
   header `x-prefiller-host-port`; the routing sidecar there has that pod prefill the prompt
   (max_tokens 1), pulls the KV cache and decodes locally. When no endpoint passes the prefill
   profile's filters the request is served decode-only, not failed.

The handler writes its decision (`decode-only` / `prefill-decode`) in the cycle state; the director
counts it in `llm_d_inference_scheduler_disagg_decision_total`. A client-supplied
`x-prefiller-host-port` is removed from decode-only requests, so a client cannot point the sidecar
at a host of its choosing.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar

from epp.framework import (
    DEFAULT_PREFIX_PRODUCER,
    DISAGG_DECISION_KEY,
    DISAGG_DECODE_ONLY,
    DISAGG_PREFILL_DECODE,
    PREFIX_MATCH_DATA,
    ConfigError,
    CycleState,
    DataConsumer,
    Endpoint,
    InferenceRequest,
    Params,
    PdDecider,
    PrefixMatch,
    ProfileResult,
    SchedulingResult,
    data_key,
)

log = logging.getLogger(__name__)

PREFILL_HEADER = "x-prefiller-host-port"
DEFAULT_DECODE_PROFILE = "decode"
DEFAULT_PREFILL_PROFILE = "prefill"
DEFAULT_ENCODE_PROFILE = "encode"
DEFAULT_PD_DECIDER = "prefix-based-pd-decider"  # pd-profile-handler's default deciderPluginName


class PrefixBasedPDDecider:
    """Disaggregate when the decode pick would have to prefill at least `nonCachedTokens` tokens:
    input tokens (characters / 4) minus the prefix blocks it holds x block size. `nonCachedTokens`
    0 disables it (never disaggregate); prompts under `promptTokens` (0: no gate) never are."""

    type_name: ClassVar[str] = "prefix-based-pd-decider"

    def __init__(self, name: str = type_name, params: Params | None = None) -> None:
        params = params or Params(None, name)
        self.name = name
        self.non_cached_tokens = params.get_int("nonCachedTokens", 0, minimum=0)
        self.prompt_tokens = params.get_int("promptTokens", 0, minimum=0)
        producer = params.get_str("prefixMatchInfoProducerName", "") or DEFAULT_PREFIX_PRODUCER
        self._prefix_key = data_key(PREFIX_MATCH_DATA, producer)
        if self.non_cached_tokens == 0:
            params.warn("nonCachedTokens is 0: this decider never disaggregates (set it to enable P/D)")

    def consumes(self) -> Collection[str]:
        return (self._prefix_key,) if self.non_cached_tokens else ()

    def disaggregate(self, cycle: CycleState, request: InferenceRequest, decode_endpoint: Endpoint) -> bool:
        threshold = self.non_cached_tokens
        if not threshold:
            return False
        input_tokens = request.input_tokens_estimate
        if input_tokens < threshold or input_tokens < self.prompt_tokens:
            return False
        match: PrefixMatch | None = cycle.read(self._prefix_key)
        if match is None:  # the loader always adds the producer; a hand-built scheduler may not
            log.error("%s: no prefix-cache match in the cycle state; serving decode-only", self.name)
            return False
        return match.uncached_tokens(decode_endpoint, input_tokens) >= threshold


class AlwaysDisaggPDDecider:
    """Disaggregate every request (for tests, and deployments where prefill always goes remote)."""

    type_name: ClassVar[str] = "always-disagg-pd-decider"

    def __init__(self, name: str = type_name, params: Params | None = None) -> None:
        self.name = name

    def disaggregate(self, cycle: CycleState, request: InferenceRequest, decode_endpoint: Endpoint) -> bool:
        return True


def _stage_order(params: Params) -> None:
    value = params.get_str("stageOrder", "")
    normal = value.lower().replace("-", "").replace("_", "")
    if normal in ("", "decodefirst", "decode"):
        return
    if normal in ("prefillfirst", "prefill"):
        raise ConfigError("stageOrder 'prefill-first' is not implemented by epp (decode runs first)")
    raise ConfigError(f"parameter 'stageOrder' must be 'decode-first' or 'prefill-first', got {value!r}")


# Deprecated flat parameters of disagg-profile-handler -> their nested replacement.
_FLAT_PARAMETERS = {
    "decodeProfile": "profiles.decode",
    "prefillProfile": "profiles.prefill",
    "encodeProfile": "profiles.encode",
    "prefillDeciderPluginName": "deciders.prefill",
    "deciderPluginName": "deciders.prefill",
    "encodeDeciderPluginName": "deciders.encode",
}


class DisaggProfileHandler:
    """Runs `decode`, then, when the decider says so, `prefill`; decode is the primary.

    Parameters: `profiles` {decode, prefill, encode} (profile names, default the same), `deciders`
    {prefill: name of a decider plugin; none = never disaggregate}, `stageOrder` (decode-first).
    The older flat names (`decodeProfile`, `prefillProfile`, `prefillDeciderPluginName`,
    `deciderPluginName`, ...) are accepted with a warning, but not mixed with the nested ones.
    """

    type_name: ClassVar[str] = "disagg-profile-handler"

    def __init__(self, name: str = type_name, params: Params | None = None) -> None:
        params = params or Params(None, name)
        self.name = name
        self.decider: PdDecider | None = None
        flat = sorted(params.keys() & _FLAT_PARAMETERS.keys())
        nested = sorted(params.keys() & {"profiles", "deciders"})
        if flat and nested:
            raise ConfigError(
                f"parameters {', '.join(nested)} and {', '.join(flat)} mix two formats: use the nested "
                "profiles/deciders, or (deprecated) the flat names alone"
            )
        _stage_order(params)
        if flat:
            for key in flat:
                params.warn(f"parameter {key!r} is deprecated; use {_FLAT_PARAMETERS[key]!r}")
            decode = params.get_str("decodeProfile", "")
            prefill = params.get_str("prefillProfile", "")
            encode = params.get_str("encodeProfile", "")
            # deciderPluginName (from pd-profile-handler) only counts when the newer name is unset.
            newer = params.get_str("prefillDeciderPluginName", "")
            older = params.get_str("deciderPluginName", "")
            decider = newer or older
            encode_decider = params.get_str("encodeDeciderPluginName", "")
        else:
            profiles, deciders = params.sub("profiles"), params.sub("deciders")
            decode = profiles.get_str("decode", "")
            prefill = profiles.get_str("prefill", "")
            encode = profiles.get_str("encode", "")
            decider = deciders.get_str("prefill", "")
            encode_decider = deciders.get_str("encode", "")
        if encode_decider:
            raise ConfigError("encode disaggregation (an encode decider) is not implemented by epp")
        self.decode_profile = decode or DEFAULT_DECODE_PROFILE
        self.prefill_profile = prefill or DEFAULT_PREFILL_PROFILE
        self.encode_profile = encode or DEFAULT_ENCODE_PROFILE
        self.decider_name = decider
        self._prefill_enabled = False  # a decider is bound and the prefill profile exists

    # --- configuration ---------------------------------------------------------------------------

    def consumes(self) -> Collection[str]:
        """What the decider reads (e.g. the prefix match): the loader adds its producer."""
        return self.decider.consumes() if isinstance(self.decider, DataConsumer) else ()

    def _resolve_decider(self, plugins: Mapping[str, object], what: str) -> PdDecider:
        plugin = plugins.get(self.decider_name)
        if plugin is None:
            raise ConfigError(f"{what} names plugin {self.decider_name!r}, which is not defined")
        if not isinstance(plugin, PdDecider):
            kind = getattr(plugin, "type_name", type(plugin).__name__)
            raise ConfigError(
                f"{what} names plugin {self.decider_name!r} ({kind}), which is not a P/D decider"
            )
        return plugin

    def bind(self, plugins: Mapping[str, object], profile_names: Sequence[str]) -> list[str]:
        if self.decider is None and self.decider_name:
            self.decider = self._resolve_decider(plugins, "deciders.prefill")
        return self._check_profiles(profile_names)

    def _check_profiles(self, profile_names: Sequence[str]) -> list[str]:
        if self.decode_profile not in profile_names:
            known = ", ".join(profile_names)
            raise ConfigError(f"decode profile {self.decode_profile!r} is not defined (profiles: {known})")
        remarks = []
        has_prefill = self.prefill_profile in profile_names
        if self.decider is None and has_prefill:
            remarks.append(
                f"no P/D decider is configured, so profile {self.prefill_profile!r} never runs "
                "(set deciders.prefill to a prefix-based-pd-decider or always-disagg-pd-decider)"
            )
        elif self.decider is not None and not has_prefill:
            remarks.append(
                f"there is no profile {self.prefill_profile!r}, so requests are never disaggregated"
            )
        self._prefill_enabled = self.decider is not None and has_prefill
        for name in profile_names:
            if name not in (self.decode_profile, self.prefill_profile):
                remarks.append(
                    f"profile {name!r} is neither the decode nor the prefill profile; it never runs"
                )
        return remarks

    # --- scheduling ------------------------------------------------------------------------------

    def pick_profiles(
        self,
        cycle: CycleState,
        request: InferenceRequest,
        profile_names: Sequence[str],
        results: Mapping[str, ProfileResult | None],
    ) -> list[str]:
        decode = self.decode_profile
        if decode not in results:
            return [decode]
        decode_result = results[decode]
        if decode_result is None or not decode_result.endpoints:
            return []  # the scheduler fails the request: no decode endpoint
        prefill = self.prefill_profile
        if prefill in results:  # prefill ran; it may have found no endpoint (then decode-only)
            ran = results[prefill]
            picked = ran is not None and bool(ran.endpoints)
            cycle.write(DISAGG_DECISION_KEY, DISAGG_PREFILL_DECODE if picked else DISAGG_DECODE_ONLY)
            return []
        decider = self.decider
        if (
            self._prefill_enabled
            and decider is not None
            and decider.disaggregate(cycle, request, decode_result.endpoints[0])
        ):
            return [prefill]
        cycle.write(DISAGG_DECISION_KEY, DISAGG_DECODE_ONLY)
        return []

    def primary_profile(self, results: Mapping[str, ProfileResult | None]) -> str:
        return self.decode_profile

    def routing_headers(
        self, request: InferenceRequest, result: SchedulingResult
    ) -> Mapping[str, str | None] | None:
        prefill = result.profiles.get(self.prefill_profile)
        if prefill is not None and prefill.endpoints and result.primary_profile != self.prefill_profile:
            return {PREFILL_HEADER: prefill.endpoints[0].key}
        if PREFILL_HEADER in request.headers:
            return {PREFILL_HEADER: None}  # never forward a client's choice of prefill host
        return None


class PdProfileHandler(DisaggProfileHandler):
    """The older P/D handler: `decodeProfile`, `prefillProfile`, `deciderPluginName` (default
    `prefix-based-pd-decider`). Its first layout, `threshold` + `hashBlockSize`, is mapped: threshold
    N > 0 becomes a prefix-based-pd-decider with nonCachedTokens N, threshold 0 (the default) an
    always-disagg-pd-decider; the block size is the prefix producer's."""

    type_name: ClassVar[str] = "pd-profile-handler"

    def __init__(self, name: str = type_name, params: Params | None = None) -> None:
        params = params or Params(None, name)
        self.name = name
        self.decider = None
        self.decode_profile = params.get_str("decodeProfile", "") or DEFAULT_DECODE_PROFILE
        self.prefill_profile = params.get_str("prefillProfile", "") or DEFAULT_PREFILL_PROFILE
        self.encode_profile = DEFAULT_ENCODE_PROFILE
        self._prefill_enabled = False
        params.unimplemented("primaryPort", reason="data-parallel routing is not in epp")
        for key in ("prefixPluginType", "prefixPluginName"):
            if key in params:
                params.get_str(key, "")
                params.warn(f"parameter {key!r} is deprecated and has no effect")
        producer = params.get_str("prefixMatchInfoProducerName", "")
        explicit = params.get_str("deciderPluginName", "")
        self._decider_explicit = bool(explicit)
        self._producer_name = producer
        if "threshold" in params or "hashBlockSize" in params:
            if explicit:
                raise ConfigError(
                    "'threshold'/'hashBlockSize' (the first pd-profile-handler layout) and "
                    "'deciderPluginName' cannot be combined: the threshold belongs to the decider"
                )
            threshold = params.get_int("threshold", 0, minimum=0)
            params.get_int("hashBlockSize", 64, minimum=1)
            self.decider = self._legacy_decider(threshold, producer)
            mapped = (
                f"prefix-based-pd-decider with nonCachedTokens {threshold}"
                if threshold
                else "always-disagg-pd-decider (threshold 0)"
            )
            params.warn(
                f"parameters 'threshold'/'hashBlockSize' are the first pd-profile-handler layout; mapped to "
                f"{mapped}; hashBlockSize is ignored (the prefix producer's block size applies)"
            )
        self.decider_name = "" if self.decider is not None else explicit or DEFAULT_PD_DECIDER

    def _legacy_decider(self, threshold: int, producer: str) -> PdDecider:
        if threshold == 0:
            return AlwaysDisaggPDDecider(f"{self.name}/always-disagg")
        raw: dict[str, Any] = {"nonCachedTokens": threshold}
        if producer:
            raw["prefixMatchInfoProducerName"] = producer
        return PrefixBasedPDDecider(f"{self.name}/prefix-based", Params(raw))

    def bind(self, plugins: Mapping[str, object], profile_names: Sequence[str]) -> list[str]:
        remarks = []
        if self.decider is None:
            if self._decider_explicit or self.decider_name in plugins:
                self.decider = self._resolve_decider(plugins, "deciderPluginName")
                if self._producer_name:
                    remarks.append(
                        "parameter 'prefixMatchInfoProducerName' applies to the decider epp builds from "
                        "'threshold'; set it on the decider plugin instead"
                    )
            else:
                self.decider = AlwaysDisaggPDDecider(f"{self.name}/always-disagg")
                remarks.append(
                    f"no plugin named {DEFAULT_PD_DECIDER!r} (the default deciderPluginName): every request "
                    "is disaggregated, as the first pd-profile-handler did with threshold 0"
                )
        return remarks + self._check_profiles(profile_names)


class DisaggHeadersHandler:
    """Deprecated PreRequest plugin that set `x-prefiller-host-port`; the profile handler does it
    now. Accepted so older configs load; it does nothing."""

    type_name: ClassVar[str] = "disagg-headers-handler"

    def __init__(self, name: str = "", params: Params | None = None) -> None:
        params = params or Params(None, name)
        self.name = name or self.type_name
        for key in ("prefillProfile", "encodeProfile"):
            params.get_str(key, "")


class PrefillHeaderHandler(DisaggHeadersHandler):
    """The older name of `disagg-headers-handler`."""

    type_name: ClassVar[str] = "prefill-header-handler"


_HEADERS_NOTE = "disagg-profile-handler, which sets x-prefiller-host-port itself (this entry has no effect)"
ALL_DISAGG_PLUGINS: tuple[Any, ...] = (DisaggProfileHandler, PrefixBasedPDDecider, AlwaysDisaggPDDecider)
# (plugin class, what to use instead)
DEPRECATED_DISAGG_PLUGINS: tuple[tuple[Any, str], ...] = (
    (PdProfileHandler, "disagg-profile-handler"),
    (DisaggHeadersHandler, _HEADERS_NOTE),
    (PrefillHeaderHandler, _HEADERS_NOTE),
)
