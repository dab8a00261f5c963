"""The scraper's lean HTTP/1.1 client (epp.datalayer.metrics_client) against raw servers on
loopback that answer exactly as scripted: keep-alive, the three ways a body ends, bad answers.
Every test runs on asyncio's loop and on uvloop's (epp's default, `--event-loop`), whose
transports are not asyncio.Transport instances."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import cast

import pytest

from epp.datalayer.datastore import Datastore
from epp.datalayer.metrics_client import connect, request_bytes
from epp.datalayer.model_server_metrics import ENGINE_LABEL, PageLimitError, PageReader, names_for_engine
from epp.datalayer.scraper import Scraper
from epp.errors import MetricsParseError
from epp.framework import Endpoint
from tests.support.epp_app import wait_until

# pytest-asyncio 1.x still honours an overridden event_loop_policy fixture (below), with a warning.
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy" fixture')

PAGE = b"vllm:num_requests_waiting 7\nvllm:num_requests_running 2\nvllm:kv_cache_usage_perc 0.5\n"

Answer = Callable[[bytes], bytes]


def fixed(body: bytes = PAGE) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def chunked(body: bytes = PAGE, size: int = 10) -> bytes:
    pieces = [
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)
    ]
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(pieces) + b"0\r\n\r\n"


class Scripted(asyncio.Protocol):
    """Answers each request (a head ending in a blank line) with `answer(request)`; closes after
    it when `close` is set."""

    connections = 0

    def __init__(self, answer: Answer, close: bool) -> None:
        self.answer, self.close, self.buffer = answer, close, b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        Scripted.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            request, self.buffer = self.buffer[: end + 4], self.buffer[end + 4 :]
            self.transport.write(self.answer(request))
            if self.close:
                self.transport.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.EventLoopPolicy()  # type: ignore[no-any-return]
    return asyncio.DefaultEventLoopPolicy()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., asyncio.Future[int]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer, close: bool = False) -> int:
        Scripted.connections = 0
        server = await asyncio.get_running_loop().create_server(
            lambda: Scripted(answer, close), "127.0.0.1", 0
        )
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()


async def read(port: int, max_bytes: int = 1 << 20) -> PageReader:
    reader = PageReader(names_for_engine("vllm"))
    connection = await connect("127.0.0.1", port, None)
    try:
        await asyncio.wait_for(
            connection.get(request_bytes("127.0.0.1", port, "/metrics"), reader, max_bytes), 5
        )
    finally:
        connection.close()
    return reader


@pytest.mark.parametrize("answer", [fixed(), chunked(), chunked(size=1), b"HTTP/1.0 200 OK\r\n\r\n" + PAGE])
async def test_each_way_a_body_ends_gives_the_page(
    serve: Callable[..., asyncio.Future[int]], answer: bytes
) -> None:
    port = await serve(lambda _: answer, close=answer.startswith(b"HTTP/1.0"))
    reader = await read(port)
    assert reader.bytes_read == len(PAGE)
    assert reader.finish(1.0).waiting_queue_size == 7


async def test_the_request_names_the_host_and_path(serve: Callable[..., asyncio.Future[int]]) -> None:
    seen: list[bytes] = []

    def answer(request: bytes) -> bytes:
        seen.append(request)
        return fixed()

    port = await serve(answer)
    await read(port)
    assert (
        seen[0].startswith(b"GET /metrics HTTP/1.1\r\n") and b"\r\nHost: 127.0.0.1:%d\r\n" % port in seen[0]
    )


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", "HTTP 503"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nvllm:num", "closed the connection mid-page"),
    ],
)
async def test_a_bad_answer_is_an_error(
    serve: Callable[..., asyncio.Future[int]], answer: bytes, error: str
) -> None:
    port = await serve(lambda _: answer, close=True)
    with pytest.raises(MetricsParseError, match=error):
        await read(port)


BAD_PAGE = PAGE + b"vllm:kv_cache_usage_perc NaN\n"


@pytest.mark.parametrize(
    "answer", [fixed(BAD_PAGE), chunked(BAD_PAGE), b"HTTP/1.0 200 OK\r\n\r\n" + BAD_PAGE]
)
async def test_a_page_that_cannot_be_read_is_that_error_at_once(
    serve: Callable[..., asyncio.Future[int]], answer: bytes
) -> None:
    """The reader's error, raised while llhttp hands it the body, is the poll's: not a hang until
    the timeout, nor (a page that ends when the server closes) a snapshot of half the page."""
    port = await serve(lambda _: answer, close=answer.startswith(b"HTTP/1.0"))
    with pytest.raises(MetricsParseError, match="kv_cache_usage_perc is nan"):
        await read(port)


async def test_a_page_cut_by_a_reset_is_an_error_not_a_page() -> None:
    """A page that ends when the server closes: a reset mid-page is no end."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nvllm:num_requests_waiting 7\n")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # with a zero linger: RST, not FIN

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            await read(int(server.sockets[0].getsockname()[1]))
    finally:
        server.close()


