"""Asking model servers for the families epp reads (`name[]`), checked against the whole page, and
not parsing a page that repeats: against real servers (prometheus-client's own HTTP server, as
vLLM serves its page, and aiohttp servers that answer a query in the ways others do)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

from epp.datalayer import model_server_metrics
from epp.datalayer.datastore import Datastore
from epp.datalayer.model_server_metrics import VLLM, LastPage, RepeatAwareReader
from epp.datalayer.scraper import FILTERED, WHOLE_ONLY, ScrapeConfig, Scraper
from epp.errors import MetricsParseError
from epp.framework import Endpoint
from tests.support.epp_app import wait_until
from tests.support.http_app import serve_on_loopback

HISTOGRAM_BUCKETS = tuple(0.001 * 2**i for i in range(30))


@dataclass
class VllmLikeRegistry:
    """vLLM's gauges epp reads, and a large histogram epp does not, in a prometheus-client
    registry that knows its collectors' names (as the global one vLLM serves)."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        labels = ["model_name", "engine"]
        self.waiting = Gauge("vllm:num_requests_waiting", "Waiting.", labels, registry=self.registry)
        self.running = Gauge("vllm:num_requests_running", "Running.", labels, registry=self.registry)
        self.kv = Gauge("vllm:kv_cache_usage_perc", "KV usage.", labels, registry=self.registry)
        latency = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Latency.",
            labels,
            buckets=HISTOGRAM_BUCKETS,
            registry=self.registry,
        )
        for i in range(20):
            latency.labels(f"model-{i}", "0").observe(0.5)
        self.set(waiting=3, running=2, kv=0.5)

    def set(self, waiting: int, running: int, kv: float) -> None:
        self.waiting.labels("m", "0").set(waiting)
        self.running.labels("m", "0").set(running)
        self.kv.labels("m", "0").set(kv)


