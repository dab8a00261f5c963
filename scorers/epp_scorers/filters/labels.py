"""Label filters: keep the endpoints whose pod labels match. An empty result stops the profile (429).

`label-selector-filter` keeps endpoints whose pod labels match a Kubernetes label selector: every
`matchLabels` pair and every `matchExpressions` requirement (operators In, NotIn, Exists,
DoesNotExist). An empty selector keeps everything.

Deprecated, kept so older configs load (the loader warns):

- `by-label`: endpoints whose `label` has one of `validValues`, plus, with `allowsNoLabel`, those
  without the label. Use `label-selector-filter`, or a role filter (`decode-filter`, ...).
- `by-label-selector`: the old name of `label-selector-filter`.

Consumes: pod labels. Produces: nothing.

Parameters of `label-selector-filter` (and `by-label-selector`):
- `matchLabels` (mapping of label -> value): each label must have exactly that value.
- `matchExpressions` (list of {key, operator, values}): each requirement must hold; In and
  NotIn need at least one value, Exists and DoesNotExist take none.

Parameters of `by-label`: `label` (required), `validValues` (list of strings), `allowsNoLabel`
(bool, default false); `validValues` must be non-empty or `allowsNoLabel` true.

    plugins:
    - type: label-selector-filter
      name: gold-tier
      parameters:
        matchLabels:
          tier: gold
        matchExpressions:
        - {key: zone, operator: In, values: [z1, z2]}
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Self

from epp.framework import (
    ConfigError,
    CycleState,
    Endpoint,
    Filter,
    InferenceRequest,
    ParamDoc,
    Params,
    PluginHandle,
)

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def with_label_in(
    endpoints: Sequence[Endpoint], label: str, values: Collection[str], keep_unlabeled: bool
) -> Sequence[Endpoint]:
    """Endpoints whose `label` is one of `values`, plus those without it when `keep_unlabeled`
    (`endpoints` itself when that is all of them)."""
    out = []
    for ep in endpoints:
        value = ep.labels.get(label)
        if (value in values) if value is not None else keep_unlabeled:
            out.append(ep)
    return endpoints if len(out) == len(endpoints) else tuple(out)


class LastLabelFilter:
    """A label filter's last input tuple and its result. The datastore makes a new endpoint
    tuple whenever a label changes (never changing one in place under the same tuple), so the
    same tuple again, the director's usual candidates, has the same result: no pass over the
    pool, and the same result tuple, whose rows the metric columns keep (epp.framework.columns)."""

    __slots__ = ("_input", "_output")

    def __init__(self) -> None:
        self._input: tuple[Endpoint, ...] | None = None
        self._output: Sequence[Endpoint] = ()

    def filter(
        self, endpoints: Sequence[Endpoint], label: str, values: Collection[str], keep_unlabeled: bool
    ) -> Sequence[Endpoint]:
        if endpoints is self._input:
            return self._output
        out = with_label_in(endpoints, label, values, keep_unlabeled)
        if isinstance(endpoints, tuple):
            self._input, self._output = endpoints, out
        return out


@dataclass(frozen=True, slots=True)
class LabelRequirement:
    """One requirement of a label selector: `key` `operator` `values` (operator one of In, NotIn,
    Exists, DoesNotExist; the last two take no values)."""

    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.operator == "In":
            return value is not None and value in self.values
        if self.operator == "NotIn":
            return value is None or value not in self.values
        if self.operator == "Exists":
            return value is not None
        return value is None  # DoesNotExist


def parse_selector(params: Params) -> list[LabelRequirement]:
    """The requirements of a Kubernetes label selector (`matchLabels` first, then
    `matchExpressions`), or ConfigError naming what is wrong."""
    reqs: list[LabelRequirement] = []
    for key, value in params.get_mapping("matchLabels").items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"matchLabels: label key must be a non-empty string, got {key!r}")
        if not isinstance(value, str):
            raise ConfigError(f"matchLabels[{key!r}]: value must be a string, got {value!r} (quote it)")
        reqs.append(LabelRequirement(key, "In", frozenset({value})))
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
        if operator not in OPERATORS:
            raise ConfigError(f"{where}: 'operator' must be one of {', '.join(OPERATORS)}, got {operator!r}")
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ConfigError(f"{where}: 'values' must be a list of strings")
        if operator in ("In", "NotIn") and not values:
            raise ConfigError(f"{where}: operator {operator} needs at least one value")
        if operator in ("Exists", "DoesNotExist") and values:
            raise ConfigError(f"{where}: operator {operator} takes no values")
        reqs.append(LabelRequirement(label, operator, frozenset(values)))
    return reqs


class LabelSelectorFilter(Filter):
    """Keeps endpoints whose pod labels match a Kubernetes label selector: every `matchLabels`
    pair and every `matchExpressions` requirement (In, NotIn, Exists, DoesNotExist). An empty
    selector keeps everything."""

    type_name = "label-selector-filter"
    parameters = (
        ParamDoc("matchLabels", "mapping", "{}", "Label -> value pairs that must all match."),
        ParamDoc(
            "matchExpressions",
            "list of mappings",
            "[]",
            "Requirements {key, operator (In, NotIn, Exists, DoesNotExist), values} that must all hold.",
        ),
    )

    def __init__(
        self,
        name: str = "",
        *,
        match_labels: Mapping[str, str] | None = None,
        match_expressions: Sequence[LabelRequirement] = (),
    ) -> None:
        super().__init__(name)
        self.requirements: list[LabelRequirement] = [
            LabelRequirement(key, "In", frozenset({value})) for key, value in (match_labels or {}).items()
        ]
        self.requirements.extend(match_expressions)

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        return cls(name, match_expressions=parse_selector(params))

    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        reqs = self.requirements
        if not reqs:
            return endpoints
        return [ep for ep in endpoints if all(r.matches(ep.labels) for r in reqs)]


class ByLabelSelector(LabelSelectorFilter):
    """The old name of `label-selector-filter`."""

    type_name = "by-label-selector"
    deprecated_by = "label-selector-filter"


class ByLabel(Filter):
    """Keeps endpoints whose `label` has one of `validValues` (and, if `allowsNoLabel`, those
    without the label). Deprecated in the Go EPP in favour of the role filters and
    `label-selector-filter`; kept so older configs load."""

    type_name = "by-label"
    deprecated_by = "label-selector-filter, or decode-filter / prefill-filter / encode-filter"
    parameters = (
        ParamDoc("label", "string", "", "The label to test (required)."),
        ParamDoc("validValues", "list of strings", "[]", "Values of the label that are kept."),
        ParamDoc("allowsNoLabel", "bool", "false", "Also keep endpoints without the label."),
    )

    def __init__(
        self,
        name: str = "",
        *,
        label: str = "",
        valid_values: Collection[str] = (),
        allows_no_label: bool = False,
    ) -> None:
        super().__init__(name)
        self.label = label
        self.valid_values = frozenset(valid_values)
        self.allows_no_label = allows_no_label
        self._last = LastLabelFilter()

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        label = params.get_str("label", "")
        valid_values = params.get_str_list("validValues")
        allows_no_label = params.get_bool("allowsNoLabel", False)
        if not label:
            raise ConfigError("parameter 'label' must be set")
        if not valid_values and not allows_no_label:
            raise ConfigError("either 'validValues' must be non-empty or 'allowsNoLabel' must be true")
        return cls(name, label=label, valid_values=valid_values, allows_no_label=allows_no_label)

    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        return self._last.filter(endpoints, self.label, self.valid_values, self.allows_no_label)
