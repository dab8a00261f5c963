"""The scraper against real HTTP servers serving vLLM's Prometheus text."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from epp.datalayer.datastore import Datastore
from epp.datalayer.scraper import Scraper
from epp.framework import Endpoint
from tests.support.epp_app import wait_until
from tests.support.fake_vllm import FakeVllm


@pytest.fixture
async def server() -> AsyncIterator[FakeVllm]:
    fake = await FakeVllm("s0", waiting=4, running=2, kv_usage=0.25).start()
    yield fake
    await fake.stop()


def endpoint_of(fake: FakeVllm) -> Endpoint:
    host, port = fake.address.rsplit(":", 1)
    return Endpoint(host, int(port), fake.name)


async def test_scrape_once_stores_a_fresh_snapshot(server: FakeVllm) -> None:
    store = Datastore()
    ep = endpoint_of(server)
    store.replace_all([ep])
    scraper = Scraper(store, interval_s=10.0)
    await scraper.start()
    try:
        assert await scraper.scrape_once(ep)
        m = ep.metrics
        assert (m.waiting_queue_size, m.running_requests, m.kv_cache_usage) == (4, 2, 0.25)
        assert (m.block_size, m.num_gpu_blocks) == (16, 4096) and m.updated_at > 0
    finally:
        await scraper.close()


async def test_failed_poll_keeps_the_last_values_and_counts_the_error(server: FakeVllm) -> None:
    store = Datastore()
    ep = endpoint_of(server)
    store.replace_all([ep])
    errors: list[str] = []
    scraper = Scraper(store, interval_s=10.0, on_error=lambda e: errors.append(e.key))
    await scraper.start()
    try:
        # The background poll runs once at start, then not for 10 s: from here on only ours run.
        await wait_until(lambda: ep.metrics.updated_at > 0, what="first poll")
        before = ep.metrics
        server.metrics_status = 500
        assert not await scraper.scrape_once(ep)
        assert not await scraper.scrape_once(ep)
        assert ep.metrics is before  # last good snapshot kept; updated_at does not advance
        assert ep.scrape_errors == 2 and errors == [ep.key, ep.key]
        server.metrics_status = 200
        server.waiting = 9
        assert await scraper.scrape_once(ep)
        assert ep.scrape_errors == 0 and ep.metrics.waiting_queue_size == 9
    finally:
        await scraper.close()


async def test_endpoints_are_polled_while_in_the_pool_and_not_after(server: FakeVllm) -> None:
    store = Datastore()
    scraper = Scraper(store, interval_s=0.02)
    await scraper.start()
    try:
        ep = endpoint_of(server)
        store.replace_all([ep])  # added after start: polling starts by itself
        await wait_until(lambda: ep.metrics.waiting_queue_size == 4, what="first poll")
        server.waiting = 1
        await wait_until(lambda: ep.metrics.waiting_queue_size == 1, what="a later poll")
        store.replace_all([])  # the endpoint leaves the pool: its poll task is cancelled
        server.waiting = 7
        await asyncio.sleep(0.2)  # ten intervals
        assert ep.metrics.waiting_queue_size == 1
    finally:
        await scraper.close()


async def test_an_unreachable_endpoint_is_an_error_not_a_crash() -> None:
    store = Datastore()
    ep = Endpoint("127.0.0.1", 9)  # discard port: nothing listens
    store.replace_all([ep])
    scraper = Scraper(store, interval_s=10.0, timeout_s=0.5)
    await scraper.start()
    try:
        assert not await scraper.scrape_once(ep)
        assert ep.scrape_errors == 1 and ep.metrics.updated_at == 0
    finally:
        await scraper.close()
