"""The `flowControl` section of an EndpointPickerConfig, as the Go EPP reads it: global and per-band
capacity (Kubernetes quantities), request TTL (Go durations), priority bands and their policies.

Defaults (llm-d-router): a band holds at most 5000 requests and 1G bytes (an omitted or "0" limit
takes the default); no global limit; TTL 60s (an explicit "0s" disables it); bands not listed are
made from `defaultPriorityBand` (negative priorities from `defaultNegativePriorityBand` when set);
policies default to `fcfs-ordering-policy` and `global-strict-fairness-policy`; without
`usageLimitPolicyPluginRef` every band may use the whole pool (Go's static policy at 1.0).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from epp.errors import ConfigError
from epp.framework.plugin import FairnessPolicy, OrderingPolicy, Plugin, UsageLimitPolicy

DEFAULT_BAND_MAX_REQUESTS = 5000
DEFAULT_BAND_MAX_BYTES = 1_000_000_000
DEFAULT_REQUEST_TTL_S = 60.0
DEFAULT_ORDERING_POLICY = "fcfs-ordering-policy"
DEFAULT_FAIRNESS_POLICY = "global-strict-fairness-policy"

_QUANTITY = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)([KMGTPE]i|[numkMGTPE])?$")
_SUFFIX = {
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

P = TypeVar("P", bound=Plugin)
# (reference, kind, where) -> the plugin; an empty reference means the kind's default.
Resolver = Callable[[str, type[P], str], P]


def quantity(value: Any, where: str) -> int:
    """A Kubernetes quantity ("10Gi", "1k", "500", or a number) as a whole count (rounded up)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        match = _QUANTITY.match(value.strip()) if isinstance(value, str) else None
        if match is None:
            raise ConfigError(f"{where} must be a quantity (e.g. 500, 1k, 10Gi), got {value!r}")
        number = float(match.group(1)) * _SUFFIX.get(match.group(2) or "", 1)
    if number < 0:
        raise ConfigError(f"{where} must not be negative, got {value!r}")
    whole = int(number)
    return whole if whole == number else whole + 1


def duration_s(value: Any, where: str) -> float:
    """A Go duration ("60s", "1m30s", "0") in seconds."""
    text = value.strip() if isinstance(value, str) else None
    if text == "0":
        return 0.0
    parts = _DURATION_PART.findall(text or "")
    if text is None or not parts or "".join(n + u for n, u in parts) != text:
        raise ConfigError(f"{where} must be a duration (e.g. 60s, 1m30s), got {value!r}")
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


@dataclass(frozen=True, slots=True)
class BandConfig:
    priority: int
    max_requests: int
    max_bytes: int
    ordering: OrderingPolicy
    fairness: FairnessPolicy


@dataclass(slots=True)
class FlowControlConfig:
    max_requests: int = 0  # 0: no global limit
    max_bytes: int = 0
    ttl_s: float = DEFAULT_REQUEST_TTL_S  # 0: no TTL while the pool has endpoints
    no_endpoint_ttl_s: float = DEFAULT_REQUEST_TTL_S  # ... and while it has none
    bands: dict[int, BandConfig] = field(default_factory=dict)
    default_band: BandConfig | None = None  # template for priorities not listed
    default_negative_band: BandConfig | None = None
    usage_limit: UsageLimitPolicy | None = None  # None: Go's default static policy, threshold 1.0

    def band_for(self, priority: int) -> BandConfig:
        band = self.bands.get(priority)
        if band is not None:
            return band
        template = self.default_band
        if priority < 0 and self.default_negative_band is not None:
            template = self.default_negative_band
        assert template is not None
        # Not kept here: priorities come from objectives, which change; the controller keeps the
        # band while it has requests (and a bounded number of empty ones).
        return BandConfig(
            priority, template.max_requests, template.max_bytes, template.ordering, template.fairness
        )


def _band(
    spec: Mapping[str, Any], where: str, resolve: Resolver[Any], priority: int | None = None
) -> BandConfig:
    max_requests = (
        quantity(spec["maxRequests"], f"{where}.maxRequests") if spec.get("maxRequests") is not None else 0
    )
    max_bytes = quantity(spec["maxBytes"], f"{where}.maxBytes") if spec.get("maxBytes") is not None else 0
    ordering = resolve(spec.get("orderingPolicyRef") or "", OrderingPolicy, f"{where}.orderingPolicyRef")
    fairness = resolve(spec.get("fairnessPolicyRef") or "", FairnessPolicy, f"{where}.fairnessPolicyRef")
    return BandConfig(
        spec.get("priority", 0) if priority is None else priority,
        max_requests or DEFAULT_BAND_MAX_REQUESTS,  # "0" or omitted: the default, as in Go
        max_bytes or DEFAULT_BAND_MAX_BYTES,
        ordering,
        fairness,
    )


def build_config(flow: Mapping[str, Any], resolve: Resolver[Any]) -> FlowControlConfig:
    """The flow-control settings of a `flowControl` mapping whose field shapes the loader checked.
    `resolve` turns a policy reference into the plugin (the default type for "")."""
    config = FlowControlConfig()
    if flow.get("maxRequests") is not None:
        config.max_requests = quantity(flow["maxRequests"], "flowControl.maxRequests")
    if flow.get("maxBytes") is not None:
        config.max_bytes = quantity(flow["maxBytes"], "flowControl.maxBytes")
    if flow.get("defaultRequestTTL") is not None:
        config.ttl_s = duration_s(flow["defaultRequestTTL"], "flowControl.defaultRequestTTL")
    config.no_endpoint_ttl_s = config.ttl_s
    if flow.get("noEndpointRequestTTL") is not None:
        config.no_endpoint_ttl_s = duration_s(
            flow["noEndpointRequestTTL"], "flowControl.noEndpointRequestTTL"
        )
    config.default_band = _band(
        flow.get("defaultPriorityBand") or {}, "flowControl.defaultPriorityBand", resolve, 0
    )
    negative = flow.get("defaultNegativePriorityBand")
    if negative is not None:
        config.default_negative_band = _band(negative, "flowControl.defaultNegativePriorityBand", resolve, -1)
    usage = flow.get("usageLimitPolicyPluginRef")
    if usage:
        config.usage_limit = resolve(usage, UsageLimitPolicy, "flowControl.usageLimitPolicyPluginRef")
    for i, spec in enumerate(flow.get("priorityBands") or []):
        where = f"flowControl.priorityBands[{i}]"
        band = _band(spec, where, resolve)
        if band.priority in config.bands:
            raise ConfigError(f"{where}: duplicate priority level {band.priority}")
        config.bands[band.priority] = band
    return config
