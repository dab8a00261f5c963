"""Routing decisions against real HTTP model servers on loopback serving Prometheus text."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator

import orjson
import pytest

from tests.support.epp_app import RunningEpp, running_epp, wait_until
from tests.support.extproc_client import one_request, request_headers
from tests.support.fake_vllm import FakeVllm

DEST = "x-gateway-destination-endpoint"


def destination(replies: list) -> str:  # type: ignore[type-arg]
    mutation = replies[0].request_headers.response.header_mutation
    return next(h.header.raw_value.decode() for h in mutation.set_headers if h.header.key == DEST)


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeVllm]]:
    servers = [await FakeVllm(f"s{i}").start() for i in range(4)]
    yield servers
    for s in servers:
        await s.stop()


async def scraped(epp: RunningEpp, fakes: list[FakeVllm]) -> None:
    """Wait until every endpoint's snapshot is of a page served after now (a poll recorded after
    now may have been served before: wait for the fakes to serve a few more)."""
    now = time.monotonic()
    await asyncio.gather(*(f.scraped_since_now() for f in fakes))
    await wait_until(
        lambda: all(ep.metrics.updated_at > now for ep in epp.app.datastore.endpoints()), what="fresh scrape"
    )


async def route(epp: RunningEpp, prompt: str) -> str:
    body = orjson.dumps({"model": "m", "prompt": prompt})
    return destination(await one_request(epp.stub, request_headers(), body))


async def test_shared_prefix_sticks_to_one_endpoint(fakes: list[FakeVllm]) -> None:
    rng = random.Random(7)
    async with running_epp("--endpoints", ",".join(f.address for f in fakes)) as epp:
        await scraped(epp, fakes)
        prefix = "".join(rng.choice("abcdefghij ") for _ in range(2048))
        first = await route(epp, prefix + " question 0")
        for i in range(1, 12):
            assert await route(epp, prefix + f" question {i}") == first
        # A different prefix is free to go anywhere; over several prefixes, more than one endpoint is used.
        others = {
            await route(epp, f"{i} " + "".join(rng.choice("klmnop ") for _ in range(2048))) for i in range(12)
        }
        assert len(others) > 1


async def test_long_queue_pushes_new_requests_elsewhere(fakes: list[FakeVllm]) -> None:
    async with running_epp("--endpoints", ",".join(f.address for f in fakes)) as epp:
        fakes[0].waiting = 40
        await scraped(epp, fakes)
        picks = Counter([await route(epp, f"unrelated prompt number {i} " * 3) for i in range(40)])
        assert fakes[0].address not in picks
        assert len(picks) >= 2  # the rest share the load


async def test_prefix_gives_way_to_a_heavy_queue(fakes: list[FakeVllm]) -> None:
    async with running_epp("--endpoints", ",".join(f.address for f in fakes)) as epp:
        await scraped(epp, fakes)
        prefix = "shared system prompt. " * 100
        home = await route(epp, prefix + "q0")
        by_address = {f.address: f for f in fakes}
        by_address[home].waiting = 100
        by_address[home].kv_usage = 0.95
        await scraped(epp, fakes)
        # queue (2) + kv (2) outweigh prefix (3): the overloaded home is avoided.
        assert await route(epp, prefix + "q1") != home


async def test_failing_and_stale_endpoints_do_not_break_picking(fakes: list[FakeVllm]) -> None:
    # A second's threshold: short to wait for, yet a pause of a loaded machine's loop cannot age
    # the healthy endpoints (polled every 50 ms) past it too.
    async with running_epp(
        "--endpoints", ",".join(f.address for f in fakes), "--metrics-staleness-threshold", "1s"
    ) as epp:
        await scraped(epp, fakes)
        broken = fakes[1]
        broken.metrics_status = 500
        ep = epp.app.datastore.get(broken.address)
        assert ep is not None
        await wait_until(lambda: ep.scrape_errors > 0, what="a failed scrape")  # a good page in flight landed
        last = ep.metrics
        errors_before = ep.scrape_errors
        await wait_until(lambda: ep.scrape_errors > errors_before + 2, what="scrape errors counted")
        assert ep.metrics is last  # last values kept, update time not advanced
        await wait_until(lambda: time.monotonic() - ep.metrics.updated_at > 1.0, what="staleness")
        picks = Counter([await route(epp, f"prompt {i} " * 20) for i in range(30)])
        assert sum(picks.values()) == 30
        assert broken.address not in picks  # fresh endpoints are preferred over a stale one
        # When every endpoint is stale, picking still works.
        for f in fakes:
            f.metrics_status = 500
        await wait_until(
            lambda: all(time.monotonic() - e.metrics.updated_at > 1.0 for e in epp.app.datastore.endpoints()),
            what="all stale",
        )
        assert await route(epp, "still routed") in {f.address for f in fakes}
        registry = epp.app.metrics.registry
        assert (
            registry.get_sample_value("epp_endpoint_scrape_errors_total", {"endpoint": broken.address}) or 0
        ) > 0
