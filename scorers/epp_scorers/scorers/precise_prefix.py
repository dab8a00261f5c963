"""`precise-prefix-cache-scorer`: prefers the endpoints that really hold the most of the prompt's
leading blocks in their KV cache, from the engines' KV events (docs/kv-events.md).

The scorer is `precise-prefix-cache-producer` and its scoring in one plugin (upstream's older
layout): the same block index, event subscribers, tokens and parameters. Its score is upstream's:
among the candidates holding at least one leading block, min-max normalized block counts
((n - min) / (max - min), 1 for all of them when they hold the same number); 0 for the others.

Consumes: nothing (tokens from a configured `tokenizer` / `token-producer`, else its own
tokenizer). Produces: `prefix-cache-match` under its own name (a `PrefixMatch`, as upstream's
scorer publishes its match), so `no-hit-lru-scorer` and the other consumers of a prefix match can
read it (`prefixMatchInfoProducerName: precise-prefix-cache-scorer`). Parameters: as
`precise-prefix-cache-producer` (`tokenProcessorConfig`, `indexerConfig`, `kvEventsConfig`,
`speculativeIndexing`).

    plugins:
    - type: tokenizer
      parameters: {modelName: Qwen/Qwen3-32B}
    - type: precise-prefix-cache-scorer
      parameters:
        tokenProcessorConfig: {blockSize: 64, hashSeed: "42"}
        kvEventsConfig: {zmqEndpoint: "tcp://*:5557"}
    schedulingProfiles:
    - name: default
      plugins:
      - {pluginRef: precise-prefix-cache-scorer, weight: 3}
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.framework import CycleState, Endpoint, InferenceRequest, Scorer
from epp_scorers.producers.precise_prefix import PrecisePrefixCacheProducer


class PrecisePrefixCacheScorer(PrecisePrefixCacheProducer, Scorer):
    """Prefers endpoints that hold more of the prompt's leading blocks, as their KV events say
    (upstream's min-max normalized block counts)."""

    type_name = "precise-prefix-cache-scorer"

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        match = cycle.read(self.key)
        matched = match.matched if match is not None else self.matched(cycle, request, endpoints)[0]
        # Normalized over this profile's candidates (the match covers every endpoint of the request).
        held = [matched.get(ep.key, 0) for ep in endpoints]
        if not any(held):
            return [0.0] * len(endpoints)
        low, high = min(n for n in held if n), max(held)
        if low == high:
            return [1.0 if n else 0.0 for n in held]
        span = high - low
        return [(n - low) / span if n else 0.0 for n in held]
