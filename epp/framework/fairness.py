"""A request's fairness id: its flow-control tenant, which flow control queues it under and the
`program-aware-fairness` policy treats as its program (llm-d-router's header names and default)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from epp.framework.client_ids import bounded_id

# The newer header first, as the Go EPP reads them.
FAIRNESS_HEADERS = ("x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id")
DEFAULT_FAIRNESS_ID = "default-flow"
# A longer id is kept by its hash: everything keyed by it (flow-control queues, program-aware
# fairness's programs, metric labels) then holds at most this much of a client's header.
MAX_FAIRNESS_ID_CHARS: Final = 256


def fairness_id(headers: Mapping[str, str]) -> str:
    """The request's fairness id (headers lower-cased, as epp keeps them); the default without one;
    `xxh3:<hash>` for one longer than MAX_FAIRNESS_ID_CHARS."""
    for name in FAIRNESS_HEADERS:
        value = headers.get(name)
        if value:
            return bounded_id(value, MAX_FAIRNESS_ID_CHARS)
    return DEFAULT_FAIRNESS_ID
