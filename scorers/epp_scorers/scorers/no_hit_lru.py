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
becomes the most recently used. The LRU holds `lruSize` endpoints (default 1024); an endpoint
that leaves the pool leaves the LRU.

Consumes: `prefix-cache-match` (a `PrefixMatch`; the loader adds `approx-prefix-cache-producer`
when no configured plugin produces it). Produces: nothing. Hooks: pre-request (updates the LRU),
endpoint removal. Parameters: `lruSize` (int, default 1024; below 1 falls back to the default),
`prefixMatchInfoProducerName` (string, default `approx-prefix-cache-producer`);
`prefixPluginType` and `prefixPluginName` are accepted for older configs and ignored.

    plugins:
    - type: no-hit-lru-scorer
      parameters:
        lruSize: 2048
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import Any, Self

from epp.framework import (
    CycleState,
    DataKey,
    Endpoint,
    EndpointListener,
    InferenceRequest,
    ParamDoc,
    Params,
    PluginHandle,
    PreRequest,
    SchedulingResult,
    Scorer,
    endpoint_positions,
)
from epp_scorers.data import DEFAULT_PREFIX_PRODUCER, PREFIX_MATCH

DEFAULT_LRU_SIZE = 1024


class NoHitLruScorer(Scorer, PreRequest, EndpointListener):
    """Spreads cold requests (no candidate holds any of the prompt's prefix blocks) over the pool:
    the endpoint that has gone longest without a cold request scores highest. Warm requests score
    0.5 everywhere."""

    type_name = "no-hit-lru-scorer"
    parameters = (
        ParamDoc(
            "lruSize",
            "int",
            str(DEFAULT_LRU_SIZE),
            "Endpoints the LRU remembers; below 1 falls back to the default.",
        ),
        ParamDoc(
            "prefixMatchInfoProducerName",
            "string",
            DEFAULT_PREFIX_PRODUCER,
            "Name of the plugin that publishes the prefix match.",
        ),
        ParamDoc("prefixPluginType", "string", "", "Accepted for older configs and ignored."),
        ParamDoc("prefixPluginName", "string", "", "Accepted for older configs and ignored."),
    )

    def __init__(
        self,
        name: str = "",
        *,
        lru_size: int = DEFAULT_LRU_SIZE,
        prefix_producer: str = DEFAULT_PREFIX_PRODUCER,
    ) -> None:
        super().__init__(name)
        self.lru_size = lru_size if lru_size > 0 else DEFAULT_LRU_SIZE
        self._key = PREFIX_MATCH.for_producer(prefix_producer or DEFAULT_PREFIX_PRODUCER)
        self._cold_key = DataKey[bool](f"{self.type_name}/cold", self.name)
        self.lru: OrderedDict[str, None] = OrderedDict()  # endpoint key, least recently used first

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        size = params.get_int("lruSize", DEFAULT_LRU_SIZE)
        producer = params.get_str("prefixMatchInfoProducerName", "") or DEFAULT_PREFIX_PRODUCER
        params.unimplemented(
            "prefixPluginType", "prefixPluginName", reason="the match comes from the prefix producer"
        )
        return cls(name, lru_size=size, prefix_producer=producer)

    def consumes(self) -> Collection[DataKey[Any]]:
        return (self._key,)

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        match = cycle.read(self._key)
        matched = match.matched if match is not None else {}
        # Cold: no candidate holds any of the prompt (looked up from the few matched endpoints,
        # not by a pass over the candidates).
        position = endpoint_positions(endpoints)
        cold = not any(blocks > 0 and position(key) is not None for key, blocks in matched.items())
        cycle.write(self._cold_key, cold)
        n = len(endpoints)
        if not cold:
            return [0.5] * n
        if n == 1:
            return [1.0]
        used = {key: i for i, key in enumerate(self.lru)}
        never_used = 0
        ranks: list[int] = []
        for ep in endpoints:
            if ep.key not in used:
                ranks.append(never_used)
                never_used += 1
            else:
                ranks.append(-1)
        span = n - 1
        out = []
        for ep, rank in zip(endpoints, ranks, strict=True):
            if rank < 0:
                rank = never_used + used[ep.key]
            out.append(max(0.0, 1.0 - rank / span))
        return out

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        if not cycle.read(self._cold_key):
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
