"""Filters: narrow the candidates before scoring. An empty result stops the profile (429).

- `label-selector-filter`: a Kubernetes label selector (matchLabels, matchExpressions).
- `decode-filter`, `prefill-filter`, `encode-filter`: by the `llm-d.ai/role` pod label.
- `prefix-cache-affinity-filter`: keep only endpoints that hold most of the prompt's prefix.
- deprecated: `by-label` (one label, a set of values) and `by-label-selector` (old name).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from epp.framework import (
    DEFAULT_INFLIGHT_PRODUCER,
    DEFAULT_PREFIX_PRODUCER,
    INFLIGHT_LOAD_DATA,
    PREFIX_MATCH_DATA,
    ROLE_LABEL,
    ConfigError,
    CycleState,
    Endpoint,
    InferenceRequest,
    InFlightLoad,
    Params,
    PrefixMatch,
    data_key,
)

# Values of the role label, as the Go EPP defines them.
ROLE_DECODE = "decode"
ROLE_PREFILL = "prefill"
ROLE_ENCODE = "encode"
ROLE_PREFILL_DECODE = "prefill-decode"
ROLE_ENCODE_PREFILL = "encode-prefill"
ROLE_ENCODE_PREFILL_DECODE = "encode-prefill-decode"
ROLE_BOTH = "both"


def _with_label_in(
    endpoints: Sequence[Endpoint], label: str, values: frozenset[str], keep_unlabeled: bool
) -> list[Endpoint]:
    """Endpoints whose `label` is one of `values`, plus those without it when `keep_unlabeled`."""
    out = []
    for ep in endpoints:
        value = ep.labels.get(label)
        if (value in values) if value is not None else keep_unlabeled:
            out.append(ep)
    return out


class ByLabel:
    """Keeps endpoints whose `label` has one of `validValues` (and, if `allowsNoLabel`, those
    without the label). Deprecated in the Go EPP in favour of the role filters and
    `label-selector-filter`; kept so older configs load."""

    type_name: ClassVar[str] = "by-label"

    def __init__(self, name: str = type_name, params: Params | None = None) -> None:
        params = params or Params(None, name)
        self.name = name
        self.label = params.get_str("label", "")
        self.valid_values = frozenset(params.get_str_list("validValues"))
        self.allows_no_label = params.get_bool("allowsNoLabel", False)
        if not self.label:
            raise ConfigError("parameter 'label' must be set")
        if not self.valid_values and not self.allows_no_label:
            raise ConfigError("either 'validValues' must be non-empty or 'allowsNoLabel' must be true")

    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        return _with_label_in(endpoints, self.label, self.valid_values, self.allows_no_label)


class _RoleFilter:
    """Keeps endpoints whose `llm-d.ai/role` label is one of `roles` (no parameters)."""

    type_name: ClassVar[str]
    roles: ClassVar[frozenset[str]]
    allows_no_label: ClassVar[bool]

    def __init__(self, name: str = "", params: Params | None = None) -> None:
        self.name = name or self.type_name

    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        return _with_label_in(endpoints, ROLE_LABEL, self.roles, self.allows_no_label)


class DecodeFilter(_RoleFilter):
    """Endpoints that decode: role decode, prefill-decode, both, encode-prefill-decode, or no role
    label at all (a plain vLLM pod does everything)."""

    type_name: ClassVar[str] = "decode-filter"
    roles = frozenset({ROLE_DECODE, ROLE_PREFILL_DECODE, ROLE_BOTH, ROLE_ENCODE_PREFILL_DECODE})
    allows_no_label = True


class PrefillFilter(_RoleFilter):
    """Endpoints that prefill: role prefill, encode-prefill, prefill-decode, both,
    encode-prefill-decode. Unlabeled pods are not prefill workers."""

    type_name: ClassVar[str] = "prefill-filter"
    roles = frozenset(
        {ROLE_PREFILL, ROLE_ENCODE_PREFILL, ROLE_PREFILL_DECODE, ROLE_BOTH, ROLE_ENCODE_PREFILL_DECODE}
    )
    allows_no_label = False


class EncodeFilter(_RoleFilter):
    """Endpoints that encode multimodal inputs: role encode, encode-prefill, encode-prefill-decode."""

    type_name: ClassVar[str] = "encode-filter"
    roles = frozenset({ROLE_ENCODE, ROLE_ENCODE_PREFILL, ROLE_ENCODE_PREFILL_DECODE})
    allows_no_label = False


_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True, slots=True)
class _Requirement:
    key: str
    operator: str
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.operator == "In":
            return value is not None and value in self.values
        if self.operator == "NotIn":
            return value is None or value not in self.values
        if self.operator == "Exists":
            return value is not None
        return value is None  # DoesNotExist


def _requirements(params: Params) -> list[_Requirement]:
    reqs: list[_Requirement] = []
    for key, value in params.get_mapping("matchLabels").items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"matchLabels: label key must be a non-empty string, got {key!r}")
        if not isinstance(value, str):
            raise ConfigError(f"matchLabels[{key!r}]: value must be a string, got {value!r} (quote it)")
        reqs.append(_Requirement(key, "In", frozenset({value})))
    for i, expr in enumerate(params.get_list("matchExpressions")):
        where = f"matchExpressions[{i}]"
        if not isinstance(expr, Mapping):
            raise ConfigError(f"{where} must be a mapping with key, operator and values")
        unknown = sorted(set(expr) - {"key", "operator", "values"})
        if unknown:
            raise ConfigError(f"{where}: unknown field {unknown[0]!r}")
        label, operator, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if not isinstance(label, str) or not label:
            raise ConfigError(f"{where}: 'key' must be a non-empty string")
        if operator not in _OPERATORS:
            raise ConfigError(f"{where}: 'operator' must be one of {', '.join(_OPERATORS)}, got {operator!r}")
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ConfigError(f"{where}: 'values' must be a list of strings")
        if operator in ("In", "NotIn") and not values:
            raise ConfigError(f"{where}: operator {operator} needs at least one value")
        if operator in ("Exists", "DoesNotExist") and values:
            raise ConfigError(f"{where}: operator {operator} takes no values")
        reqs.append(_Requirement(label, operator, frozenset(values)))
    return reqs


class LabelSelectorFilter:
    """Keeps endpoints whose pod labels match a Kubernetes label selector: every `matchLabels`
    pair and every `matchExpressions` requirement (In, NotIn, Exists, DoesNotExist). An empty
    selector keeps everything."""

    type_name: ClassVar[str] = "label-selector-filter"

    def __init__(self, name: str = type_name, params: Params | None = None) -> None:
        self.name = name
        self.requirements = _requirements(params or Params(None, name))

    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        reqs = self.requirements
        if not reqs:
            return endpoints
        return [ep for ep in endpoints if all(r.matches(ep.labels) for r in reqs)]


class ByLabelSelector(LabelSelectorFilter):
    """The old name of `label-selector-filter`."""

    type_name: ClassVar[str] = "by-label-selector"


class PrefixCacheAffinityFilter:
    """Narrows the candidates to the "sticky" ones: endpoints holding at least `affinityThreshold`
    of the prompt's prefix blocks. If none is sticky, all are kept. With probability
    `explorationProbability` the gate is skipped. TTFT load gate: when the best sticky endpoint's
    estimated TTFT (in-flight tokens / `peakPrefillThroughput`, in ms) exceeds the best
    non-sticky one's by more than `maxTTFTPenaltyMs`, stickiness is broken and all are kept
    (0 = always stick)."""

    type_name: ClassVar[str] = "prefix-cache-affinity-filter"

    def __init__(
        self, name: str = type_name, params: Params | None = None, rng: random.Random | None = None
    ) -> None:
        params = params or Params(None, name)
        self.name = name
        self.threshold = params.get_float("affinityThreshold", 0.80, maximum=1.0)
        self.exploration = params.get_float("explorationProbability", 0.0, minimum=0.0, maximum=1.0)
        self.max_penalty_ms = params.get_float("maxTTFTPenaltyMs", 18000.0, minimum=0.0)
        source = params.get_str("ttftSource", "prefillThroughput", ("prefillThroughput", "latencyPredictor"))
        if source == "latencyPredictor":
            raise ConfigError("ttftSource 'latencyPredictor' is not implemented by epp (it has no predictor)")
        self.peak_prefill_tps = params.get_float("peakPrefillThroughput", 15928.0, minimum=0.0)
        if self.max_penalty_ms > 0 and self.peak_prefill_tps == 0:
            raise ConfigError("peakPrefillThroughput must be > 0 when ttftSource is prefillThroughput")
        params.unimplemented("latencyPredictionInfoProducerName", reason="no latency predictor")
        self._prefix_key = data_key(
            PREFIX_MATCH_DATA, params.get_str("prefixMatchInfoProducerName", "") or DEFAULT_PREFIX_PRODUCER
        )
        self._load_key = data_key(
            INFLIGHT_LOAD_DATA, params.get_str("inFlightLoadProducerName", "") or DEFAULT_INFLIGHT_PRODUCER
        )
        self._rng = rng or random.Random()

    def consumes(self) -> Collection[str]:
        if self.max_penalty_ms > 0:
            return (self._prefix_key, self._load_key)
        return (self._prefix_key,)

    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        if len(endpoints) <= 1 or self.threshold <= 0:
            return endpoints
        if self.exploration and self._rng.random() < self.exploration:
            return endpoints
        match: PrefixMatch | None = cycle.read(self._prefix_key)
        if match is None:
            return endpoints
        threshold = self.threshold
        sticky = [ep for ep in endpoints if match.ratio(ep) >= threshold]
        if not sticky:
            return endpoints
        if self.max_penalty_ms > 0 and len(sticky) < len(endpoints):
            load: InFlightLoad | None = cycle.read(self._load_key)
            if load is not None:
                chosen = {id(ep) for ep in sticky}
                per_token_ms = 1000.0 / self.peak_prefill_tps
                best_sticky = min(load.tokens(ep) for ep in sticky) * per_token_ms
                best_other = min(load.tokens(ep) for ep in endpoints if id(ep) not in chosen) * per_token_ms
                if best_sticky - best_other > self.max_penalty_ms:
                    return endpoints
        return sticky


ALL_FILTERS: tuple[Any, ...] = (
    LabelSelectorFilter,
    DecodeFilter,
    PrefillFilter,
    EncodeFilter,
    PrefixCacheAffinityFilter,
)
# (plugin class, what to use instead)
DEPRECATED_FILTERS: tuple[tuple[Any, str], ...] = (
    (ByLabel, "label-selector-filter, or decode-filter / prefill-filter / encode-filter"),
    (ByLabelSelector, "label-selector-filter"),
)
