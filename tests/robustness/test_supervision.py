"""Background tasks under supervision: an exception is logged with the task's name, counted in
epp_background_task_restarts_total{task}, and the task restarted; cancelling ends it cleanly."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from epp.datalayer.datastore import Datastore
from epp.datalayer.model_server_metrics import RepeatAwareReader
from epp.datalayer.scraper import Scraper
from epp.discovery.leader import LeaderElector, LeaseTiming
from epp.discovery.reflector import Backoff, Reflector
from epp.framework import Endpoint
from epp.supervision import (
    RESTARTS_METRIC,
    RestartBackoff,
    Supervisor,
    current_supervisor,
    supervise,
    use_supervisor,
)
from tests.support.epp_app import running_epp, wait_until
from tests.support.fake_vllm import FakeVllm

T = TypeVar("T")

FAST = RestartBackoff(initial_s=0.01, max_s=0.04, reset_after_s=10.0)


def restarts(registry: CollectorRegistry, task: str) -> float:
    return registry.get_sample_value(RESTARTS_METRIC, {"task": task}) or 0.0


async def test_a_task_that_raises_is_logged_counted_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    supervisor = Supervisor(registry, FAST)
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise ValueError(f"failure {runs}")
        await asyncio.Event().wait()  # then healthy for good

    with caplog.at_level(logging.ERROR, logger="epp.supervision"):
        task = supervisor.spawn("poller", flaky, detail="endpoint 10.0.0.1:8000")
        await wait_until(lambda: runs == 4, what="three restarts")
    assert restarts(registry, "poller") == 3 and supervisor.restarts == {"poller": 3}
    assert "background task poller (endpoint 10.0.0.1:8000) failed (3 in a row)" in caplog.text
    assert "ValueError: failure 1" in caplog.text  # with the traceback
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled() and restarts(registry, "poller") == 3  # cancelling is no failure


async def test_cancelling_ends_a_task_cleanly_and_a_task_that_returns_is_done() -> None:
    supervisor = Supervisor(backoff=FAST)
    finished = asyncio.Event()

    async def once() -> None:
        finished.set()

    task = supervisor.spawn("once", once)
    await asyncio.wait_for(task, 1)
    assert finished.is_set() and not supervisor.restarts

    async def forever() -> None:
        await asyncio.sleep(3600)

    task = supervisor.spawn("forever", forever)
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Cancelled while waiting to restart: it ends too.
    task = supervisor.spawn("broken", lambda: _raise(RuntimeError("x")))
    await wait_until(lambda: supervisor.restarts.get("broken", 0) >= 1, what="a failure")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.done()


async def _raise(exc: Exception) -> None:
    raise exc


async def test_a_task_whose_cleanup_raises_while_cancelled_stays_cancelled() -> None:
    """A `finally` that raises (closing a client whose connection broke) replaces the cancel with
    its error: the task still ends, rather than being restarted behind the stop that cancelled it."""
    supervisor = Supervisor(backoff=FAST)
    runs = 0

    async def closes_badly() -> None:
        nonlocal runs
        runs += 1
        try:
            await asyncio.Event().wait()
        finally:
            if runs == 1:  # (once: a restart, if any, can be cancelled for good)
                raise ConnectionError("the connection broke while closing")

    task = supervisor.spawn("client", closes_badly)
    await wait_until(lambda: runs == 1, what="the task running")
    task.cancel()
    await asyncio.wait({task}, timeout=2)
    stopped, runs_then = task.done(), runs
    if not stopped:  # restarted: end it for good (a second cancel reaches it while it waits)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert stopped and runs_then == 1 and not supervisor.restarts


def test_the_backoff_doubles_to_its_cap() -> None:
    backoff = RestartBackoff(initial_s=0.1, max_s=1.0)
    for failures, cap in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (50, 1.0)):
        assert cap / 2 <= backoff.delay(failures) <= cap


async def test_the_context_supervisor_reaches_tasks_started_within() -> None:
    supervisor = Supervisor(backoff=FAST)
    seen: list[Supervisor] = []

    async def child() -> None:
        seen.append(current_supervisor())
        raise RuntimeError("once")

    with use_supervisor(supervisor):
        task = asyncio.get_running_loop().create_task(supervise("child", child))
    assert current_supervisor() is not supervisor  # only within the block
    await wait_until(lambda: len(seen) >= 2, what="a restart")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert seen[0] is supervisor and supervisor.restarts["child"] >= 1


async def supervised_scraper() -> tuple[FakeVllm, Supervisor, Endpoint, Scraper]:
    """A scraper (not started) polling one fake vLLM every 20 ms under its own supervisor."""
    fake = await FakeVllm("s0", waiting=2).start()
    supervisor = Supervisor(backoff=FAST)
    store = Datastore()
    ep = Endpoint("127.0.0.1", fake.port)
    store.replace_all([ep])
    return fake, supervisor, ep, Scraper(store, interval_s=0.02, supervisor=supervisor)


def failing_on_the_second_call(real: Callable[..., T]) -> tuple[Callable[..., T], list[int]]:
    """`real`, raising KeyError ("a bug") on its second call; and the count of calls so far."""
    calls = [0]

    def buggy(*args: Any) -> T:
        calls[0] += 1
        if calls[0] == 2:
            raise KeyError("a bug")
        return real(*args)

    return buggy, calls


async def test_a_poll_that_fails_unexpectedly_is_counted_and_polling_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, supervisor, ep, scraper = await supervised_scraper()
    # The bug is in the callback that ends a poll, off any task.
    buggy, calls = failing_on_the_second_call(RepeatAwareReader.finish)
    monkeypatch.setattr(RepeatAwareReader, "finish", buggy)
    await scraper.start()
    try:
        await wait_until(lambda: calls[0] >= 4, what="polls after the failure")
        assert supervisor.restarts == {"scraper": 1}
        fake.waiting = 5
        await wait_until(lambda: ep.metrics.waiting_queue_size == 5, what="fresh metrics again")
    finally:
        await scraper.close()
        await fake.stop()


async def test_a_ticker_that_fails_unexpectedly_is_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, supervisor, ep, scraper = await supervised_scraper()
    buggy, _ = failing_on_the_second_call(scraper._due)
    monkeypatch.setattr(scraper, "_due", buggy)
    await scraper.start()
    try:
        await wait_until(lambda: supervisor.restarts.get("scraper") == 1, what="the restart")
        fake.waiting = 5
        await wait_until(lambda: ep.metrics.waiting_queue_size == 5, what="fresh metrics again")
    finally:
        await scraper.close()
        await fake.stop()


async def test_a_reflector_counts_an_unexpected_error_and_lists_again() -> None:
    supervisor = Supervisor(backoff=FAST)
    attempts = 0

    async def open_fn(**query: Any) -> aiohttp.ClientResponse:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("a response nobody foresaw")

    reflector = Reflector(
        "pods test/{app=x}",
        open_fn,
        lambda items: None,
        lambda kind, obj: None,
        Backoff(0.01, 0.02),
        1.0,
        supervisor,
    )
    task = asyncio.get_running_loop().create_task(reflector.run())
    await wait_until(lambda: attempts >= 3, what="relists")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert supervisor.restarts["kubernetes-reflector"] >= 2


@pytest.mark.parametrize("kind", ["objectives", "rewrites"])
async def test_the_pools_objectives_and_rewrites_count_their_failures_under_their_own_names(
    kind: str, tmp_path: Any
) -> None:
    """An operator reading epp_background_task_restarts_total{task} sees which follower failed."""
    from epp.discovery.kubeclient import KubeClient, resolve_config_source
    from epp.discovery.objectives import ObjectiveStore, ObjectiveWatcher
    from epp.discovery.rewrites import RewriteStore, RewriteWatcher
    from tests.support.kube_api import KubeApiServer, Resource

    plural = "inferenceobjectives" if kind == "objectives" else "inferencemodelrewrites"
    api = await KubeApiServer(resources=[Resource("llm-d.ai", "v1alpha2", plural, "Whatever")]).start()
    client = KubeClient(resolve_config_source(api.write_kubeconfig(tmp_path / "kubeconfig")))
    store: Any = ObjectiveStore() if kind == "objectives" else RewriteStore()
    store.replace = lambda entries: (_ for _ in ()).throw(RuntimeError("a store with a bug"))
    watcher_type: Any = ObjectiveWatcher if kind == "objectives" else RewriteWatcher
    group = "inference.networking.k8s.io"
    watcher = watcher_type(client, "default", "pool", group, store, Backoff(0.01, 0.02))
    supervisor = Supervisor(backoff=FAST)
    with use_supervisor(supervisor):
        task = asyncio.get_running_loop().create_task(watcher.reflector.run())
    try:
        await wait_until(lambda: supervisor.restarts.get(watcher.task, 0) >= 2, what="counted failures")
        assert watcher.task == f"inference-{'objectives' if kind == 'objectives' else 'model-rewrites'}"
        assert "kubernetes-reflector" not in supervisor.restarts
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
        await api.stop()


async def test_the_leader_elector_counts_a_failed_attempt_and_goes_on() -> None:
    supervisor = Supervisor(backoff=FAST)
    elector = LeaderElector(
        None,  # type: ignore[arg-type]  # no API calls: the attempt itself is replaced
        "ns",
        "lease",
        "me",
        LeaseTiming(lease_duration_s=0.3, renew_deadline_s=0.2, retry_period_s=0.01),
        supervisor=supervisor,
    )
    attempts = 0

    async def attempt() -> bool:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("surprise")
        return True

    elector.try_acquire_or_renew = attempt  # type: ignore[method-assign]
    elector.start()
    try:
        await wait_until(lambda: elector.is_leader, what="leadership after the failed attempt")
        assert supervisor.restarts == {"leader-election": 1}
    finally:
        await elector.stop(release=False)


async def test_restarts_show_on_epps_metrics_page(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = await FakeVllm("s0").start()
    try:
        async with running_epp("--endpoints", fake.address) as epp:
            app = epp.app
            real = app._refresh_status
            calls = 0

            async def refresh() -> None:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise RuntimeError("housekeeping bug")
                await real()

            monkeypatch.setattr(app, "_refresh_status", refresh)
            app._status_changed.set()  # housekeep now
            await wait_until(lambda: app.supervisor.restarts.get("housekeeping") == 1, what="a restart")
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{epp.metrics_port}/metrics") as resp,
            ):
                page = await resp.text()
            assert 'epp_background_task_restarts_total{task="housekeeping"} 1.0' in page
            await wait_until(lambda: calls >= 2, what="housekeeping running again")
    finally:
        await fake.stop()
