"""`prefix-based-pd-decider`: disaggregate prefill when the decode pick would have to prefill many
tokens itself.

Once the decode endpoint is picked, the decider estimates the tokens that endpoint would have to
prefill: input tokens (4 bytes of UTF-8 a token) minus the prefix blocks it probably holds x block
size, from the prefix producer's `PrefixMatch`. When that is at least `nonCachedTokens`, the
prompt is prefilled on a separate prefill endpoint (the handler's `prefill` profile).
`nonCachedTokens` 0 (the default) disables it: never disaggregate. Prompts shorter than
`promptTokens` (0: no gate) are never disaggregated.

Consumes: `prefix-cache-match` (a `PrefixMatch`; the loader adds `approx-prefix-cache-producer`
when no configured plugin produces it), only when `nonCachedTokens` > 0. Produces: nothing.
Parameters: `nonCachedTokens` (int >= 0, default 0), `promptTokens` (int >= 0, default 0),
`prefixMatchInfoProducerName` (string, default `approx-prefix-cache-producer`).

    plugins:
    - type: prefix-based-pd-decider
      parameters:
        nonCachedTokens: 1024
    - type: disagg-profile-handler
      parameters:
        deciders:
          prefill: prefix-based-pd-decider
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any, Self

from epp.framework import (
    CycleState,
    DataKey,
    Endpoint,
    InferenceRequest,
    ParamDoc,
    Params,
    PdDecider,
    PluginHandle,
)
from epp_scorers.data import DEFAULT_PREFIX_PRODUCER, PREFIX_MATCH

log = logging.getLogger(__name__)


class PrefixBasedPDDecider(PdDecider):
    """Disaggregate when the decode pick would have to prefill at least `nonCachedTokens` tokens:
    input tokens (UTF-8 bytes / 4) minus the prefix blocks it holds x block size. `nonCachedTokens`
    0 disables it (never disaggregate); prompts under `promptTokens` (0: no gate) never are."""

    type_name = "prefix-based-pd-decider"
    parameters = (
        ParamDoc(
            "nonCachedTokens",
            "int",
            "0",
            "Uncached tokens on the decode pick from which the prompt is prefilled remotely (0: never).",
        ),
        ParamDoc(
            "promptTokens", "int", "0", "Prompts shorter than this are never disaggregated (0: no gate)."
        ),
        ParamDoc(
            "prefixMatchInfoProducerName",
            "string",
            DEFAULT_PREFIX_PRODUCER,
            "Name of the plugin that publishes the prefix match.",
        ),
    )

    def __init__(
        self,
        name: str = "",
        *,
        non_cached_tokens: int = 0,
        prompt_tokens: int = 0,
        prefix_producer: str = DEFAULT_PREFIX_PRODUCER,
    ) -> None:
        super().__init__(name)
        self.non_cached_tokens = non_cached_tokens
        self.prompt_tokens = prompt_tokens
        self.prefix_key = PREFIX_MATCH.for_producer(prefix_producer or DEFAULT_PREFIX_PRODUCER)

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        non_cached = params.get_int("nonCachedTokens", 0, minimum=0)
        prompt = params.get_int("promptTokens", 0, minimum=0)
        producer = params.get_str("prefixMatchInfoProducerName", "") or DEFAULT_PREFIX_PRODUCER
        if non_cached == 0:
            params.warn("nonCachedTokens is 0: this decider never disaggregates (set it to enable P/D)")
        return cls(name, non_cached_tokens=non_cached, prompt_tokens=prompt, prefix_producer=producer)

    def consumes(self) -> Collection[DataKey[Any]]:
        return (self.prefix_key,) if self.non_cached_tokens else ()

    def disaggregate(self, cycle: CycleState, request: InferenceRequest, decode_endpoint: Endpoint) -> bool:
        threshold = self.non_cached_tokens
        if not threshold:
            return False
        input_tokens = request.input_tokens_estimate
        if input_tokens < threshold or input_tokens < self.prompt_tokens:
            return False
        match = cycle.read(self.prefix_key)
        if match is None:  # the loader always adds the producer; a hand-built scheduler may not
            log.error("%s: no prefix-cache match in the cycle state; serving decode-only", self.name)
            return False
        return match.uncached_tokens(decode_endpoint, input_tokens) >= threshold