async def test_a_page_past_the_limit_is_refused(serve: Callable[..., asyncio.Future[int]]) -> None:
    declared = await serve(lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 999999\r\n\r\n")
    with pytest.raises(PageLimitError, match="999999 bytes"):
        await read(declared, max_bytes=1000)
    undeclared = await serve(lambda _: chunked(PAGE * 100, size=500))
    with pytest.raises(PageLimitError, match="past the limit of 1000 bytes"):
        await read(undeclared, max_bytes=1000)


async def test_the_scraper_keeps_one_connection_and_opens_another_after_a_failure(
    serve: Callable[..., asyncio.Future[int]],
) -> None:
    answers = [fixed(), chunked(), b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n", fixed()]
    port = await serve(lambda _: answers.pop(0))
    store = Datastore()
    ep = Endpoint("127.0.0.1", port)
    store.replace_all([ep])
    scraper = Scraper(store, interval_s=60.0, timeout_s=2.0)
    await scraper.start()
    try:
        await wait_until(lambda: ep.metrics.updated_at > 0, what="the first poll, at start")
        assert await scraper.scrape_once(ep) and Scripted.connections == 1  # kept alive
        assert not await scraper.scrape_once(ep) and ep.scrape_errors == 1
        assert await scraper.scrape_once(ep) and ep.metrics.waiting_queue_size == 7
        assert Scripted.connections == 2  # the failed answer's connection was dropped
    finally:
        await scraper.close()


async def test_a_large_page_in_one_write_is_read_whole(serve: Callable[..., asyncio.Future[int]]) -> None:
    padding = b"# HELP padding a realistic page is tens of kilobytes\n" * 4000  # ~200 kB
    port = await serve(lambda _: fixed(padding + PAGE))
    reader = await read(port, max_bytes=1 << 20)
    assert reader.bytes_read == len(padding + PAGE)
    assert reader.finish(1.0).waiting_queue_size == 7


async def test_an_overlong_head_is_an_error(serve: Callable[..., asyncio.Future[int]]) -> None:
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 1000) for i in range(80))  # 80 kB
    port = await serve(lambda _: b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 0\r\n\r\n", close=True)
    with pytest.raises(MetricsParseError, match="head is past"):
        await read(port)


async def test_an_answer_not_complete_by_the_deadline_times_out_and_drops_the_connection(
    serve: Callable[..., asyncio.Future[int]],
) -> None:
    # The head and half the page, then nothing: the poll ends at its deadline, not the server's.
    port = await serve(lambda _: fixed()[: -len(PAGE) // 2])
    connection = await connect("127.0.0.1", port, None)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TimeoutError):
        await connection.get(
            request_bytes("127.0.0.1", port, "/metrics"),
            PageReader(names_for_engine("vllm")),
            1 << 20,
            start + 0.3,
        )
    assert 0.25 <= loop.time() - start < 2.0
    assert connection.closed  # a half-read answer leaves the connection unusable
    # A complete answer well before its deadline leaves no timer behind to close it later.
    port = await serve(lambda _: fixed())
    connection = await connect("127.0.0.1", port, None)
    reader = PageReader(names_for_engine("vllm"))
    await connection.get(request_bytes("127.0.0.1", port, "/metrics"), reader, 1 << 20, loop.time() + 0.1)
    await asyncio.sleep(0.2)
    assert not connection.closed and reader.finish(1.0).waiting_queue_size == 7
    connection.close()


async def test_a_repeated_answer_gives_its_page_again_without_parsing_and_changes_are_read(
    serve: Callable[..., asyncio.Future[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle server answers the same bytes every poll: the connection hands the last page over
    again without running llhttp. Whatever differs (a value, the status, a header), or an answer
    that did not come in one read or did not keep the connection alive, is parsed in full."""
    import httptools

    parsers = 0
    real_parser = httptools.HttpResponseParser

    def counting(protocol: object) -> object:
        nonlocal parsers
        parsers += 1
        return real_parser(protocol)

    monkeypatch.setattr(httptools, "HttpResponseParser", counting)
    busy = PAGE.replace(b"waiting 7", b"waiting 9")
    answers = [fixed(), fixed(), fixed(), fixed(busy), fixed(busy), fixed(), fixed()]
    answers += [b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"]
    port = await serve(lambda _: answers.pop(0))
    connection = await connect("127.0.0.1", port, None)
    request = request_bytes("127.0.0.1", port, "/metrics")
    seen = []
    try:
        for _ in range(7):
            reader = PageReader(names_for_engine("vllm"))
            await asyncio.wait_for(connection.get(request, reader, 1 << 20), 5)
            assert reader.bytes_read == len(PAGE)
            seen.append(reader.finish(1.0).waiting_queue_size)
        assert seen == [7, 7, 7, 9, 9, 7, 7]
        assert parsers == 3  # the first answer, and each change
        with pytest.raises(MetricsParseError, match="HTTP 503"):  # the same head, another status
            await asyncio.wait_for(connection.get(request, PageReader(names_for_engine("vllm")), 1 << 20), 5)
        assert connection.closed
    finally:
        connection.close()

    # Never replayed: an answer in chunks, or one that came in two reads.
    class Split(Scripted):
        def data_received(self, data: bytes) -> None:
            answer = fixed()
            self.transport.write(answer[:20])
            asyncio.get_running_loop().call_later(0.02, self.transport.write, answer[20:])

    loop = asyncio.get_running_loop()
    split = await loop.create_server(lambda: Split(fixed, False), "127.0.0.1", 0)
    in_chunks = await serve(lambda _: chunked())
    try:
        for port in (in_chunks, int(split.sockets[0].getsockname()[1])):
            parsers = 0
            connection = await connect("127.0.0.1", port, None)
            try:
                for _ in range(3):
                    reader = PageReader(names_for_engine("vllm"))
                    await asyncio.wait_for(connection.get(request, reader, 1 << 20), 5)
                    assert reader.finish(1.0).waiting_queue_size == 7
            finally:
                connection.close()
            assert parsers == 3
    finally:
        split.close()


async def test_a_caller_that_holds_the_page_hears_only_that_it_repeated(
    serve: Callable[..., asyncio.Future[int]],
) -> None:
    """With `on_repeat`, an answer byte for byte the last good one is neither fed nor finished:
    `on_repeat` is called instead. A changed answer is read as usual."""
    busy = PAGE.replace(b"waiting 7", b"waiting 9")
    answers = [fixed(), fixed(), fixed(busy), fixed(busy)]
    port = await serve(lambda _: answers.pop(0))
    connection = await connect("127.0.0.1", port, None)
    request = request_bytes("127.0.0.1", port, "/metrics")
    loop = asyncio.get_running_loop()
    heard: list[tuple[str, int]] = []

    async def poll() -> PageReader:
        reader = PageReader(names_for_engine("vllm"))
        ended: asyncio.Future[str] = loop.create_future()
        connection.start(
            request,
            reader,
            1 << 20,
            lambda error: ended.set_result("done" if error is None else repr(error)),
            lambda: ended.set_result("repeated"),
        )
        heard.append((await asyncio.wait_for(ended, 5), reader.bytes_read))
        return reader

    try:
        assert (await poll()).finish(1.0).waiting_queue_size == 7
        await poll()
        assert (await poll()).finish(1.0).waiting_queue_size == 9
        await poll()
        assert heard == [("done", len(PAGE)), ("repeated", 0), ("done", len(PAGE)), ("repeated", 0)]
        assert not connection.closed and not connection.busy
    finally:
        connection.close()


async def test_the_scraper_stamps_a_repeated_page_and_reads_whatever_changed(
    serve: Callable[..., asyncio.Future[int]],
) -> None:
    """An idle server's answers repeat: each poll keeps the values and moves `updated_at`. A
    page that failed to read fails again when it repeats (never a stale snapshot made fresh), a
    good page after a failure is read, and an endpoint relabelled to another engine has the same
    bytes read with that engine's names."""
    good = fixed()
    unreadable = fixed(b"something_else 1\n")
    answer = [good]
    port = await serve(lambda _: answer[0])
    store = Datastore()
    ep = Endpoint("127.0.0.1", port)
    store.replace_all([ep])
    scraper = Scraper(store, interval_s=0.01)
    await scraper.start()
    try:
        await wait_until(lambda: ep.metrics.waiting_queue_size == 7, what="first poll")
        stamps = {ep.metrics.updated_at}

        def stamped_again() -> bool:
            stamps.add(ep.metrics.updated_at)
            return len(stamps) > 5

        await wait_until(stamped_again, what="repeated polls")
        assert ep.metrics.waiting_queue_size == 7 and ep.scrape_errors == 0

        answer[0] = unreadable
        await wait_until(lambda: ep.scrape_errors >= 5, what="the unreadable page failing every poll")
        failed_at = ep.metrics.updated_at
        assert ep.metrics.waiting_queue_size == 7  # the last good snapshot, ageing
        answer[0] = good
        await wait_until(lambda: ep.scrape_errors == 0, what="the good page again")
        assert ep.metrics.updated_at > failed_at and ep.metrics.waiting_queue_size == 7
        stamps.clear()
        await wait_until(stamped_again, what="repeated polls after the failures")

        relabelled = Endpoint("127.0.0.1", port, labels={ENGINE_LABEL: "sglang"})
        store.replace_all([relabelled])  # `ep` is updated in place: sglang's names, the same page
        await wait_until(lambda: ep.scrape_errors >= 3, what="the vLLM page read as sglang's")
        stale_at = ep.metrics.updated_at
        await asyncio.sleep(0.05)
        assert ep.metrics.updated_at == stale_at
    finally:
        await scraper.close()
