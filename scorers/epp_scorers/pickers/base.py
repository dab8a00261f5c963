"""What every picker shares: `maxNumOfEndpoints` and a random source (seedable in tests).

A picker turns the per-candidate total scores into the chosen endpoints, primary first. Every
picker takes `maxNumOfEndpoints` (default 1): with more than one, the extra endpoints are
fallbacks that Envoy tries on retry. As in the Go EPP, a value below 1 falls back to 1 (with a
warning).

    plugins:
    - type: max-score-picker
      parameters:
        maxNumOfEndpoints: 2
"""

from __future__ import annotations

import random
from typing import Self

from epp.framework import ParamDoc, Params, Picker, PluginHandle

DEFAULT_MAX_NUM_OF_ENDPOINTS = 1

MAX_NUM_OF_ENDPOINTS_DOC = ParamDoc(
    "maxNumOfEndpoints",
    "int",
    str(DEFAULT_MAX_NUM_OF_ENDPOINTS),
    "Endpoints to return: the primary, then fallbacks Envoy tries on retry. Below 1: 1.",
)


def parse_max_endpoints(params: Params) -> int:
    """`maxNumOfEndpoints`; a value below 1 falls back to the default, with a warning."""
    value = params.get_int("maxNumOfEndpoints", DEFAULT_MAX_NUM_OF_ENDPOINTS)
    if value < 1:
        params.warn(f"maxNumOfEndpoints {value} is not positive; using {DEFAULT_MAX_NUM_OF_ENDPOINTS}")
        return DEFAULT_MAX_NUM_OF_ENDPOINTS
    return value


class BasePicker(Picker):
    """A picker returning up to `max_endpoints` endpoints, drawing ties or samples from a random
    source (pass a seeded `random.Random` for reproducible picks)."""

    parameters = (MAX_NUM_OF_ENDPOINTS_DOC,)

    def __init__(
        self,
        name: str = "",
        *,
        max_endpoints: int = DEFAULT_MAX_NUM_OF_ENDPOINTS,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name)
        self.max_endpoints = max(1, max_endpoints)
        self._rng = rng or random.Random()

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        return cls(name, max_endpoints=parse_max_endpoints(params))
