"""Prefill/decode disaggregation: `disagg-profile-handler` and the older `pd-profile-handler`, as
llm-d-router's `profilehandler/disagg` defines them, and the deprecated `disagg-headers-handler` /
`prefill-header-handler` entries.

One request runs up to two profiles:

1. `decode`, always; it is the primary (the pod Envoy routes to, which generates the tokens).
2. The decider (a P/D decider plugin, see `epp_scorers.deciders`) looks at the decode pick.
   `prefix-based-pd-decider`: disaggregate when the tokens the decode pod would have to prefill
   (input tokens at 4 bytes of UTF-8 each, minus the prefix blocks it probably holds) are at least
   `nonCachedTokens`. `always-disagg-pd-decider`: always.
3. If it says yes, `prefill` picks a prefill pod. Its `ip:port` reaches the decode pod in request
   header `x-prefiller-host-port`; the routing sidecar there has that pod prefill the prompt
   (max_tokens 1), pulls the KV cache and decodes locally. When no endpoint passes the prefill
   profile's filters the request is served decode-only, not failed.

The handler counts its decision (`decode-only` / `prefill-decode`) in
`llm_d_epp_disagg_decision_total{plugin_name, plugin_type, model_name, decision_type}` and its
deprecated twin `llm_d_inference_scheduler_disagg_decision_total{model_name, decision_type}`
(`pd-profile-handler`, as in llm-d-router: `llm_d_epp_pd_decision_total` and
`llm_d_inference_scheduler_pd_decision_total`); past 1000 distinct model names a handler counts
new ones as "other". It writes the decision in the cycle state under `DISAGG_DECISION`. A
client-supplied `x-prefiller-host-port` is removed from decode-only requests, so a client cannot
point the sidecar at a host of its choosing.

`disagg-profile-handler` parameters: `profiles` {decode, prefill, encode} (profile names, default
the same), `deciders` {prefill: name of a decider plugin; none = never disaggregate; encode: not
implemented}, `stageOrder` (decode-first; prefill-first is not implemented). The older flat names
(`decodeProfile`, `prefillProfile`, `encodeProfile`, `prefillDeciderPluginName`,
`deciderPluginName`, `encodeDeciderPluginName`) are accepted with a warning, but not mixed with
the nested ones.

`pd-profile-handler` (deprecated) parameters: `decodeProfile`, `prefillProfile`,
`deciderPluginName` (default `prefix-based-pd-decider`; when no such plugin is defined, every
request is disaggregated), `prefixMatchInfoProducerName`; its first layout `threshold` +
`hashBlockSize` maps to a decider epp builds; `primaryPort`, `prefixPluginType`,
`prefixPluginName` are accepted and ignored.

Consumes: what the decider consumes (e.g. the prefix match). Produces: the decision, in the cycle
state. Requires a `decode` profile; the `prefill` profile runs only with a decider.

    plugins:
    - type: prefix-based-pd-decider
      parameters:
        nonCachedTokens: 1024
    - type: disagg-profile-handler
      parameters:
        profiles: {decode: decode, prefill: prefill}
        deciders: {prefill: prefix-based-pd-decider}
    schedulingProfiles:
    - name: decode
      plugins: [...]
    - name: prefill
      plugins: [...]
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Self

from prometheus_client import Counter

from epp.framework import (
    ConfigError,
    CycleState,
    DataKey,
    InferenceRequest,
    ParamDoc,
    Params,
    PdDecider,
    PluginHandle,
    PreRequest,
    ProfileHandler,
    ProfileResult,
    SchedulingResult,
)
from epp_scorers.data import DEFAULT_PREFIX_PRODUCER
from epp_scorers.deciders.always import AlwaysDisaggPDDecider
from epp_scorers.deciders.prefix_based import PrefixBasedPDDecider

PREFILL_HEADER = "x-prefiller-host-port"
DEFAULT_DECODE_PROFILE = "decode"
DEFAULT_PREFILL_PROFILE = "prefill"
DEFAULT_ENCODE_PROFILE = "encode"
DEFAULT_PD_DECIDER = "prefix-based-pd-decider"  # pd-profile-handler's default deciderPluginName

# The decision a P/D handler made for the request, in the cycle state: one of the values below.
DISAGG_DECISION: DataKey[str] = DataKey("disagg-decision", "profile-handler")
DISAGG_DECODE_ONLY = "decode-only"
DISAGG_PREFILL_DECODE = "prefill-decode"

# The decision counters, as llm-d-router names them: the canonical `llm_d_epp_*` (by handler and
# model) and the deprecated `llm_d_inference_scheduler_*` (by model), both written.
# disagg-profile-handler counts in `*_disagg_decision_total`, pd-profile-handler in
# `*_pd_decision_total`.
HANDLER_DECISIONS_METRIC = "llm_d_epp_disagg_decision"
DECISIONS_METRIC = "llm_d_inference_scheduler_disagg_decision"
PD_HANDLER_DECISIONS_METRIC = "llm_d_epp_pd_decision"
PD_DECISIONS_METRIC = "llm_d_inference_scheduler_pd_decision"
# Distinct model-name label values a handler counts under their own name; later ones are "other"
# (llm-d-router caps request-derived model labels at 1000 the same way).
MAX_MODEL_LABELS = 1000
MAX_MODEL_LABEL_CHARS = 1024  # a longer name (the body's `model` is the client's) counts as "other"
OTHER_MODEL = "other"

_HEADERS_NOTE = "disagg-profile-handler, which sets x-prefiller-host-port itself (this entry has no effect)"


def decision_counters(handle: PluginHandle, pd: bool = False) -> tuple[Counter, Counter]:
    """The deprecated (by model) and the canonical (by handler and model) decision counters of
    disagg-profile-handler, or with `pd` of pd-profile-handler, registered through `handle`."""
    canonical, old = (
        (PD_HANDLER_DECISIONS_METRIC, PD_DECISIONS_METRIC)
        if pd
        else (HANDLER_DECISIONS_METRIC, DECISIONS_METRIC)
    )
    text = (
        "Total number of P/D disaggregation decisions made"
        if pd
        else "Total number of disaggregation routing decisions made"
    )
    return (
        handle.counter(
            old, f"[ALPHA] [Deprecated: Use {canonical}_total] {text}", ("model_name", "decision_type")
        ),
        handle.counter(
            canonical, f"[ALPHA] {text}", ("plugin_name", "plugin_type", "model_name", "decision_type")
        ),
    )


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


class DisaggHandlerBase(ProfileHandler):
    """What `disagg-profile-handler` and `pd-profile-handler` share: run `decode`, then, when the
    decider says so, `prefill`; decode is the primary. Not a plugin type of its own."""

    def __init__(
        self,
        name: str = "",
        *,
        decode_profile: str = DEFAULT_DECODE_PROFILE,
        prefill_profile: str = DEFAULT_PREFILL_PROFILE,
        encode_profile: str = DEFAULT_ENCODE_PROFILE,
        decider_name: str = "",
        decider: PdDecider | None = None,
        decisions_by_model: Counter | None = None,
        decisions_by_handler: Counter | None = None,
    ) -> None:
        super().__init__(name)
        self.decode_profile = decode_profile
        self.prefill_profile = prefill_profile
        self.encode_profile = encode_profile
        self.decider_name = decider_name  # resolved in bind when no decider is given
        self.decider = decider
        self._prefill_enabled = False  # a decider is bound and the prefill profile exists (bind)
        self._by_model = decisions_by_model
        self._by_handler = decisions_by_handler
        self._decision_children: dict[tuple[str, str], list[Counter]] = {}
        self._decision_models: set[str] = set()

    # --- configuration ---------------------------------------------------------------------------

    def consumes(self) -> Collection[DataKey[Any]]:
        """What the decider reads (e.g. the prefix match): the loader adds its producer."""
        return self.decider.consumes() if self.decider is not None else ()

    def _resolve_decider(self, handle: PluginHandle, what: str) -> PdDecider:
        plugin = handle.plugin(self.decider_name)
        if plugin is None:
            raise ConfigError(f"{what} names plugin {self.decider_name!r}, which is not defined")
        if not isinstance(plugin, PdDecider):
            raise ConfigError(
                f"{what} names plugin {self.decider_name!r} ({plugin.type_name}), which is not a P/D decider"
            )
        return plugin

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

    def _decide(self, cycle: CycleState, request: InferenceRequest, decision: str) -> None:
        """Record the request's decision: in the cycle state, and in the decision counters."""
        cycle.write(DISAGG_DECISION, decision)
        if self._by_model is None and self._by_handler is None:
            return
        model = request.target_model or "unknown"
        if len(model) > MAX_MODEL_LABEL_CHARS:
            model = OTHER_MODEL
        children = self._decision_children.get((model, decision))
        if children is None:
            models = self._decision_models
            if model not in models:  # the model label comes from the request: capped
                if len(models) >= MAX_MODEL_LABELS:
                    model = OTHER_MODEL
                else:
                    models.add(model)
            children = self._decision_children.get((model, decision))
        if children is None:
            children = []
            if self._by_model is not None:
                children.append(self._by_model.labels(model, decision))
            if self._by_handler is not None:
                children.append(self._by_handler.labels(self.name, self.type_name, model, decision))
            self._decision_children[(model, decision)] = children
        for child in children:
            child.inc()

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
            self._decide(cycle, request, DISAGG_PREFILL_DECODE if picked else DISAGG_DECODE_ONLY)
            return []
        decider = self.decider
        if (
            self._prefill_enabled
            and decider is not None
            and decider.disaggregate(cycle, request, decode_result.endpoints[0])
        ):
            return [prefill]
        self._decide(cycle, request, DISAGG_DECODE_ONLY)
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


