"""`kv-headroom-scorer`: prefer endpoints with the most free KV cache per request they serve.

`kv-cache-utilization-scorer` looks at free KV cache alone. But a pod with 30% free KV and 60
requests decoding will fill that space much sooner than a pod with 25% free and 2 requests: every
running request grows its KV by one token per step. This scorer divides the free fraction by the
requests that will share it:

    headroom = (1 - kv_usage) / (1 + running [+ waiting])
    score    = headroom / max(headroom over the candidates)       (all 0 when nothing is free)

Parameters:
    countWaiting (bool, default true): count queued requests as sharing the headroom too.

How a plugin is written (the pattern every epp plugin follows):

- derive from the base class of its kind (`epp.framework.Scorer` here): the base class is what
  makes it a scorer;
- `type_name` is the name configs use, and the entry point's name in pyproject.toml;
- `parameters` documents each config parameter (`ParamDoc`);
- the constructor is plain and typed (`KvHeadroomScorer(count_waiting=False)` in code and tests);
- `from_params` parses the config's `parameters` mapping (`Params` getters raise `ConfigError`
  on bad values; a key it never reads is reported as an unknown parameter) and calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from epp.framework import CycleState, Endpoint, InferenceRequest, ParamDoc, Params, PluginHandle, Scorer

__all__ = ["KvHeadroomScorer"]


class KvHeadroomScorer(Scorer):
    """Prefers endpoints with the most free KV cache per request sharing it:
    (1 - kv usage) / (1 + running [+ waiting]), relative to the best candidate."""

    type_name = "kv-headroom-scorer"
    parameters = (
        ParamDoc(
            "countWaiting",
            "bool",
            "true",
            "Count queued (waiting) requests as sharing the free KV cache too.",
        ),
    )

    def __init__(self, name: str = "", *, count_waiting: bool = True) -> None:
        super().__init__(name)
        self.count_waiting = count_waiting

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        return cls(name, count_waiting=params.get_bool("countWaiting", True))

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        headroom = []
        for ep in endpoints:
            m = ep.metrics
            sharing = 1 + m.running_requests + (m.waiting_queue_size if self.count_waiting else 0)
            headroom.append(max(0.0, 1.0 - m.kv_cache_usage) / sharing)
        best = max(headroom, default=0.0)
        if best <= 0.0:
            return [0.0] * len(endpoints)
        return [h / best for h in headroom]
