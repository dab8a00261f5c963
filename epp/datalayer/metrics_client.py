"""A lean HTTP/1.1 client for model servers' /metrics: one keep-alive connection per endpoint.

The scraper polls every endpoint 20 times a second; a general-purpose client (aiohttp's) spends
about 400 µs of CPU on each poll, most of the scraper's cost at 100 pods. This one does only what
a poll needs, on an `asyncio.Protocol`: the request is a constant, and the answer is framed by
`httptools` (Node.js's llhttp parser, the one uvicorn uses: status line, headers, Content-Length,
chunked encoding), whose body callbacks hand the page as it arrives to the caller's `PageReader`
(never kept whole). A poll costs a write and one parser call a socket read; an answer that is
byte for byte the connection's last good one (an idle server's, until its Date header moves) is
handed over without llhttp (`data_received`), or, to a caller that says it holds that page
already (`start`'s `on_repeat`), not handed over at all.

Limits: the page's declared size past `max_bytes` is refused unread, an undeclared one is cut at
`max_bytes`; a head past 64 kB, an answer that is not HTTP/1.x, a bad header or chunk framing, or a
server that closes mid-page are errors. After any error, or a page whose end is the server closing,
the connection is dropped and the next poll opens a new one.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Protocol, cast

import httptools

from epp.datalayer.model_server_metrics import MEMO_MAX_BYTES, HttpStatusError, PageLimitError
from epp.errors import MetricsParseError

MAX_HEAD_BYTES = 64 * 1024


class PageSink(Protocol):
    """Where a page's body goes: `PageReader` (epp.datalayer.model_server_metrics)."""

    bytes_read: int

    def feed(self, chunk: bytes) -> None: ...


