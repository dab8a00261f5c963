"""Read token usage from a response body as it streams past, without holding it all.

Streaming (SSE): complete `data:` lines are inspected; only one that mentions "usage" is parsed.
Non-streaming JSON: a body of at most _WHOLE_JSON_BODY bytes is kept and parsed once at the end;
of a larger one (an embeddings answer can be megabytes) only the last _JSON_TAIL bytes are kept,
and the `"usage": {...}` object found last in them is parsed: OpenAI-style servers (vLLM, SGLang)
write `usage` after `choices` / `data`. So a response holds at most that much memory while it
streams past, and no parse on the event loop grows with its size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import orjson

_WHOLE_JSON_BODY = 64 * 1024
_JSON_TAIL = 64 * 1024
_MAX_SSE_LINE = 1024 * 1024
_USAGE_KEY = b'"usage"'
_MAX_USAGE_KEYS = 4  # "usage" keys tried, the last first
_MAX_USAGE_BRACES = 4  # closing braces tried after each


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


def usage_in_tail(tail: bytes) -> Usage | None:
    """The usage in the last `"usage": {...}` of a JSON body's tail that parses as an object (an
    escaped `\\"usage\\"` is inside a string, and not a key). A few keys and closing braces are
    tried at most, so no tail, however made, costs more than a few small parses."""
    at = tail.rfind(_USAGE_KEY)
    for _ in range(_MAX_USAGE_KEYS):
        if at < 0:
            return None
        key_end = at + len(_USAGE_KEY)
        start = tail.find(b"{", key_end)
        if (at == 0 or tail[at - 1] != 0x5C) and start > 0 and tail[key_end:start].strip() == b":":
            end = start
            for _ in range(_MAX_USAGE_BRACES):  # usage nests one object (prompt_tokens_details)
                end = tail.find(b"}", end + 1)
                if end < 0:
                    break
                with contextlib.suppress(orjson.JSONDecodeError):
                    return usage_from({"usage": orjson.loads(tail[start : end + 1])})
        at = tail.rfind(_USAGE_KEY, 0, at)
    return None


class UsageReader:
    __slots__ = ("_buffer", "_size", "streaming", "usage")

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self._buffer = bytearray()
        self._size = 0  # the JSON body's bytes so far
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._buffer += chunk
        if not self.streaming:
            self._size += len(chunk)
            if len(self._buffer) > 2 * _JSON_TAIL:
                del self._buffer[:-_JSON_TAIL]  # only the tail is read (at most twice as much held)
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
            else:
                found = None
                if self._size <= _WHOLE_JSON_BODY:
                    with contextlib.suppress(orjson.JSONDecodeError):
                        found = usage_from(orjson.loads(bytes(self._buffer)))
                else:
                    found = usage_in_tail(bytes(self._buffer[-_JSON_TAIL:]))
                if found is not None:
                    self.usage = found
            self._buffer = bytearray()
        return self.usage
