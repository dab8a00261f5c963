"""While the event loop is busy, endpoints are polled less often (epp.datalayer.pacing): a busy
second stretches the interval by a quarter, a quiet one shrinks it back, never past half the
staleness threshold; with room on the loop every endpoint is polled every interval."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from epp.app import App
from epp.datalayer.datastore import Datastore
from epp.datalayer.pacing import BUSY, QUIET, STRETCH_DOWN, STRETCH_UP, WINDOW_S, PollPacer
from epp.datalayer.scraper import Scraper
from epp.framework import Endpoint
from epp.settings import parse_settings
from tests.datalayer.test_idle_polling import CountingPage, page, polls_in

__all__ = ["page"]  # the fixture, shared with the idle-polling tests


class FakeCpu:
    """The loop thread's CPU seconds, as a test says they went."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def run_windows(pacer: PollPacer, cpu: FakeCpu, busy: float, windows: int, start: float) -> float:
    """`windows` one-second windows in which the loop was busy `busy` of the time; the end time."""
    now = start
    for _ in range(windows):
        pacer.tick(now)
        cpu.seconds += busy * WINDOW_S
        now += WINDOW_S
    pacer.tick(now)
    return now


def test_busy_seconds_stretch_the_interval_and_quiet_ones_bring_it_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cpu = FakeCpu()
    pacer = PollPacer(0.05, 1.0, cpu_clock=cpu)
    now = run_windows(pacer, cpu, 0.6, 5, start=100.0)  # between the marks: as configured
    assert pacer.stretch == 1.0 and pacer.interval_s == 0.05
    with caplog.at_level(logging.INFO, logger="epp.datalayer.pacing"):
        now = run_windows(pacer, cpu, 0.95, 1, start=now)
        assert pacer.stretch == pytest.approx(STRETCH_UP)
        assert pacer.interval_s == pytest.approx(0.05 * STRETCH_UP)
        now = run_windows(pacer, cpu, 0.95, 2, start=now)
        assert pacer.stretch == pytest.approx(STRETCH_UP**3)
        now = run_windows(pacer, cpu, (BUSY + QUIET) / 2, 3, start=now)  # in between: it stays
        assert pacer.stretch == pytest.approx(STRETCH_UP**3)
        now = run_windows(pacer, cpu, 0.1, 1, start=now)
        assert pacer.stretch == pytest.approx(STRETCH_UP**3 / STRETCH_DOWN)
        run_windows(pacer, cpu, 0.1, 30, start=now)
        assert pacer.stretch == 1.0 and pacer.interval_s == 0.05
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # once when it starts stretching, once when it is back
    assert "polling model servers every 62 ms instead of 50 ms" in messages[0]
    assert "has room again: polling every 50 ms" in messages[1]


def test_the_stretch_stops_at_the_longest_interval() -> None:
    cpu = FakeCpu()
    pacer = PollPacer(0.05, 1.0, cpu_clock=cpu)  # at most 20x: every half staleness threshold
    run_windows(pacer, cpu, 1.0, 40, start=0.0)
    assert pacer.stretch == pytest.approx(20.0) and pacer.interval_s == pytest.approx(1.0)
    never = PollPacer(0.05, 0.05, cpu_clock=cpu)  # no longer interval allowed: never stretched
    run_windows(never, cpu, 1.0, 5, start=100.0)
    assert never.stretch == 1.0


def test_ticks_within_a_window_read_the_cpu_clock_once() -> None:
    reads = []

    def clock() -> float:
        reads.append(1)
        return 0.0

    pacer = PollPacer(0.05, 1.0, cpu_clock=clock)
    for i in range(2000):  # 2,000 polls in half a second
        pacer.tick(10.0 + i * 0.00025)
    assert len(reads) == 1


def test_epp_lets_the_interval_stretch_to_half_the_staleness_threshold() -> None:
    args = ["--endpoints", "127.0.0.1:8000", "--metrics-staleness-threshold", "4s", "--secure-serving=false"]
    pacer = App(parse_settings(args)).scraper.pacer
    assert pacer.interval_s == 0.05
    cpu = FakeCpu()
    pacer._clock = cpu  # the loop kept busy, as a test says
    run_windows(pacer, cpu, 1.0, 60, start=0.0)
    assert pacer.interval_s == pytest.approx(2.0)
    # --refresh-metrics-yield-when-busy=false: every interval, however busy the loop.
    regardless = App(parse_settings([*args, "--refresh-metrics-yield-when-busy=false"])).scraper.pacer
    regardless._clock = cpu
    run_windows(regardless, cpu, 1.0, 10, start=100.0)
    assert regardless.stretch == 1.0 and regardless.interval_s == 0.05


async def test_a_busy_loop_is_polled_less_and_a_loop_with_room_every_interval(page: CountingPage) -> None:
    store = Datastore()
    store.replace_all([Endpoint("127.0.0.1", page.port)])
    scraper = Scraper(store, interval_s=0.05, max_interval_s=1.0)
    await scraper.start()
    try:
        await asyncio.sleep(WINDOW_S * 2.5)  # a loop with room: as configured
        assert scraper.pacer.stretch == 1.0
        assert await polls_in(page, 1.2) >= 6  # 24 at 50 ms: a loaded machine may lose some

        # Something keeps the loop's thread busy, 45 ms at a time with the polls' callbacks in
        # between: the polls stretch. The pacer's clock here counts the time the loop spent in
        # those slices: on an idle machine that is what `time.thread_time` says, and on a loaded
        # one (where the thread gets only its share of a core, so its CPU time says less) the
        # test still means what it says. (The real clock's reading is the first part's.)
        loop = asyncio.get_running_loop()
        hogging = True
        hogged = 0.0
        scraper.pacer._clock = lambda: hogged

        def hog() -> None:
            nonlocal hogged
            start = time.perf_counter()
            while time.perf_counter() < start + 0.045:
                pass
            hogged += time.perf_counter() - start
            if hogging:
                loop.call_soon(hog)

        hog()
        await asyncio.sleep(WINDOW_S * 4.5)
        hogging = False
        assert scraper.pacer.stretch >= STRETCH_UP**2
        assert scraper.next_delay(Endpoint("127.0.0.1", page.port)) > 0.05 * STRETCH_UP
    finally:
        await scraper.close()
