"""A lean HTTP/1.1 client for model servers' /metrics: one keep-alive connection per endpoint.

The scraper polls every endpoint 20 times a second; a general-purpose client (aiohttp's) spends
about 400 µs of CPU on each poll, most of the scraper's cost at 100 pods. This one does only what
a poll needs, on an `asyncio.Protocol`: the request is a constant; the answer's status line and
headers are read once they are complete, then its body (Content-Length, chunked, or until the
server closes) is handed as it arrives to the caller's `PageReader` (never kept whole), so a poll
costs a write and one callback a socket read.

Limits, as before: the page's declared size past `max_bytes` is refused unread, an undeclared one
is cut at `max_bytes`; a head past 64 kB, a bad status line, bad chunk framing, or a server that
closes mid-page are errors. After any error, or a page whose end is the server closing, the
connection is dropped and the next poll opens a new one.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Protocol

from epp.datalayer.model_server_metrics import PageLimitError
from epp.errors import MetricsParseError

MAX_HEAD_BYTES = 64 * 1024


class PageSink(Protocol):
    """Where a page's body goes: `PageReader` (epp.datalayer.model_server_metrics)."""

    bytes_read: int

    def feed(self, chunk: bytes) -> None: ...


# Parsing states.
_HEAD, _FIXED, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class MetricsConnection(asyncio.Protocol):
    """One keep-alive connection to one endpoint's metrics server; one poll at a time."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sink: PageSink | None = None
        self._max_bytes = 0
        self._state = _DONE
        self._buffer = b""
        self._remaining = 0  # body bytes (Content-Length) or chunk bytes still to come
        self._keep_alive = True
        self.closed = False

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._state == _UNTIL_CLOSE:
            self._finish(None)
        elif self._waiter is not None:
            self._finish(exc or MetricsParseError("the server closed the connection mid-page"))

    def eof_received(self) -> bool | None:
        return False  # close our side too: connection_lost follows

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self.close()  # nothing asked: a server talking out of turn
            return
        try:
            self._receive(data)
        except MetricsParseError as exc:
            self._finish(exc)

    # --- polling ---------------------------------------------------------------------------------

    async def get(self, request: bytes, sink: PageSink, max_bytes: int) -> None:
        """Send `request` and feed the answer's body to `sink`; raises MetricsParseError (a bad
        answer, an HTTP status other than 200; PageLimitError past `max_bytes`) or OSError."""
        if self._transport is None or self.closed:
            raise ConnectionError("not connected")
        self._waiter = asyncio.get_running_loop().create_future()
        self._sink, self._max_bytes = sink, max_bytes
        self._state, self._buffer, self._keep_alive = _HEAD, b"", True
        self._transport.write(request)
        try:
            await self._waiter
        finally:
            self._waiter = self._sink = None
            if self._state != _DONE or not self._keep_alive:
                self.close()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    # --- the answer ------------------------------------------------------------------------------

    def _finish(self, error: BaseException | None) -> None:
        waiter = self._waiter
        if error is None:
            self._state = _DONE
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def _body(self, data: bytes) -> None:
        sink = self._sink
        assert sink is not None
        if sink.bytes_read + len(data) > self._max_bytes:
            raise PageLimitError(f"the page is past the limit of {self._max_bytes} bytes, not read further")
        sink.feed(data)

    def _receive(self, data: bytes) -> None:
        while data:
            state = self._state
            if state == _FIXED:
                if len(data) > self._remaining:
                    raise MetricsParseError("the server sent more than its Content-Length")
                self._body(data)
                self._remaining -= len(data)
                if not self._remaining:
                    self._finish(None)
                return
            if state == _UNTIL_CLOSE:
                self._body(data)
                return
            if state == _CHUNK_DATA:
                piece = data[: self._remaining]
                self._body(piece)
                self._remaining -= len(piece)
                data = data[len(piece) :]
                if not self._remaining:
                    self._state = _CHUNK_CRLF
                continue
            if state == _DONE:
                raise MetricsParseError("the server sent more than one answer")
            # _HEAD, _CHUNK_SIZE, _CHUNK_CRLF, _TRAILERS: line-oriented; buffered until complete.
            data = self._buffer + data if self._buffer else data
            self._buffer = b""
            data = self._lines(data)

    def _lines(self, data: bytes) -> bytes:
        """The line-oriented states; returns what follows the part consumed."""
        state = self._state
        if state == _HEAD:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEAD_BYTES:
                    raise MetricsParseError(f"the answer's head is past {MAX_HEAD_BYTES} bytes")
                self._buffer = data
                return b""
            self._head(data[:end])
            return data[end + 4 :]
        end = data.find(b"\r\n")
        if end < 0:
            if len(data) > 1024:
                raise MetricsParseError("bad chunked encoding: an overlong chunk line")
            self._buffer = data
            return b""
        line, rest = data[:end], data[end + 2 :]
        if state == _CHUNK_CRLF:
            if line:
                raise MetricsParseError("bad chunked encoding: no CRLF after a chunk")
            self._state = _CHUNK_SIZE
        elif state == _CHUNK_SIZE:
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise MetricsParseError(f"bad chunked encoding: chunk size {size_text[:20]!r}") from None
            if size < 0 or len(size_text) > 16:
                raise MetricsParseError(f"bad chunked encoding: chunk size {size_text[:20]!r}")
            if size == 0:
                self._state = _TRAILERS
            else:
                self._state, self._remaining = _CHUNK_DATA, size  # the limit is checked as it arrives
        elif state == _TRAILERS and not line:  # a trailer line is skipped; an empty one ends it
            self._finish(None)
            if rest:
                raise MetricsParseError("the server sent more than one answer")
        return rest

    def _head(self, head: bytes) -> None:
        status_line, _, header_block = head.partition(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise MetricsParseError(f"not an HTTP/1.x answer: {status_line[:60]!r}")
        status = int(parts[1])
        length: int | None = None
        chunked = False
        self._keep_alive = parts[0] != b"HTTP/1.0"
        for line in header_block.split(b"\r\n") if header_block else ():
            name, sep, value = line.partition(b":")
            if not sep:
                raise MetricsParseError(f"bad header line {line[:60]!r}")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                if not value.isdigit() or len(value) > 18:
                    raise MetricsParseError(f"bad Content-Length {value[:20]!r}")
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.lower().endswith(b"chunked")
            elif name == b"connection":
                self._keep_alive = value.lower() != b"close"
        if status != 200:
            self._keep_alive = False  # its body is not read: the connection goes
            raise MetricsParseError(f"HTTP {status}")
        if chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            if length > self._max_bytes:
                raise PageLimitError(f"the page is {length} bytes, past the limit of {self._max_bytes}")
            self._state, self._remaining = _FIXED, length
            if not length:
                self._finish(None)
        else:
            self._state, self._keep_alive = _UNTIL_CLOSE, False


async def connect(host: str, port: int, ssl_context: ssl.SSLContext | None) -> MetricsConnection:
    """A new connection (TLS when `ssl_context` is given). Raises OSError or ssl.SSLError."""
    loop = asyncio.get_running_loop()
    _, connection = await loop.create_connection(
        MetricsConnection, host, port, ssl=ssl_context, server_hostname=host if ssl_context else None
    )
    return connection


def request_bytes(host: str, port: int, path: str) -> bytes:
    """The GET every poll of one endpoint sends."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return (
        f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: epp\r\n"
        "Accept: text/plain;version=0.0.4\r\nAccept-Encoding: identity\r\n\r\n"
    ).encode("latin-1")