class DisaggProfileHandler(DisaggHandlerBase):
    """Runs `decode`, then, when the decider says so, `prefill`; decode is the primary.

    Parameters: `profiles` {decode, prefill, encode} (profile names, default the same), `deciders`
    {prefill: name of a decider plugin; none = never disaggregate}, `stageOrder` (decode-first).
    The older flat names (`decodeProfile`, `prefillProfile`, `prefillDeciderPluginName`,
    `deciderPluginName`, ...) are accepted with a warning, but not mixed with the nested ones.
    """

    type_name = "disagg-profile-handler"
    parameters = (
        ParamDoc(
            "profiles.decode", "string", DEFAULT_DECODE_PROFILE, "Name of the decode profile (the primary)."
        ),
        ParamDoc("profiles.prefill", "string", DEFAULT_PREFILL_PROFILE, "Name of the prefill profile."),
        ParamDoc("profiles.encode", "string", DEFAULT_ENCODE_PROFILE, "Name of the encode profile (unused)."),
        ParamDoc(
            "deciders.prefill",
            "string",
            "",
            "Name of the P/D decider plugin that decides whether to prefill remotely (none: never).",
        ),
        ParamDoc("deciders.encode", "string", "", "Not implemented: setting it is a configuration error."),
        ParamDoc(
            "stageOrder", "string", "decode-first", "Only decode-first is implemented (decode runs first)."
        ),
        ParamDoc("decodeProfile", "string", "", "Deprecated: use profiles.decode."),
        ParamDoc("prefillProfile", "string", "", "Deprecated: use profiles.prefill."),
        ParamDoc("encodeProfile", "string", "", "Deprecated: use profiles.encode."),
        ParamDoc("prefillDeciderPluginName", "string", "", "Deprecated: use deciders.prefill."),
        ParamDoc(
            "deciderPluginName",
            "string",
            "",
            "Deprecated: use deciders.prefill (counts only when prefillDeciderPluginName is unset).",
        ),
        ParamDoc("encodeDeciderPluginName", "string", "", "Deprecated: use deciders.encode."),
    )

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
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
        by_model, by_handler = decision_counters(handle)
        return cls(
            name,
            decode_profile=decode or DEFAULT_DECODE_PROFILE,
            prefill_profile=prefill or DEFAULT_PREFILL_PROFILE,
            encode_profile=encode or DEFAULT_ENCODE_PROFILE,
            decider_name=decider,
            decisions_by_model=by_model,
            decisions_by_handler=by_handler,
        )

    def bind(self, handle: PluginHandle) -> list[str]:
        if self.decider is None and self.decider_name:
            self.decider = self._resolve_decider(handle, "deciders.prefill")
        return self._check_profiles(handle.profile_names)