@pytest.fixture
def prometheus_server() -> Iterator[tuple[VllmLikeRegistry, int]]:
    """prometheus-client's own HTTP exposition (what answers name[] on vLLM), on a free port."""
    page = VllmLikeRegistry()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=page.registry)
    yield page, int(server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@dataclass
class QueryServer:
    """An aiohttp server serving one page, with a rule for what it answers a query with."""

    page: str
    answer_query: Callable[[str, str], web.Response] | None = None  # (page, query) -> answer
    queries: list[str] = field(default_factory=list)
    hold: asyncio.Event | None = None  # answers wait for it while it is unset
    port: int = 0
    _runner: web.AppRunner | None = None

    async def start(self) -> QueryServer:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner, self.port = await serve_on_loopback(app)
        return self

    async def _metrics(self, request: web.Request) -> web.Response:
        self.queries.append(request.query_string)
        if self.hold is not None:
            await self.hold.wait()
        if request.query_string and self.answer_query is not None:
            return self.answer_query(self.page, request.query_string)
        return web.Response(text=self.page)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def query_servers() -> AsyncIterator[list[QueryServer]]:
    started: list[QueryServer] = []
    yield started
    for server in started:
        await server.stop()


async def serving(
    query_servers: list[QueryServer], answer: Callable[[str, str], web.Response] | None = None
) -> QueryServer:
    """A started QueryServer serving VLLM_PAGE (stopped by the fixture)."""
    server = await QueryServer(VLLM_PAGE, answer_query=answer).start()
    query_servers.append(server)
    return server


VLLM_PAGE = (
    "# TYPE vllm:num_requests_waiting gauge\n"
    'vllm:num_requests_waiting{model_name="m"} 4\n'
    "# TYPE vllm:num_requests_running gauge\n"
    'vllm:num_requests_running{model_name="m"} 1\n'
    "# TYPE vllm:kv_cache_usage_perc gauge\n"
    'vllm:kv_cache_usage_perc{model_name="m"} 0.25\n'
)


async def polled(port: int, config: ScrapeConfig | None = None, polls: int = 4) -> tuple[Scraper, Endpoint]:
    """A started scraper (100 ms interval) over one endpoint, after `polls` good polls."""
    store = Datastore()
    ep = Endpoint("127.0.0.1", port)
    store.replace_all([ep])
    scraper = Scraper(store, interval_s=0.1, config=config)
    stored: list[float] = []
    real_record = scraper._record

    def record(*args: Any) -> bool:
        fresh = real_record(*args)
        if fresh:
            stored.append(ep.metrics.updated_at)
        return fresh

    scraper._record = record  # type: ignore[method-assign,assignment]
    await scraper.start()
    await wait_until(lambda: len(stored) >= polls, what=f"{polls} good polls")
    return scraper, ep


async def test_epp_asks_a_prometheus_client_server_for_the_families_it_reads(
    prometheus_server: tuple[VllmLikeRegistry, int],
) -> None:
    page, port = prometheus_server
    scraper, ep = await polled(port)
    try:
        state = scraper._state[ep.key]
        assert state.filtering == FILTERED
        # The whole page has the histogram (about 20 kB); the filtered one only the three gauges.
        assert state.last_bytes < 1000
        assert (ep.metrics.waiting_queue_size, ep.metrics.running_requests, ep.metrics.kv_cache_usage) == (
            3,
            2,
            0.5,
        )
        page.set(waiting=7, running=1, kv=0.75)
        await wait_until(lambda: ep.metrics.waiting_queue_size == 7, what="the new values")
        assert (ep.metrics.running_requests, ep.metrics.kv_cache_usage) == (1, 0.75)
        assert ep.scrape_errors == 0
    finally:
        await scraper.close()


async def test_with_the_filter_off_every_poll_reads_the_whole_page(
    prometheus_server: tuple[VllmLikeRegistry, int],
) -> None:
    _, port = prometheus_server
    scraper, ep = await polled(port, ScrapeConfig(only_read_families=False))
    try:
        assert scraper._state[ep.key].last_bytes > 10_000
        assert ep.metrics.waiting_queue_size == 3
    finally:
        await scraper.close()


async def test_a_server_that_ignores_the_query_serves_the_whole_page_and_is_read_as_usual(
    query_servers: list[QueryServer],
) -> None:
    server = await serving(query_servers)
    scraper, ep = await polled(server.port)
    try:
        assert server.queries[0] == ""  # the first poll reads the whole page
        # (aiohttp gives the query decoded)
        assert all("name[]=vllm:num_requests_waiting" in q for q in server.queries[1:])
        assert ep.metrics.waiting_queue_size == 4 and ep.scrape_errors == 0
    finally:
        await scraper.close()


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda page, query: web.Response(status=404, text="no such page"), id="404"),
        pytest.param(lambda page, query: web.Response(status=400, text="unknown parameter"), id="400"),
        # prometheus-client's multiprocess registry (vLLM with several API servers) knows no
        # names, and answers name[] with nothing.
        pytest.param(lambda page, query: web.Response(text=""), id="empty"),
        # a filter that drops a family the whole page has
        pytest.param(
            lambda page, query: web.Response(text="\n".join(page.splitlines()[:4]) + "\n"), id="lossy"
        ),
    ],
)
async def test_a_server_that_does_not_honour_the_filter_is_read_whole_without_a_failed_poll(
    query_servers: list[QueryServer],
    answer: Callable[[str, str], web.Response],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await serving(query_servers, answer)
    caplog.set_level("INFO", logger="epp.datalayer.scraper")
    scraper, ep = await polled(server.port)
    try:
        assert scraper._state[ep.key].filtering == WHOLE_ONLY
        # One filtered poll, then whole pages (for 5 minutes); the values are the whole page's
        # and no poll counted as failed.
        assert [bool(q) for q in server.queries[:2]] == [False, True]
        assert not any(server.queries[2:])
        assert (ep.metrics.waiting_queue_size, ep.metrics.running_requests, ep.metrics.kv_cache_usage) == (
            4,
            1,
            0.25,
        )
        assert ep.scrape_errors == 0
        assert [r.levelname for r in caplog.records if "name[]" in r.getMessage()] == ["INFO"]
    finally:
        await scraper.close()


async def test_an_outage_during_the_filter_check_is_a_failed_poll_not_a_refusal(
    query_servers: list[QueryServer],
) -> None:
    state = {"failing": True}

    def answer(page: str, query: str) -> web.Response:
        return web.Response(status=503, text="busy") if state["failing"] else web.Response(text=page)

    server = await serving(query_servers, answer)
    scraper, ep = await polled(server.port, polls=1)
    try:
        await wait_until(lambda: ep.scrape_errors >= 1, what="the 503 counted")
        state["failing"] = False
        await wait_until(lambda: scraper._state[ep.key].filtering == FILTERED, what="the filter in use")
    finally:
        await scraper.close()


async def test_the_filter_is_checked_again_after_a_while(query_servers: list[QueryServer]) -> None:
    server = await serving(query_servers, lambda page, query: web.Response(status=404))
    scraper, ep = await polled(server.port)
    try:
        state = scraper._state[ep.key]
        assert state.filtering == WHOLE_ONLY
        # Refusing the filter drops the connection each time (its answer's body is not read); the
        # next polls do not ask again, until minutes later.
        await wait_until(lambda: len(server.queries) >= 6, what="more polls")
        assert [bool(q) for q in server.queries] == [False, True] + [False] * (len(server.queries) - 2)
        assert state.filter_recheck_at - state.started > 200
        # The model server was replaced by one that honours the filter, and the time has come.
        server.answer_query = lambda page, query: web.Response(text=page)
        state.filter_recheck_at = 0.0
        await wait_until(lambda: state.filtering == FILTERED, what="the filter in use")
        assert ep.scrape_errors == 0
        # Replaced again, by one that refuses it: one failed poll, then whole pages.
        server.answer_query = lambda page, query: web.Response(status=404)
        await wait_until(lambda: state.filtering == WHOLE_ONLY, what="whole pages again")
        assert ep.scrape_errors <= 1
        await wait_until(lambda: ep.scrape_errors == 0, what="a good poll")
    finally:
        await scraper.close()


# --- a repeated page is not parsed again -----------------------------------------------------------


def read(reader: RepeatAwareReader, page: bytes, now: float) -> Any:
    for at in range(0, len(page), 100):  # in pieces, as a socket delivers it
        reader.feed(page[at : at + 100])
    return reader.finish(now)


def test_a_repeated_small_page_is_not_parsed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    last = LastPage()
    page = VLLM_PAGE.encode() + b'vllm:lora_requests_info{running_lora_adapters="a",max_lora="2"} 1.0\n'
    first = read(RepeatAwareReader(VLLM, last), page, 1.0)
    parses: list[int] = []
    real = model_server_metrics.PageReader.finish

    def counted(reader: model_server_metrics.PageReader, now: float) -> Any:
        parses.append(1)
        return real(reader, now)

    monkeypatch.setattr(model_server_metrics.PageReader, "finish", counted)
    again = read(RepeatAwareReader(VLLM, last), page, 2.0)
    assert parses == []
    # Every field is the first snapshot's but the time.
    assert again == dataclasses.replace(first, updated_at=2.0)
    assert again.running_loras == frozenset({"a"}) and again.max_loras == 2
    changed = read(RepeatAwareReader(VLLM, last), page.replace(b"} 4\n", b"} 9\n"), 3.0)
    assert parses == [1] and changed.waiting_queue_size == 9 and changed.updated_at == 3.0


def test_a_large_page_streams_to_the_parser_and_is_not_remembered() -> None:
    last = LastPage()
    filler = b"".join(b'other_family{n="%d"} 1\n' % i for i in range(2000))
    page = filler + VLLM_PAGE.encode()
    assert len(page) > model_server_metrics.MEMO_MAX_BYTES
    metrics = read(RepeatAwareReader(VLLM, last), page, 1.0)
    assert metrics.waiting_queue_size == 4 and last.page is None


def test_a_bad_repeated_page_fails_every_time() -> None:
    last = LastPage()
    bad = b"vllm:num_requests_waiting{ 4\n"
    for _ in range(2):
        with pytest.raises(MetricsParseError):
            read(RepeatAwareReader(VLLM, last), bad, 1.0)
    assert last.page is None


def test_the_filter_query_names_every_family_read_and_keeps_a_configured_query() -> None:
    query = VLLM.families_query
    assert query.split("&") == [f"name%5B%5D={n}" for n in VLLM.all_names()]
    assert ScrapeConfig(path="/metrics").request_path(VLLM, filtered=True) == f"/metrics?{query}"
    assert ScrapeConfig(path="/m?x=1").request_path(VLLM, filtered=True) == f"/m?x=1&{query}"
    assert ScrapeConfig(path="/m?x=1").request_path(VLLM, filtered=False) == "/m?x=1"


# --- the ticker ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("in_flight", "padding"), [(None, 0), (1, 0), (0, 0), (0, 40_000)])
async def test_every_endpoint_of_a_large_pool_is_polled_once_an_interval_in_spread_slices(
    in_flight: int | None, padding: int
) -> None:
    """Slices spread over the interval; while epp has no request in flight (0), one tick polls
    them all (fewer wake-ups) unless their pages are large (40 x 40 kB: two ticks of at most
    1 MiB); without a count of requests (None), slices always."""
    page = "# padding\n" * (padding // 10) + VLLM_PAGE
    hits: dict[int, list[float]] = {}
    loop_time = asyncio.get_running_loop().time

    async def metrics(request: web.Request) -> web.Response:
        hits.setdefault(request.transport.get_extra_info("sockname")[1], []).append(loop_time())  # type: ignore[union-attr]
        return web.Response(text=page)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports = []
    for _ in range(40):  # three slices of at most 16
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    store = Datastore()
    store.replace_all([Endpoint("127.0.0.1", p) for p in ports])
    count = None if in_flight is None else lambda: in_flight
    scraper = Scraper(store, interval_s=0.1, requests_in_flight=count)
    await scraper.start()
    try:
        await wait_until(lambda: len(hits) == 40 and min(len(h) for h in hits.values()) >= 3, what="polls")
        start = loop_time()
        counts = {p: len(h) for p, h in hits.items()}
        await asyncio.sleep(1.0)
        # Each endpoint about once an interval (10 in a second; late ticks on a loaded machine
        # are not made up, so fewer there), every slice visited, none polled twice in one.
        polls = [len(hits[p]) - counts[p] for p in ports]
        assert min(polls) >= 5 and max(polls) <= 11, polls
        # The slices go out at different times within the interval (all 40 at once only when idle).
        # Bursts of polls: a tick's go out together, the next tick's tens of milliseconds later.
        times = sorted(t for h in hits.values() for t in h if t >= start)
        bursts = 1 + sum(1 for a, b in itertools.pairwise(times) if b - a > 0.01)
        if in_flight == 0 and not padding:  # one tick an interval for all 40
            assert bursts <= 13, bursts
        elif in_flight == 0:  # two (a late tick is not made up: as many as the polls say)
            assert 2 * min(polls) - 1 <= bursts <= 26, (bursts, polls)
        else:  # three slices an interval
            assert bursts >= 3 * min(polls) - 2, (bursts, polls)
    finally:
        await scraper.close()
        await runner.cleanup()


async def test_an_endpoint_relabelled_to_another_engine_is_asked_for_that_engines_families(
    query_servers: list[QueryServer],
) -> None:
    server = await serving(query_servers)
    scraper, ep = await polled(server.port)
    try:
        assert any("vllm:num_requests_waiting" in q for q in server.queries)
        ep.labels = {"llm-d.ai/engine-type": "sglang"}  # the datastore updates labels in place
        await wait_until(lambda: any("sglang:num_queue_reqs" in q for q in server.queries), what="SGLang's")
    finally:
        await scraper.close()


async def test_closing_mid_poll_counts_no_error_and_a_restart_polls_again(
    query_servers: list[QueryServer],
) -> None:
    server = await serving(query_servers)
    scraper, ep = await polled(server.port, polls=1)
    try:
        hold = server.hold = asyncio.Event()  # the next answers wait: a poll is in flight at the close
        state = scraper._state[ep.key]
        await wait_until(lambda: state.in_flight, what="a poll in flight")
        errors, seen = ep.scrape_errors, ep.metrics.updated_at
        await scraper.close()
        assert ep.scrape_errors == errors and not state.in_flight
        hold.set()
        await scraper.start()
        await wait_until(lambda: ep.metrics.updated_at > seen, what="polls after the restart")
        assert ep.scrape_errors == 0
    finally:
        if server.hold is not None:
            server.hold.set()
        await scraper.close()
