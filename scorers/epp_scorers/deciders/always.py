"""`always-disagg-pd-decider`: prefill every request on a separate prefill endpoint.

For tests, and for deployments where prefill always goes remote: whatever the prompt, the
handler's `prefill` profile runs after the decode pick.

Consumes: nothing. Produces: nothing. Parameters: none.

    plugins:
    - type: always-disagg-pd-decider
    - type: disagg-profile-handler
      parameters:
        deciders:
          prefill: always-disagg-pd-decider
"""

from __future__ import annotations

from epp.framework import CycleState, Endpoint, InferenceRequest, PdDecider


class AlwaysDisaggPDDecider(PdDecider):
    """Disaggregate every request (for tests, and deployments where prefill always goes remote)."""

    type_name = "always-disagg-pd-decider"

    def disaggregate(self, cycle: CycleState, request: InferenceRequest, decode_endpoint: Endpoint) -> bool:
        return True