class PdProfileHandler(DisaggHandlerBase):
    """The older P/D handler: `decodeProfile`, `prefillProfile`, `deciderPluginName` (default
    `prefix-based-pd-decider`). Its first layout, `threshold` + `hashBlockSize`, is mapped: threshold
    N > 0 becomes a prefix-based-pd-decider with nonCachedTokens N, threshold 0 (the default) an
    always-disagg-pd-decider; the block size is the prefix producer's."""

    type_name = "pd-profile-handler"
    deprecated_by = "disagg-profile-handler"
    parameters = (
        ParamDoc(
            "decodeProfile", "string", DEFAULT_DECODE_PROFILE, "Name of the decode profile (the primary)."
        ),
        ParamDoc("prefillProfile", "string", DEFAULT_PREFILL_PROFILE, "Name of the prefill profile."),
        ParamDoc(
            "deciderPluginName",
            "string",
            DEFAULT_PD_DECIDER,
            "Name of the P/D decider plugin; when the default is not defined, every request is "
            "disaggregated.",
        ),
        ParamDoc(
            "prefixMatchInfoProducerName",
            "string",
            DEFAULT_PREFIX_PRODUCER,
            "Prefix producer of the decider built from 'threshold'.",
        ),
        ParamDoc(
            "threshold",
            "int",
            "0",
            "First layout: N > 0 builds a prefix-based-pd-decider with nonCachedTokens N, 0 an "
            "always-disagg-pd-decider. Not with deciderPluginName.",
        ),
        ParamDoc(
            "hashBlockSize", "int", "64", "First layout: ignored (the prefix producer's block size applies)."
        ),
        ParamDoc("primaryPort", "int", "", "Not implemented (data-parallel routing is not in epp)."),
        ParamDoc("prefixPluginType", "string", "", "Deprecated; no effect."),
        ParamDoc("prefixPluginName", "string", "", "Deprecated; no effect."),
    )

    def __init__(
        self,
        name: str = "",
        *,
        decode_profile: str = DEFAULT_DECODE_PROFILE,
        prefill_profile: str = DEFAULT_PREFILL_PROFILE,
        decider_name: str = "",
        decider: PdDecider | None = None,
        prefix_producer: str = "",
        decisions_by_model: Counter | None = None,
        decisions_by_handler: Counter | None = None,
    ) -> None:
        """`decider_name` "" means the default, `prefix-based-pd-decider`, if such a plugin is
        defined, else an always-disagg-pd-decider; a given `decider` is used as is.
        `prefix_producer` is the config's prefixMatchInfoProducerName (remarked on when the decider
        is resolved by name: it applies to a decider built from `threshold` only)."""
        super().__init__(
            name,
            decode_profile=decode_profile,
            prefill_profile=prefill_profile,
            encode_profile=DEFAULT_ENCODE_PROFILE,
            decider_name="" if decider is not None else decider_name or DEFAULT_PD_DECIDER,
            decider=decider,
            decisions_by_model=decisions_by_model,
            decisions_by_handler=decisions_by_handler,
        )
        self._decider_explicit = bool(decider_name)
        self._producer_name = prefix_producer

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        handler_name = name or cls.type_name
        decode = params.get_str("decodeProfile", "") or DEFAULT_DECODE_PROFILE
        prefill = params.get_str("prefillProfile", "") or DEFAULT_PREFILL_PROFILE
        params.unimplemented("primaryPort", reason="data-parallel routing is not in epp")
        for key in ("prefixPluginType", "prefixPluginName"):
            if key in params:
                params.get_str(key, "")
                params.warn(f"parameter {key!r} is deprecated and has no effect")
        producer = params.get_str("prefixMatchInfoProducerName", "")
        explicit = params.get_str("deciderPluginName", "")
        decider: PdDecider | None = None
        if "threshold" in params or "hashBlockSize" in params:
            if explicit:
                raise ConfigError(
                    "'threshold'/'hashBlockSize' (the first pd-profile-handler layout) and "
                    "'deciderPluginName' cannot be combined: the threshold belongs to the decider"
                )
            threshold = params.get_int("threshold", 0, minimum=0)
            params.get_int("hashBlockSize", 64, minimum=1)
            decider = cls.legacy_decider(handler_name, threshold, producer)
            mapped = (
                f"prefix-based-pd-decider with nonCachedTokens {threshold}"
                if threshold
                else "always-disagg-pd-decider (threshold 0)"
            )
            params.warn(
                f"parameters 'threshold'/'hashBlockSize' are the first pd-profile-handler layout; mapped to "
                f"{mapped}; hashBlockSize is ignored (the prefix producer's block size applies)"
            )
        by_model, by_handler = decision_counters(handle, pd=True)
        return cls(
            name,
            decode_profile=decode,
            prefill_profile=prefill,
            decider_name=explicit,
            decider=decider,
            prefix_producer=producer,
            decisions_by_model=by_model,
            decisions_by_handler=by_handler,
        )

    @staticmethod
    def legacy_decider(handler_name: str, threshold: int, prefix_producer: str = "") -> PdDecider:
        """The decider of the first layout: threshold 0 always disaggregates, N > 0 is a
        prefix-based decider with nonCachedTokens N."""
        if threshold == 0:
            return AlwaysDisaggPDDecider(f"{handler_name}/always-disagg")
        return PrefixBasedPDDecider(
            f"{handler_name}/prefix-based",
            non_cached_tokens=threshold,
            prefix_producer=prefix_producer or DEFAULT_PREFIX_PRODUCER,
        )

    def bind(self, handle: PluginHandle) -> list[str]:
        remarks = []
        if self.decider is None:
            if self._decider_explicit or handle.plugin(self.decider_name) is not None:
                self.decider = self._resolve_decider(handle, "deciderPluginName")
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
        return remarks + self._check_profiles(handle.profile_names)


class DisaggHeadersHandler(PreRequest):
    """Deprecated PreRequest plugin that set `x-prefiller-host-port`; the profile handler does it
    now. Accepted so older configs load; it does nothing."""

    type_name = "disagg-headers-handler"
    deprecated_by = _HEADERS_NOTE
    parameters = (
        ParamDoc("prefillProfile", "string", "", "Accepted for older configs; no effect."),
        ParamDoc("encodeProfile", "string", "", "Accepted for older configs; no effect."),
    )

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        for key in ("prefillProfile", "encodeProfile"):
            params.get_str(key, "")
        return cls(name)

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        return None


class PrefillHeaderHandler(DisaggHeadersHandler):
    """The older name of `disagg-headers-handler`."""

    type_name = "prefill-header-handler"
