"""`precise-prefix-cache-scorer`: prefers the endpoints that really hold the most of the prompt's
leading blocks in their KV cache, from the engines' KV events (docs/kv-events.md).

The scorer is `precise-prefix-cache-producer` and its scoring in one plugin (upstream's older
layout): the same block index, event subscribers, tokens and parameters. Its score is upstream's:
among the candidates holding at least one leading block, min-max normalized block counts
((n - min) / (max - min), 1 for all of them when they hold the same number); 0 for the others.

Consumes: nothing (tokens from a configured `tokenizer` / `token-producer`, else its own
tokenizer). Produces: nothing. Parameters: as `precise-prefix-cache-producer`
(`tokenProcessorConfig`, `indexerConfig`, `kvEventsConfig`, `speculativeIndexing`).

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
from epp_scorers.producers.precise_prefix import PRECISE_PARAMETERS, PreciseBase


class PrecisePrefixCacheScorer(PreciseBase, Scorer):
    """Prefers endpoints that hold more of the prompt's leading blocks, as their KV events say
    (upstream's min-max normalized block counts)."""

    type_name = "precise-prefix-cache-scorer"
    parameters = PRECISE_PARAMETERS

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        matched, _total = self.matched(cycle, request, endpoints)
        if not matched:
            return [0.0] * len(endpoints)
        low, high = min(matched.values()), max(matched.values())
        if low == high:
            return [1.0 if ep.key in matched else 0.0 for ep in endpoints]
        span = high - low
        return [(matched[ep.key] - low) / span if ep.key in matched else 0.0 for ep in endpoints]
