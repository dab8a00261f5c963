"""Polling slower while the event loop is busy, so scraping cannot starve the request path.

epp serves ext_proc and polls every endpoint's /metrics on one event loop. A poll of a real vLLM
page costs about 60-120 us of that loop's CPU (docs/performance.md): 100 pods at the default
50 ms take a fifth of a core, and 1,000 pods would want more than the loop's one core, leaving
the requests whatever the pollers leave. The Go EPP polls on as many cores as it has; epp has one
loop, so while that loop is busy it polls less often instead.

`PollPacer` reads the loop thread's own CPU time once a second (`time.thread_time`, on the loop's
thread: one call a second). Over `BUSY` (75 % of the second) the poll interval is stretched by a
quarter; under `QUIET` (50 %) it shrinks back a tenth at a time to the configured one. The stretch
is capped so that an endpoint is polled at least every half staleness threshold: its metrics
never go stale because of it. While the loop has room (the usual case: 300 pods at 50 ms take
about 45 % of a core on the development machine) nothing changes, and every endpoint is polled
every interval, as the Go EPP polls it. What it trades is freshness for the request path's CPU,
whoever makes the loop busy: scraping a large pool, or requests near epp's capacity.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

BUSY = 0.75  # share of a window the loop thread spent on CPU above which polls are stretched
QUIET = 0.5  # ... and below which they shrink back towards the configured interval
WINDOW_S = 1.0  # how often the stretch is reconsidered
STRETCH_UP = 1.25
STRETCH_DOWN = 1.1


class PollPacer:
    """The poll interval now (`interval_s`): the configured one times `stretch` (1.0 while the
    loop has room). Call `tick(now)` on the loop's thread, e.g. after every poll; it looks at the
    loop's CPU once a window."""

    __slots__ = ("_base_s", "_clock", "_cpu_at_start", "_max_stretch", "_window_end", "stretch")

    def __init__(
        self, interval_s: float, max_interval_s: float, cpu_clock: Callable[[], float] = time.thread_time
    ) -> None:
        self._base_s = interval_s
        self._max_stretch = max(1.0, max_interval_s / interval_s) if interval_s > 0 else 1.0
        self._clock = cpu_clock  # the calling thread's CPU seconds: the loop's, called on it
        self.stretch = 1.0
        self._window_end: float | None = None
        self._cpu_at_start = 0.0

    @property
    def interval_s(self) -> float:
        return self._base_s * self.stretch

    def tick(self, now: float) -> None:
        """`now` on the loop's clock (monotonic seconds)."""
        window_end = self._window_end
        if window_end is not None and now < window_end:
            return
        cpu = self._clock()
        if window_end is not None:
            self._reconsider((cpu - self._cpu_at_start) / (now - window_end + WINDOW_S))
        self._window_end, self._cpu_at_start = now + WINDOW_S, cpu

    def _reconsider(self, busy: float) -> None:
        before = self.stretch
        if busy > BUSY:
            self.stretch = min(self._max_stretch, before * STRETCH_UP)
        elif busy < QUIET and before > 1.0:
            self.stretch = max(1.0, before / STRETCH_DOWN)
        if before == 1.0 and self.stretch > 1.0:
            log.warning(
                "the event loop is busy (%.0f %% of a core): polling model servers every %.0f ms "
                "instead of %.0f ms while it stays above %.0f %%",
                busy * 100,
                self.interval_s * 1e3,
                self._base_s * 1e3,
                QUIET * 100,
            )
        elif before > 1.0 and self.stretch == 1.0:
            log.info("the event loop has room again: polling every %.0f ms", self._base_s * 1e3)
