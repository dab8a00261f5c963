"""epp's /metrics page is rendered off the event loop: a large scrape never stalls ext_proc."""

from __future__ import annotations

import asyncio
import gzip
import sys
import threading
import time
from collections.abc import Iterator

import aiohttp
import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    Summary,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epp.metrics_server import MetricsServer, render_text
from epp.observability import EppMetrics
from tests.support.epp_app import wait_until


class _Odd(Collector):
    def collect(self) -> Iterator[Metric]:
        yield GaugeHistogramMetricFamily(
            "gh", "gauge histogram", buckets=[("1", 3), ("+Inf", 5)], gsum_value=7
        )
        c = CounterMetricFamily("cc", "with created", labels=["z"], created=12.0)
        c.add_metric(["1"], 2, timestamp=1.5, created=3.0)
        yield c
        g = GaugeMetricFamily("odd_values", "values", labels=["v"])
        for i, v in enumerate(
            (-0.0, 0.0, 1e21, 123456789.0, float("nan"), float("inf"), -float("inf"), 1e-9)
        ):
            g.add_metric([str(i)], v)
        yield g


def test_the_page_is_what_prometheus_client_writes() -> None:
    registry = CollectorRegistry()
    Counter("c", "help\nwith \\ newline", ["a", "b"], registry=registry).labels("1", 'q"\\\n').inc(3)
    Gauge("g", "g", registry=registry).set(-2.5)
    Histogram("h", "h", ["x"], registry=registry).labels("y").observe(2)
    Summary("s", "s", registry=registry).observe(1)
    Info("i", "i", registry=registry).info({"v": "1"})
    Enum("e", "e", states=["a", "b"], registry=registry).state("b")
    registry.register(_Odd())
    assert render_text(registry) == generate_latest(registry)
    metrics = EppMetrics()
    for model in ("m", 'we"ird\\mo\ndel', "ünïcode"):
        children = metrics.for_request(model, model)
        children.requests.inc()
        children.duration.observe(0.1)
        children.ttft(True).observe(0.05)
        children.itl.observe(0.01)
    assert render_text(metrics.registry) == generate_latest(metrics.registry)


class _Many(Collector):
    """`series` histogram-like series; collect() can be made to wait for a signal, or to keep the
    interpreter busy (holding the GIL, as a large collector does) for at least `busy_s`."""

    def __init__(self, series: int, busy_s: float = 0.0) -> None:
        self.series = series
        self.busy_s = busy_s
        self.gate: threading.Event | None = None
        self.collects = 0

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        self.collects += 1
        if self.gate is not None:
            self.gate.wait(10)
        family = GaugeMetricFamily("many", "many series", labels=["model_name", "target_model_name", "le"])
        for i in range(self.series):
            for le in ("0.1", "1", "+Inf"):
                family.add_metric([f"model-{i}", f"model-{i}", le], float(i))
        while time.perf_counter() - started < self.busy_s:  # Python work, whatever the machine's speed
            sum(range(1000))
        yield family


async def test_a_large_render_does_not_stall_the_event_loop() -> None:
    registry = CollectorRegistry()
    registry.register(_Many(15_000, busy_s=0.3))
    server = MetricsServer(registry, "127.0.0.1", 0)
    switch = sys.getswitchinterval()
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.get_running_loop().create_task(ticker())
    started = time.perf_counter()
    page = await server.render()
    took = time.perf_counter() - started
    done.set()
    await ticking
    assert page.count(b"\n") == 45_002 and sys.getswitchinterval() == switch
    # The render took a while (on the loop it would have been one gap that long, and the ticker
    # could not have ticked during it); the loop kept turning meanwhile. Loose bounds: on a busy
    # machine one preemption can make one gap of a tenth of a second.
    assert took > 0.15
    assert len(gaps) >= 10, (len(gaps), took)
    assert max(gaps) < max(0.15, took / 2), (max(gaps), took)


async def test_scrapes_during_a_render_share_it_and_gzip_is_offered() -> None:
    registry = CollectorRegistry()
    many = _Many(10)
    registry.register(many)
    server = MetricsServer(registry, "127.0.0.1", 0)
    port = await server.start()
    gate = many.gate = threading.Event()
    calls = 0
    real = server.render

    async def counting(compress: bool = False) -> bytes:
        nonlocal calls
        calls += 1
        return await real(compress)

    server.render = counting  # type: ignore[method-assign]
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:

            async def scrape(encoding: str) -> tuple[str | None, bytes]:
                headers = {"Accept-Encoding": encoding}
                async with session.get(f"http://127.0.0.1:{port}/metrics", headers=headers) as resp:
                    return resp.headers.get("Content-Encoding"), await resp.read()

            scrapes = [asyncio.ensure_future(scrape("identity")) for _ in range(3)]
            scrapes.append(asyncio.ensure_future(scrape("gzip, deflate")))
            deadline = time.monotonic() + 5
            while calls < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            gate.set()
            results = await asyncio.gather(*scrapes)
        plain = [body for encoding, body in results if encoding is None]
        (compressed,) = [body for encoding, body in results if encoding == "gzip"]
        assert len(plain) == 3 and plain[0] == plain[1] == plain[2]
        assert gzip.decompress(compressed) == plain[0]
        assert server.renders == 2 and many.collects == 2  # one plain, one gzipped, for four scrapes
    finally:
        gate.set()
        await server.stop()


@pytest.mark.parametrize("compress", [False, True])
async def test_a_failing_collector_is_a_500_not_a_hang(compress: bool) -> None:
    class Broken(Collector):
        def collect(self) -> Iterator[Metric]:
            raise RuntimeError("collector bug")

    registry = CollectorRegistry()
    registry.register(Broken())
    server = MetricsServer(registry, "127.0.0.1", 0)
    port = await server.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://127.0.0.1:{port}/metrics",
                headers={"Accept-Encoding": "gzip" if compress else "identity"},
            ) as resp,
        ):
            assert resp.status == 500
        assert not server._renders  # the next scrape renders afresh
    finally:
        await server.stop()


async def test_stopping_does_not_wait_out_a_scrape_in_progress() -> None:
    """A scrape still being answered when epp stops (a slow render, a slow auth review) gets the
    server's short stop grace, not aiohttp's 60 s: epp's exit stays near --drain-timeout."""
    registry = CollectorRegistry()
    many = _Many(10)
    registry.register(many)
    gate = many.gate = threading.Event()  # the render waits (up to 10 s) for this
    server = MetricsServer(registry, "127.0.0.1", 0)
    port = await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            scrape = asyncio.ensure_future(session.get(f"http://127.0.0.1:{port}/metrics"))
            await wait_until(lambda: many.collects == 1, what="the render under way")
            loop = asyncio.get_running_loop()
            started = loop.time()
            await server.stop()
            stopped_after = loop.time() - started
            scrape.cancel()
            await asyncio.gather(scrape, return_exceptions=True)
        assert stopped_after < 8, stopped_after  # the render alone would hold it 10 s, aiohttp 60
    finally:
        gate.set()
