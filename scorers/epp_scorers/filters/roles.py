"""Role filters: keep the endpoints that play a part in prefill/decode disaggregation, by the
`llm-d.ai/role` pod label (values as the Go EPP defines them). An empty result stops the profile.

- `decode-filter`: role decode, prefill-decode, both, encode-prefill-decode, or no role label at
  all (a plain vLLM pod does everything).
- `prefill-filter`: role prefill, encode-prefill, prefill-decode, both, encode-prefill-decode.
  Unlabeled pods are not prefill workers.
- `encode-filter`: role encode, encode-prefill, encode-prefill-decode (multimodal encoders).

Consumes: the `llm-d.ai/role` pod label. Produces: nothing. Parameters: none.

    plugins:
    - type: decode-filter
    - type: prefill-filter
    schedulingProfiles:
    - name: decode
      plugins:
      - pluginRef: decode-filter
      - pluginRef: max-score-picker
    - name: prefill
      plugins:
      - pluginRef: prefill-filter
      - pluginRef: max-score-picker
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from epp.framework import ROLE_LABEL, CycleState, Endpoint, Filter, InferenceRequest
from epp_scorers.filters.labels import LastLabelFilter

# Values of the role label, as the Go EPP defines them.
ROLE_DECODE = "decode"
ROLE_PREFILL = "prefill"
ROLE_ENCODE = "encode"
ROLE_PREFILL_DECODE = "prefill-decode"
ROLE_ENCODE_PREFILL = "encode-prefill"
ROLE_ENCODE_PREFILL_DECODE = "encode-prefill-decode"
ROLE_BOTH = "both"


class RoleFilter(Filter):
    """Keeps endpoints whose `llm-d.ai/role` label is one of `roles` (and, if `allows_no_label`,
    those without the label). No parameters; subclasses set the class attributes."""

    roles: ClassVar[frozenset[str]] = frozenset()
    allows_no_label: ClassVar[bool] = False

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self._last = LastLabelFilter()

    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        return self._last.filter(endpoints, ROLE_LABEL, self.roles, self.allows_no_label)


class DecodeFilter(RoleFilter):
    """Endpoints that decode: role decode, prefill-decode, both, encode-prefill-decode, or no role
    label at all (a plain vLLM pod does everything)."""

    type_name = "decode-filter"
    roles = frozenset({ROLE_DECODE, ROLE_PREFILL_DECODE, ROLE_BOTH, ROLE_ENCODE_PREFILL_DECODE})
    allows_no_label = True


class PrefillFilter(RoleFilter):
    """Endpoints that prefill: role prefill, encode-prefill, prefill-decode, both,
    encode-prefill-decode. Unlabeled pods are not prefill workers."""

    type_name = "prefill-filter"
    roles = frozenset(
        {ROLE_PREFILL, ROLE_ENCODE_PREFILL, ROLE_PREFILL_DECODE, ROLE_BOTH, ROLE_ENCODE_PREFILL_DECODE}
    )
    allows_no_label = False


class EncodeFilter(RoleFilter):
    """Endpoints that encode multimodal inputs: role encode, encode-prefill, encode-prefill-decode."""

    type_name = "encode-filter"
    roles = frozenset({ROLE_ENCODE, ROLE_ENCODE_PREFILL, ROLE_ENCODE_PREFILL_DECODE})
    allows_no_label = False