class MetricsConnection(asyncio.Protocol):
    """One keep-alive connection to one endpoint's metrics server; one poll at a time."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_done: Callable[[BaseException | None], None] | None = None  # the poll in flight
        self._on_repeat: Callable[[], None] | None = None  # ... and its caller's, if any (`start`)
        self._sink: PageSink | None = None
        self._max_bytes = 0
        self._parser: httptools.HttpResponseParser | None = None
        # Bytes fed before the head was complete (a memory bound while llhttp buffers a header
        # line: the same read may carry the page too), and the headers' own size.
        self._head_bytes = 0
        self._header_bytes = 0
        self._in_head = False
        self._length: int | None = None  # Content-Length, when declared
        self._chunked = False
        self._until_close = False  # neither: the page ends when the server closes
        self._messages = 0
        self._error: BaseException | None = None
        self._complete = False
        self._keep_alive = False
        self.closed = False
        # The last answer that came whole in one read and was a good page, with its body: the
        # same bytes again parse the same way (see `data_received`).
        self._last_answer: bytes | None = None
        self._last_body = b""
        self._last_max_bytes = 0
        self._reads = 0  # reads of the poll in flight
        self._bodies = 0  # body spans of the poll in flight, the last one in _body
        self._body = b""

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not derive from asyncio.Transport, so no isinstance.
        self._transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._on_done is None:
            return
        if self._until_close and self._error is None and exc is None:
            self._finish(None)  # a page that ends when the server closes (a reset is no end)
        else:
            self._finish(self._error or exc or MetricsParseError("the server closed the connection mid-page"))

    def eof_received(self) -> bool | None:
        return False  # close our side too: connection_lost follows

    def data_received(self, data: bytes) -> None:
        if self._on_done is None:
            self.close()  # nothing asked: a server talking out of turn
            return
        parser = self._parser
        if parser is None:  # the poll's first read
            if data == self._last_answer and self._max_bytes == self._last_max_bytes:
                # Byte for byte the last good answer (an idle server's, until its Date header
                # moves): llhttp would make the same calls again, so its page is given as is,
                # or not at all to a caller that holds it already.
                on_repeat = self._on_repeat
                if on_repeat is not None:
                    self._on_done = self._on_repeat = self._sink = None
                    on_repeat()
                    return
                if self._last_body:
                    self._sink.feed(self._last_body)  # type: ignore[union-attr]
                self._complete = self._keep_alive = True
                self._finish(None)
                return
            parser = self._parse_anew()
        self._reads += 1
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES + self._max_bytes:
                self._finish(MetricsParseError(f"the answer's head is past {MAX_HEAD_BYTES} bytes"))
                return
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            # A callback recorded the error (else: what it raised).
            cause = exc.__context__
            self._error = (
                self._error
                or (cause if isinstance(cause, Exception) else None)
                or (MetricsParseError(f"the page could not be read: {exc}"))
            )
        except httptools.HttpParserError as exc:
            self._error = self._error or _framing_error(exc, self._in_head)
        if self._error is not None:
            self._finish(self._error)
        elif self._complete:
            whole = (
                self._reads == 1 and self._keep_alive and self._bodies <= 1 and len(data) <= MEMO_MAX_BYTES
            )
            self._last_answer = data if whole else None  # a good answer, read at once
            self._last_body, self._last_max_bytes = (self._body, self._max_bytes) if whole else (b"", 0)
            self._finish(None)

    # --- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._messages += 1
        if self._messages > 1:
            self._fail(MetricsParseError("the server sent more than one answer"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEAD_BYTES:
            self._fail(MetricsParseError(f"the answer's head is past {MAX_HEAD_BYTES} bytes"))
        if name.lower() == b"content-length":
            value = value.strip()
            if not value.isdigit() or len(value) > 18:
                self._fail(MetricsParseError(f"bad Content-Length {value[:20]!r}"))
            else:
                self._length = int(value)
        elif name.lower() == b"transfer-encoding":
            self._chunked = value.strip().lower().endswith(b"chunked")

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self._in_head = False
        status = self._parser.get_status_code()
        if status != 200:
            self._fail(HttpStatusError(status))  # its body is not read
        elif self._length is not None and self._length > self._max_bytes:
            self._fail(
                PageLimitError(f"the page is {self._length} bytes, past the limit of {self._max_bytes}")
            )
        self._until_close = not self._chunked and self._length is None

    def on_body(self, body: bytes) -> None:
        if self._error is not None:
            return
        sink = self._sink
        assert sink is not None
        if sink.bytes_read + len(body) > self._max_bytes:
            self._fail(
                PageLimitError(f"the page is past the limit of {self._max_bytes} bytes, not read further")
            )
            return
        self._bodies += 1
        self._body = body
        try:
            sink.feed(body)
        except Exception as exc:  # a bad page, a limit: the poll's error, not llhttp's
            self._fail(exc)

    def on_message_complete(self) -> None:
        assert self._parser is not None
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()  # llhttp knows it only until here

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error

    # --- polling ---------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A poll is in flight."""
        return self._on_done is not None

    def start(
        self,
        request: bytes,
        sink: PageSink,
        max_bytes: int,
        on_done: Callable[[BaseException | None], None],
        on_repeat: Callable[[], None] | None = None,
    ) -> None:
        """Send `request` and feed the answer's body to `sink`; `on_done` is called once, from a
        callback of the loop's, with None when the page is complete, else the error:
        MetricsParseError (a bad answer, an HTTP status other than 200; PageLimitError past
        `max_bytes`), OSError (the connection failed), or TimeoutError (`expire()`). After an
        error, or an answer that does not keep the connection alive, the connection is closed.
        With `on_repeat`, an answer byte for byte the connection's last good one (asked with the
        same `max_bytes`) calls `on_repeat()` instead, and neither `sink` nor `on_done` hears of
        it: the caller already holds what that page reads as.

        A poll is a write and, when its answer arrives, a callback: no task, future or timer of
        its own, which is most of what a poll costs on the loop (the scraper's ticker starts
        the polls, epp.datalayer.scraper)."""
        if self._transport is None or self.closed:
            raise ConnectionError("not connected")
        if self._on_done is not None:
            raise RuntimeError("a poll is already in flight on this connection")
        self._on_done, self._on_repeat = on_done, on_repeat
        self._sink, self._max_bytes = sink, max_bytes
        # What the connection's end needs from the start; the framing's state is reset only for an
        # answer that is parsed (`_parse_anew`), not for the repeated answers of an idle server.
        self._parser, self._error, self._until_close = None, None, False
        self._transport.write(request)

    def expire(self) -> None:
        """The poll in flight took too long: it ends with TimeoutError (and the connection)."""
        self._finish(TimeoutError())

    async def get(
        self, request: bytes, sink: PageSink, max_bytes: int, deadline: float | None = None
    ) -> None:
        """`start()` as a coroutine: returns when the page is complete, raises what `on_done`
        would be given, or TimeoutError when the answer is not complete at `deadline` (the loop's
        clock). Cancelled, it drops the connection (an answer may be half read)."""
        if self._loop is None:
            raise ConnectionError("not connected")
        done: asyncio.Future[None] = self._loop.create_future()

        def settle(error: BaseException | None) -> None:
            if not done.done():
                done.set_result(None) if error is None else done.set_exception(error)

        self.start(request, sink, max_bytes, settle)
        timer = self._loop.call_at(deadline, self.expire) if deadline is not None else None
        try:
            await done
        finally:
            if timer is not None:
                timer.cancel()
            if self._on_done is settle:  # cancelled mid-poll
                self._on_done = None
                self.close()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def _parse_anew(self) -> httptools.HttpResponseParser:
        """The poll's answer is to be framed: a new parser, and the framing's state reset."""
        self._reads, self._bodies, self._body = 0, 0, b""
        self._head_bytes, self._header_bytes, self._in_head, self._messages = 0, 0, True, 0
        self._length, self._chunked = None, False
        self._complete = self._keep_alive = False
        parser = self._parser = httptools.HttpResponseParser(self)
        return parser

    def _finish(self, error: BaseException | None) -> None:
        on_done = self._on_done
        if on_done is None:
            return
        self._on_done = self._on_repeat = None
        if error is None:
            self._complete = True
        if error is not None or not self._keep_alive:
            self.close()
        self._parser = self._sink = None
        on_done(error)


def _framing_error(exc: httptools.HttpParserError, in_head: bool) -> MetricsParseError:
    """llhttp's complaint as the scraper reports it."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httptools.HttpParserInvalidStatusError) or (in_head and "HTTP" in detail.upper()):
        return MetricsParseError(f"not an HTTP/1.x answer ({detail})")
    if "chunk size" in detail.lower():
        return MetricsParseError(f"bad chunked encoding: chunk size ({detail})")
    if "content-length" in detail.lower():
        return MetricsParseError(f"bad Content-Length ({detail})")
    return MetricsParseError(f"bad HTTP answer: {detail}")


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
