"""Usage limit policies: how much of the pool each priority band may use before flow control
holds its requests back (bands are served highest first; the first band whose ceiling the pool's
saturation has reached stops dispatch for itself and every band below).

- `static-usage-limit-policy` (the default): one ceiling for every band (`threshold`, 1.0: none).
- `priority-holdback-policy`: ceilings from `maxCeiling` for the highest priority down to
  `minCeiling` for the lowest, linear by rank (equal steps) or by priority value, so lower
  priorities are held back first and higher ones keep headroom.
- `soft-reflective-ceiling-policy`: no parameters; band i of N (0 the highest) may dispatch while
  saturation < 1 - i x saturation / (N - 1); past that, the lower bands are opened one call in
  round(saturation / (1 - saturation)) (all of them on the same calls), and closed at
  saturation >= 1, so their dispatch rate falls continuously as saturation rises.

    plugins:
    - type: priority-holdback-policy
      parameters: {minCeiling: 0.5}
    flowControl:
      usageLimitPolicyPluginRef: priority-holdback-policy
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from epp.framework import ConfigError, ParamDoc, Params, PluginHandle, UsageLimitPolicy


class StaticUsageLimitPolicy(UsageLimitPolicy):
    """One ceiling for every priority band: dispatch stops when the pool's saturation reaches
    `threshold` (1.0, the default: no headroom kept). The Go EPP's default usage limit policy."""

    type_name = "static-usage-limit-policy"
    parameters = (ParamDoc("threshold", "float", "1.0", "The ceiling, in (0, 1]."),)

    def __init__(self, name: str = "", threshold: float = 1.0) -> None:
        super().__init__(name)
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        return cls(name, params.get_float("threshold", 1.0))

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> Sequence[float]:
        return [self.threshold] * len(priorities)


class PriorityHoldbackPolicy(UsageLimitPolicy):
    """Ceilings stepping linearly from `maxCeiling` (highest priority) to `minCeiling` (lowest),
    by rank or by priority value: as saturation rises, lower priorities are held back first."""

    type_name = "priority-holdback-policy"
    parameters = (
        ParamDoc("minCeiling", "float", "", "Required: the lowest priority's ceiling, in [0, 1)."),
        ParamDoc(
            "maxCeiling", "float", "1.0", "The highest priority's ceiling, in (0, 1], above minCeiling."
        ),
        ParamDoc("domain", "string", "rank", "`rank` (equal steps by order) or `value` (by priority value)."),
        ParamDoc("shape", "string", "linear", "The interpolation; only `linear`."),
    )

    def __init__(
        self, name: str = "", min_ceiling: float = 0.0, max_ceiling: float = 1.0, domain: str = "rank"
    ) -> None:
        super().__init__(name)
        if not 0.0 <= min_ceiling < 1.0:
            raise ConfigError(f"minCeiling must be in [0, 1), got {min_ceiling}")
        if not 0.0 < max_ceiling <= 1.0:
            raise ConfigError(f"maxCeiling must be in (0, 1], got {max_ceiling}")
        if min_ceiling >= max_ceiling:
            raise ConfigError(f"minCeiling ({min_ceiling}) must be less than maxCeiling ({max_ceiling})")
        if domain not in ("rank", "value"):
            raise ConfigError(f"domain must be 'rank' or 'value', got {domain!r}")
        self.min_ceiling = min_ceiling
        self.max_ceiling = max_ceiling
        self.domain = domain

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        if "minCeiling" not in params:
            raise ConfigError("parameter 'minCeiling' is required")
        params.get_str("shape", "linear", ("linear",))
        return cls(
            name,
            params.get_float("minCeiling", 0.0),
            params.get_float("maxCeiling", 1.0),
            params.get_str("domain", "rank", ("rank", "value")),
        )

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> Sequence[float]:
        n = len(priorities)
        lo, hi = self.min_ceiling, self.max_ceiling
        if n <= 1:
            return [hi] * n
        if self.domain == "rank":
            return [hi - i * (hi - lo) / (n - 1) for i in range(n)]
        top, bottom = max(priorities), min(priorities)
        if top == bottom:
            return [hi] * n
        return [lo + (p - bottom) / (top - bottom) * (hi - lo) for p in priorities]


class SoftReflectiveCeilingPolicy(UsageLimitPolicy):
    """Graduated ceilings from saturation alone: band i of N may dispatch while saturation is below
    1 - i x saturation / (N - 1); beyond, lower bands open on one call in round(saturation /
    (1 - saturation)) (one shared tick), and close at saturation 1. No parameters."""

    type_name = "soft-reflective-ceiling-policy"

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self._tick = 0  # shared by every gated band: they open and close together

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> Sequence[float]:
        n = len(priorities)
        if n <= 1:
            return [1.0] * n
        out = [1.0]
        gated_open: bool | None = None
        for i in range(1, n):
            if saturation < 1.0 - i * saturation / (n - 1):
                out.append(1.0)
            elif saturation >= 1.0:
                out.append(0.0)
            else:
                if gated_open is None:
                    period = max(1, round(saturation / (1.0 - saturation)))
                    gated_open = self._tick % period == 0
                    self._tick += 1
                out.append(1.0 if gated_open else 0.0)
        return out
