"""The bytes of a request whose model was rewritten (Director.rewrite_model), both ways.

Upstream (llm-d-router) re-serializes the parsed body with the target model when, and only when,
the model changed, and sets the request's content-length to the new size; on the way back it
replaces `"model":"<target>"` with the model the client asked for in each response body chunk,
so the client sees the name it sent. epp does the same; the request's content-length is set by
the routing reply from the forwarded body's size (Envoy, with bodies in FULL_DUPLEX_STREAMED
mode, forwards both bodies chunked, so a changed length reaches neither side wrongly declared:
tests/e2e/test_model_rewrite_e2e.py).
"""

from __future__ import annotations

import orjson

from epp.errors import EppError, ErrorCode
from epp.framework import InferenceRequest


def forwarded_body(request: InferenceRequest) -> bytes:
    """The body sent to the model server: the parsed body (its `model` now the target) as JSON.
    Raises a 400 when the body cannot be written back (orjson writes at most 254 levels)."""
    try:
        return orjson.dumps(request.body)
    except orjson.JSONEncodeError as exc:
        raise EppError(
            ErrorCode.BAD_REQUEST, f"request JSON is nested too deeply to rewrite its model ({exc})"
        ) from None


class ResponseModelRestorer:
    """Puts the client's model name back into the response body, chunk by chunk: `"model":` then
    the target's JSON string (with or without one space after the colon, as upstream matches)."""

    __slots__ = ("_pairs",)

    def __init__(self, request: InferenceRequest) -> None:
        target, incoming = orjson.dumps(request.target_model), orjson.dumps(request.model)
        self._pairs = tuple(
            (b'"model":' + space + target, b'"model":' + space + incoming) for space in (b"", b" ")
        )

    def restore(self, chunk: bytes) -> bytes:
        for old, new in self._pairs:
            if old in chunk:
                chunk = chunk.replace(old, new)
        return chunk
