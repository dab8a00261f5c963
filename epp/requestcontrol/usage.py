"""Read token usage from a response body as it streams past, without holding it all.

Streaming (SSE): complete `data:` lines are inspected; only one that mentions "usage" is parsed.
Non-streaming JSON: the body is kept (up to a bound) and parsed once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

_MAX_JSON_BODY = 8 * 1024 * 1024
_MAX_SSE_LINE = 1024 * 1024


@dataclass(slots=True)
class Usage:
    """Token counts a model server reported for one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


def usage_from(obj: Any) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return Usage(
        prompt_tokens=_int(usage.get("prompt_tokens", usage.get("input_tokens"))),
        completion_tokens=_int(usage.get("completion_tokens", usage.get("output_tokens"))),
        cached_tokens=_int(cached),
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class UsageReader:
    __slots__ = ("_buffer", "_overflow", "streaming", "usage")

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self._buffer = bytearray()
        self._overflow = False
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        if self._overflow or not chunk:
            return
        self._buffer += chunk
        if not self.streaming:
            if len(self._buffer) > _MAX_JSON_BODY:
                self._overflow = True
                self._buffer = bytearray()
            return
        end = self._buffer.rfind(b"\n")
        if end < 0:
            if len(self._buffer) > _MAX_SSE_LINE:
                self._buffer = bytearray()  # a line this long is not an SSE event we can use
            return
        complete = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        if b"usage" in complete:
            for line in complete.splitlines():
                self._read_event(line)

    def _read_event(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if not payload or payload == b"[DONE]" or b"usage" not in payload:
            return
        try:
            found = usage_from(orjson.loads(payload))
        except orjson.JSONDecodeError:
            return
        if found is not None:
            self.usage = found

    def finish(self) -> Usage | None:
        if self._buffer:
            if self.streaming:
                self._read_event(bytes(self._buffer).strip())
            elif not self._overflow:
                try:
                    found = usage_from(orjson.loads(bytes(self._buffer)))
                except orjson.JSONDecodeError:
                    found = None
                if found is not None:
                    self.usage = found
            self._buffer = bytearray()
        return self.usage
