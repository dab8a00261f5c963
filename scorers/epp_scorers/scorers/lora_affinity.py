"""`lora-affinity-scorer`: prefer endpoints where the request's LoRA adapter is already loaded.

    adapter running on the endpoint                          -> 1.0
    else room to load one (running + waiting < max_lora)     -> 0.8
    else adapter waiting to be loaded there                  -> 0.6
    else                                                     -> 0.0

The adapter is the request's target model; the sets come from `vllm:lora_requests_info`
(`running_lora_adapters`, `waiting_lora_adapters`, `max_lora`).

Consumes: scraped metrics. Produces: nothing. Parameters: none.

    plugins:
    - type: lora-affinity-scorer
    schedulingProfiles:
    - name: default
      plugins:
      - pluginRef: lora-affinity-scorer
        weight: 1
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.framework import CycleState, Endpoint, InferenceRequest, Scorer


class LoraAffinityScorer(Scorer):
    """Prefers endpoints where the request's LoRA adapter (its target model) is running (1.0), then
    those with room to load it (0.8), then those where it is waiting to load (0.6); else 0."""

    type_name = "lora-affinity-scorer"

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        adapter = request.target_model
        out = []
        for ep in endpoints:
            m = ep.metrics
            if adapter in m.running_loras:
                out.append(1.0)
            elif len(m.running_loras) + len(m.waiting_loras) < m.max_loras:
                out.append(0.8)
            elif adapter in m.waiting_loras:
                out.append(0.6)
            else:
                out.append(0.0)
        return out
