"""`no-hit-lru-scorer`: spread requests that no endpoint has a cached prefix for.

A request is "cold" when the prefix producer found no matched block on any candidate. Cold
requests are steered to the endpoint that has gone longest without receiving a cold request, so
that new prefixes (new conversations, new system prompts) are spread over the pool instead of
piling onto the endpoint that the load scorers happen to favour. Warm requests score 0.5
everywhere (no preference: the prefix scorer decides).

For a cold request over n candidates: candidates that never received a cold request come first,
in candidate order (rank 0, 1, ...), then the others from least to most recently used (rank k +
their position in the LRU); score = max(0, 1 - rank / (n - 1)). One candidate scores 1.

After the pick of a cold request, the chosen endpoint (and the `prefill` profile's, for P/D)
becomes the most recently used. The LRU holds `lruSize` endpoints (default 1024).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import ClassVar

from epp.framework import (
    DEFAULT_PREFIX_PRODUCER,
    PREFIX_MATCH_DATA,
    CycleState,
    Endpoint,
    InferenceRequest,
    Params,
    PrefixMatch,
    SchedulingResult,
    data_key,
)

DEFAULT_LRU_SIZE = 1024


class NoHitLruScorer:
    type_name: ClassVar[str] = "no-hit-lru-scorer"

    def __init__(self, name: str = type_name, params: Params | None = None) -> None:
        params = params or Params(None, name)
        self.name = name
        size = params.get_int("lruSize", DEFAULT_LRU_SIZE)
        self.lru_size = size if size > 0 else DEFAULT_LRU_SIZE
        producer = params.get_str("prefixMatchInfoProducerName", "") or DEFAULT_PREFIX_PRODUCER
        self._key = data_key(PREFIX_MATCH_DATA, producer)
        params.unimplemented(
            "prefixPluginType", "prefixPluginName", reason="the match comes from the prefix producer"
        )
        self._cold_key = f"{self.type_name}/{name}/cold"
        self.lru: OrderedDict[str, None] = OrderedDict()  # endpoint key, least recently used first

    def consumes(self) -> Collection[str]:
        return (self._key,)

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        match: PrefixMatch | None = cycle.read(self._key)
        matched = match.matched if match is not None else {}
        cold = not any(matched.get(ep.key, 0) > 0 for ep in endpoints)
        cycle.write(self._cold_key, cold)
        n = len(endpoints)
        if not cold:
            return [0.5] * n
        if n == 1:
            return [1.0]
        position = {key: i for i, key in enumerate(self.lru)}
        never_used = 0
        ranks: list[int] = []
        for ep in endpoints:
            if ep.key not in position:
                ranks.append(never_used)
                never_used += 1
            else:
                ranks.append(-1)
        span = n - 1
        out = []
        for ep, rank in zip(endpoints, ranks, strict=True):
            if rank < 0:
                rank = never_used + position[ep.key]
            out.append(max(0.0, 1.0 - rank / span))
        return out

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        if not cycle.read(self._cold_key, False):
            return
        for profile in result.profiles.values():  # each profile's pick (decode, and prefill under P/D)
            if profile.endpoints:
                key = profile.endpoints[0].key
                self.lru[key] = None
                self.lru.move_to_end(key)
        while len(self.lru) > self.lru_size:
            self.lru.popitem(last=False)

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        self.lru.pop(endpoint.key, None)
