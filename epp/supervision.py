"""Every background task runs under a supervisor: an exception is logged with the task's name,
counted in `epp_background_task_restarts_total{task}`, and the task is started again after a
capped exponential backoff. Cancelling the task ends it cleanly, and a task that returns is done.

    supervisor = Supervisor(registry)
    task = supervisor.spawn("scraper", lambda: poll_forever(ep), detail=ep.key)

`task` is a bounded name (one label value per kind of task); `detail` says which one (an endpoint,
a lease, a watched resource) and goes in the log only. Components take an optional supervisor;
without one they use the context's (`use_supervisor`, which the app sets while it starts its
components, so tasks started deep inside discovery are supervised too), else a default that logs
and counts without exporting. `supervise(...)` runs a factory under the current supervisor in the
calling task.

Tasks that recover from their own expected failures (a reflector relists, the leader elector
retries, a failed scrape keeps the last snapshot) keep doing so; the supervisor is for what they
did not expect. `Supervisor.failed` counts an unexpected error a loop recovered from by itself.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)

RESTARTS_METRIC = "epp_background_task_restarts_total"

TaskFactory = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RestartBackoff:
    """The n-th restart in a row waits U(d/2, d), d = min(max_s, initial_s * 2^(n-1)). A task that
    ran `reset_after_s` before failing starts again from `initial_s`."""

    initial_s: float = 0.1
    max_s: float = 30.0
    reset_after_s: float = 60.0

    def delay(self, failures: int) -> float:
        d = min(self.max_s, self.initial_s * 2 ** max(0, failures - 1))
        return random.uniform(d / 2, d)


class Supervisor:
    """Runs background tasks, restarting them when they fail. `restarts` counts per task name
    (also exported when built with a registry)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, backoff: RestartBackoff | None = None
    ) -> None:
        self.backoff = backoff or RestartBackoff()
        self.restarts: dict[str, int] = {}
        self._counter = (
            Counter(
                RESTARTS_METRIC.removesuffix("_total"),
                "Background tasks (scrapers, discovery, leader election, housekeeping) that failed "
                "unexpectedly and were restarted, or recovered from an unexpected error, by task.",
                ["task"],
                registry=registry,
            )
            if registry is not None
            else None
        )

    def spawn(
        self, task: str, factory: TaskFactory, *, detail: str = "", backoff: RestartBackoff | None = None
    ) -> asyncio.Task[None]:
        """Start `factory()` as a supervised asyncio task; cancel the task to stop it."""
        return asyncio.get_running_loop().create_task(
            self.run(task, factory, detail=detail, backoff=backoff),
            name=f"{task} {detail}".strip(),
        )

    async def run(
        self, task: str, factory: TaskFactory, *, detail: str = "", backoff: RestartBackoff | None = None
    ) -> None:
        """Run `factory()` in the calling task until it returns or is cancelled, restarting it
        after each exception."""
        backoff = backoff or self.backoff
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            started = loop.time()
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                task_now = asyncio.current_task()
                if task_now is not None and task_now.cancelling():
                    # Cleanup that raised while the task was being cancelled: the cancel stands
                    # (a restart here would outlive the stop that asked for it).
                    log.warning("background task %s raised while stopping: %s", _describe(task, detail), exc)
                    raise asyncio.CancelledError from exc
                failures = 1 if loop.time() - started >= backoff.reset_after_s else failures + 1
                delay = backoff.delay(failures)
                self._count(task)
                log.error(
                    "background task %s failed (%d in a row), restarting in %.2fs: %s",
                    _describe(task, detail),
                    failures,
                    delay,
                    exc or type(exc).__name__,
                    exc_info=exc,
                )
            await asyncio.sleep(delay)

    def failed(self, task: str, exc: BaseException, *, detail: str = "") -> None:
        """An unexpected error a task recovered from by itself: logged and counted like a restart."""
        self._count(task)
        log.error(
            "background task %s: unexpected error, recovered: %s",
            _describe(task, detail),
            exc or type(exc).__name__,
            exc_info=exc,
        )

    def _count(self, task: str) -> None:
        self.restarts[task] = self.restarts.get(task, 0) + 1
        if self._counter is not None:
            self._counter.labels(task).inc()


def _describe(task: str, detail: str) -> str:
    return f"{task} ({detail})" if detail else task


_DEFAULT = Supervisor()
_CURRENT: ContextVar[Supervisor | None] = ContextVar("epp_supervisor", default=None)


def current_supervisor() -> Supervisor:
    """The supervisor of the running context (`use_supervisor`), else a default that only logs."""
    return _CURRENT.get() or _DEFAULT


@contextmanager
def use_supervisor(supervisor: Supervisor) -> Iterator[Supervisor]:
    """Within the block (and in tasks created within it), `current_supervisor()` is `supervisor`."""
    token = _CURRENT.set(supervisor)
    try:
        yield supervisor
    finally:
        _CURRENT.reset(token)


async def supervise(
    task: str,
    factory: TaskFactory,
    backoff: RestartBackoff | None = None,
    *,
    detail: str = "",
    supervisor: Supervisor | None = None,
) -> None:
    """Run `factory()` under `supervisor` (default: the current one) in the calling task."""
    await (supervisor or current_supervisor()).run(task, factory, detail=detail, backoff=backoff)
