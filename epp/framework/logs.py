"""Rate-limited logging, for lines whose cause can repeat on every request or message (a plugin
that fails on each call, a peer sending bad input): a few lines, then a count."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time


class LogLimiter:
    """At most `burst` lines per `interval_s` seconds through `logger`; past that, lines are only
    counted, and one line at the end of the interval says how many were suppressed."""

    __slots__ = ("_emitted", "_flush", "_level", "_logger", "_started", "_suppressed", "burst", "interval_s")

    def __init__(self, logger: logging.Logger, burst: int, interval_s: float) -> None:
        self._logger = logger
        self.burst = burst
        self.interval_s = interval_s
        self._started = -math.inf
        self._emitted = 0
        self._suppressed = 0
        self._level = logging.DEBUG  # the highest level suppressed in this interval
        self._flush: asyncio.TimerHandle | None = None

    def log(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        if not self._logger.isEnabledFor(level):
            return
        now = time.monotonic()
        if now - self._started >= self.interval_s:
            self._summarise()
            self._started, self._emitted = now, 0
        if self._emitted < self.burst:
            self._emitted += 1
            self._logger.log(level, msg, *args, exc_info=exc_info, stacklevel=2)  # the caller's line
            return
        self._suppressed += 1
        self._level = max(self._level, level)
        if self._flush is None:
            with contextlib.suppress(RuntimeError):  # no running loop: the next line summarises
                delay = self._started + self.interval_s - now
                self._flush = asyncio.get_running_loop().call_later(delay, self._summarise)

    def _summarise(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._suppressed:
            self._logger.log(
                self._level,
                "suppressed %d similar log lines in the last %gs",
                self._suppressed,
                self.interval_s,
            )
            self._suppressed, self._level = 0, logging.DEBUG
