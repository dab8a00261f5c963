"""Idle endpoints are polled every --idle-refresh-metrics-interval, not every interval, until epp
sends them a request or they report work: against a real HTTP server counting the polls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from epp.datalayer.datastore import Datastore
from epp.datalayer.scraper import Scraper
from epp.framework import Endpoint
from epp.settings import parse_settings
from tests.support.epp_app import wait_until
from tests.support.http_app import serve_on_loopback


class CountingPage:
    def __init__(self) -> None:
        self.waiting = 0
        self.running = 0
        self.hits = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _serve(self, request: web.Request) -> web.Response:
        self.hits += 1
        text = (
            f"vllm:num_requests_waiting {self.waiting}\nvllm:num_requests_running {self.running}\n"
            "vllm:kv_cache_usage_perc 0.0\n"
        )
        return web.Response(text=text, content_type="text/plain")

    async def start(self) -> CountingPage:
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        self._runner, self.port = await serve_on_loopback(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def page() -> AsyncIterator[CountingPage]:
    server = await CountingPage().start()
    yield server
    await server.stop()


async def polls_in(page: CountingPage, seconds: float) -> int:
    before = page.hits
    await asyncio.sleep(seconds)
    return page.hits - before


async def test_an_idle_endpoint_is_polled_rarely_until_epp_sends_it_a_request(page: CountingPage) -> None:
    store = Datastore()
    ep = Endpoint("127.0.0.1", page.port)
    store.replace_all([ep])
    scraper = Scraper(store, interval_s=0.05, idle_interval_s=0.5)
    await scraper.start()
    try:
        # The first polls: it reports nothing waiting or running.
        await wait_until(lambda: scraper.idle(ep), what="the endpoint seen idle")
        assert await polls_in(page, 1.2) <= 4  # every 0.5 s, not every 50 ms (24)
        ep.inflight_requests = 1  # epp routes a request there: back to the interval at once
        assert await polls_in(page, 1.2) >= 6  # 24 at 50 ms: a loaded machine may lose some
        assert not scraper.idle(ep)
        ep.inflight_requests = 0
        page.running = 2  # busy with another client's work: polled every interval
        await wait_until(lambda: ep.metrics.running_requests == 2, what="the next idle poll")
        assert not scraper.idle(ep)
        assert await polls_in(page, 1.2) >= 6
    finally:
        await scraper.close()


async def test_zero_polls_every_endpoint_every_interval(page: CountingPage) -> None:
    store = Datastore()
    ep = Endpoint("127.0.0.1", page.port)
    store.replace_all([ep])
    scraper = Scraper(store, interval_s=0.05, idle_interval_s=0.0)
    await scraper.start()
    try:
        await wait_until(lambda: ep.metrics.updated_at > 0, what="the first poll")
        assert not scraper.idle(ep)
        assert await polls_in(page, 1.2) >= 6
    finally:
        await scraper.close()


def test_the_idle_interval_stays_below_the_staleness_threshold() -> None:
    base = ["--endpoints", "127.0.0.1:8000"]
    # Off by default: every endpoint every interval, as the Go EPP.
    assert parse_settings(base).idle_refresh_metrics_interval_s == 0
    assert (
        parse_settings([*base, "--idle-refresh-metrics-interval", "1s"]).idle_refresh_metrics_interval_s
        == 1.0
    )
    for bad in (["--idle-refresh-metrics-interval", "2s"], ["--idle-refresh-metrics-interval", "-1s"]):
        with pytest.raises(SystemExit):
            parse_settings([*base, *bad])
