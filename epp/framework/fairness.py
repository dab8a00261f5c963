"""A request's fairness id: its flow-control tenant, which flow control queues it under and the
`program-aware-fairness` policy treats as its program (llm-d-router's header names and default)."""

from __future__ import annotations

from collections.abc import Mapping

# The newer header first, as the Go EPP reads them.
FAIRNESS_HEADERS = ("x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id")
DEFAULT_FAIRNESS_ID = "default-flow"


def fairness_id(headers: Mapping[str, str]) -> str:
    """The request's fairness id (headers lower-cased, as epp keeps them); the default without one."""
    for name in FAIRNESS_HEADERS:
        value = headers.get(name)
        if value:
            return value
    return DEFAULT_FAIRNESS_ID
