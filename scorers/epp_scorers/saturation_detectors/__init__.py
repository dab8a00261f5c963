"""Saturation detectors: how loaded the pool is, for flow control and admission."""

from __future__ import annotations

import re

from epp.framework import ConfigError

_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration_s(value: object, key: str) -> float:
    """A Go duration string ("200ms", "1m30s") in seconds; a bare number is taken as seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"parameter {key!r} must be a duration (e.g. 200ms), got {value!r}")
    text = value.strip()
    parts = _GO_DURATION_PART.findall(text)
    if text == "0":
        return 0.0
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ConfigError(f"parameter {key!r} must be a duration (e.g. 200ms), got {value!r}")
    return sum(float(n) * _UNIT_S[u] for n, u in parts)
