"""`prefix-cache-scorer`: prefer endpoints that probably hold the prompt's prefix in their KV cache.

The scorer reads the `PrefixMatch` that `approx-prefix-cache-producer` publishes (matched blocks
per endpoint, prompt blocks, block size; see `epp_scorers.producers.approx_prefix`) and turns it
into a score:

    ratio  = matched blocks / prompt blocks                        (0 when the prompt has no block)
    length = min(1, matched blocks x block size / matchLengthScaleTokens) ^ 2
    score  = matchLengthWeight x length + (1 - matchLengthWeight) x ratio

Older configs put the producer's parameters on the scorer and declare no producer: the loader
then adds the producer itself, with those parameters (`producer_parameters`). With a declared
producer they are ignored (and reported).

Consumes: `prefix-cache-match` (a `PrefixMatch`; the loader adds `approx-prefix-cache-producer`
when no configured plugin produces it). Produces: nothing. Parameters:
`prefixMatchInfoProducerName` (string, default `approx-prefix-cache-producer`),
`matchLengthWeight` (float in [0, 1], default 0), `matchLengthScaleTokens` (int, default 8192;
must be > 0 when matchLengthWeight is > 0); deprecated here, passed to the producer: `autoTune`,
`blockSizeTokens`, `blockSize`, `hashBlockSize`, `maxPrefixBlocksToMatch`,
`maxPrefixTokensToMatch`, `lruCapacityPerServer`.

    plugins:
    - type: prefix-cache-scorer
      parameters:
        matchLengthWeight: 0.5
        matchLengthScaleTokens: 4096
    schedulingProfiles:
    - name: default
      plugins:
      - pluginRef: prefix-cache-scorer
        weight: 3
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Self

import numpy as np

from epp.framework import (
    SMALL_POOL_SIZE,
    Column,
    ConfigError,
    CycleState,
    DataKey,
    Endpoint,
    InferenceRequest,
    ParamDoc,
    Params,
    PluginHandle,
    Scorer,
    Scores,
    endpoint_positions,
)
from epp_scorers.data import DEFAULT_PREFIX_PRODUCER, PREFIX_MATCH

DEFAULT_MATCH_LENGTH_SCALE_TOKENS = 8192

# Producer parameters that older configs set on prefix-cache-scorer.
PRODUCER_PARAMETERS = (
    "autoTune",
    "blockSizeTokens",
    "blockSize",
    "hashBlockSize",
    "maxPrefixBlocksToMatch",
    "maxPrefixTokensToMatch",
    "lruCapacityPerServer",
)
_OWN_PARAMETERS = ("prefixMatchInfoProducerName", "matchLengthWeight", "matchLengthScaleTokens")


class PrefixCacheScorer(Scorer):
    """Prefers endpoints that probably hold more of the prompt's leading blocks: the matched share
    of the prompt, optionally blended with the matched length (`matchLengthWeight`)."""

    type_name = "prefix-cache-scorer"
    parameters = (
        ParamDoc(
            "prefixMatchInfoProducerName",
            "string",
            DEFAULT_PREFIX_PRODUCER,
            "Name of the plugin that publishes the prefix match.",
        ),
        ParamDoc(
            "matchLengthWeight",
            "float",
            "0.0",
            "Weight, in [0, 1], of the matched length against the matched share of the prompt.",
        ),
        ParamDoc(
            "matchLengthScaleTokens",
            "int",
            str(DEFAULT_MATCH_LENGTH_SCALE_TOKENS),
            "Matched tokens at which the length term reaches 1; must be > 0 when matchLengthWeight is > 0.",
        ),
        *(
            ParamDoc(
                key,
                "bool" if key == "autoTune" else "int",
                "",
                f"Deprecated here: a parameter of {DEFAULT_PREFIX_PRODUCER}, passed to the producer the "
                "loader adds (ignored when the config declares one).",
            )
            for key in PRODUCER_PARAMETERS
        ),
    )

    def __init__(
        self,
        name: str = "",
        *,
        prefix_producer: str = DEFAULT_PREFIX_PRODUCER,
        match_length_weight: float = 0.0,
        match_length_scale_tokens: int = DEFAULT_MATCH_LENGTH_SCALE_TOKENS,
        producer_parameters: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(name)
        self.prefix_key = PREFIX_MATCH.for_producer(prefix_producer or DEFAULT_PREFIX_PRODUCER)
        self.match_length_weight = match_length_weight
        self.match_length_scale = match_length_scale_tokens
        # Older configs: producer parameters on the scorer, for the producer the loader adds.
        self._producer_parameters: Mapping[str, Any] = dict(producer_parameters or {})

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        producer = params.get_str("prefixMatchInfoProducerName", "") or DEFAULT_PREFIX_PRODUCER
        weight = params.get_float("matchLengthWeight", 0.0, minimum=0.0, maximum=1.0)
        scale = params.get_int("matchLengthScaleTokens", DEFAULT_MATCH_LENGTH_SCALE_TOKENS)
        if weight > 0 and scale <= 0:
            raise ConfigError(
                f"matchLengthScaleTokens must be > 0 when matchLengthWeight is > 0, got {scale}"
            )
        raw = params.raw()
        carried = {k: raw[k] for k in PRODUCER_PARAMETERS if k in raw}
        unknown = sorted(set(raw) - set(PRODUCER_PARAMETERS) - set(_OWN_PARAMETERS))
        if unknown:
            raise ConfigError(f"unknown parameter {unknown[0]!r}")
        return cls(
            name,
            prefix_producer=producer,
            match_length_weight=weight,
            match_length_scale_tokens=scale,
            producer_parameters=carried,
        )

    def consumes(self) -> Collection[DataKey[Any]]:
        return (self.prefix_key,)

    def producer_parameters(self, key: DataKey[Any]) -> Mapping[str, Any]:
        return self._producer_parameters if key == self.prefix_key else {}

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Scores:
        n = len(endpoints)
        # A numpy array above a few candidates (the profile weights arrays at C speed), else a list.
        scores: list[float] | Column = [0.0] * n if n <= SMALL_POOL_SIZE else np.zeros(n)
        match = cycle.read(self.prefix_key)
        if match is None or not match.total_blocks or not match.matched:
            return scores
        total = match.total_blocks
        # Most endpoints match nothing (score 0): the formula runs only for the few that do,
        # scattered to their positions among the candidates.
        position = endpoint_positions(endpoints)
        w = self.match_length_weight
        tokens_per_block = match.block_size_tokens / self.match_length_scale if w else 0.0
        for key, m in match.matched.items():
            i = position(key)
            if i is None or not m:
                continue
            if w == 0.0:
                scores[i] = m / total
            else:
                length = min(1.0, m * tokens_per_block)
                scores[i] = w * length * length + (1.0 - w) * m / total
        return scores
