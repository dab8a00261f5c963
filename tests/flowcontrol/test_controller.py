"""The flow controller with real detectors and endpoints: dispatch, bands, fairness, ordering,
bounds, TTL, cancellation, shutdown. Every request gets exactly one outcome."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping

import pytest

from epp.flowcontrol.config import BandConfig, FlowControlConfig
from epp.flowcontrol.controller import FlowController, Outcome
from epp.framework import Endpoint
from epp.supervision import Supervisor
from epp.testing import make_endpoint
from epp_scorers.flow_policies.fairness import GlobalStrictFairnessPolicy, RoundRobinFairnessPolicy
from epp_scorers.flow_policies.ordering import EdfOrderingPolicy, FcfsOrderingPolicy
from epp_scorers.flow_policies.usage_limits import PriorityHoldbackPolicy
from epp_scorers.saturation_detectors.concurrency import ConcurrencyDetector

FCFS, EDF = FcfsOrderingPolicy(), EdfOrderingPolicy()
STRICT, RR = GlobalStrictFairnessPolicy(), RoundRobinFairnessPolicy()


def config(
    max_requests: int = 100, ttl_s: float = 5.0, fairness: object = STRICT, ordering: object = FCFS
) -> FlowControlConfig:
    band = BandConfig(0, max_requests, 10**9, ordering, fairness)  # type: ignore[arg-type]
    cfg = FlowControlConfig(ttl_s=ttl_s, no_endpoint_ttl_s=ttl_s, default_band=band)
    for prio in (10, 0, -10):
        cfg.bands[prio] = BandConfig(prio, max_requests, 10**9, ordering, fairness)  # type: ignore[arg-type]
    return cfg


class Pool:
    """One endpoint that holds `capacity` requests; `serve` takes one, `done` frees one."""

    def __init__(self, capacity: int) -> None:
        self.ep: Endpoint = make_endpoint("a")
        self.detector = ConcurrencyDetector(max_concurrency=capacity)
        self.endpoints = [self.ep]

    def candidates(self) -> list[Endpoint]:
        return self.endpoints


async def submit(
    fc: FlowController, order: list[str], rid: str, fid: str = "f", prio: int = 0, pool: Pool | None = None
) -> Outcome:
    outcome = await fc.enqueue_and_wait(rid, fid, prio, 100)
    if outcome is Outcome.DISPATCHED:
        order.append(rid)
        if pool is not None:
            pool.ep.inflight_requests += 1  # what the director's ledger charge does
    return outcome


async def free_one(fc: FlowController, pool: Pool) -> None:
    pool.ep.inflight_requests -= 1
    fc.wake()
    await asyncio.sleep(0.01)


async def test_goes_at_once_when_not_saturated() -> None:
    pool = Pool(4)
    fc = FlowController(config(), pool.detector, pool.candidates)
    order: list[str] = []
    outcomes = [await submit(fc, order, f"r{i}", pool=pool) for i in range(4)]
    assert outcomes == [Outcome.DISPATCHED] * 4
    assert fc.queued == 0


async def test_saturated_pool_queues_and_dispatches_higher_priority_first() -> None:
    pool = Pool(1)
    fc = FlowController(config(), pool.detector, pool.candidates)
    order: list[str] = []
    assert await submit(fc, order, "first", pool=pool) is Outcome.DISPATCHED
    tasks = [
        asyncio.create_task(submit(fc, order, "low", prio=-10, pool=pool)),
        asyncio.create_task(submit(fc, order, "std", prio=0, pool=pool)),
        asyncio.create_task(submit(fc, order, "crit", prio=10, pool=pool)),
    ]
    await asyncio.sleep(0.05)
    assert fc.queued == 3 and order == ["first"]
    for _ in range(3):
        await free_one(fc, pool)
    assert await asyncio.gather(*tasks) == [Outcome.DISPATCHED] * 3
    assert order == ["first", "crit", "std", "low"]


async def one_running_and_queued(
    max_requests: int, queued: int
) -> tuple[Pool, FlowController, list[str], list[asyncio.Task[Outcome]]]:
    """A pool of one slot with "running" in it and `queued` requests (q0, q1, ...) waiting."""
    pool = Pool(1)
    fc = FlowController(config(max_requests=max_requests), pool.detector, pool.candidates)
    order: list[str] = []
    await submit(fc, order, "running", pool=pool)
    waiting = [asyncio.create_task(submit(fc, order, f"q{i}", pool=pool)) for i in range(queued)]
    await asyncio.sleep(0.05)
    return pool, fc, order, waiting


async def test_full_band_rejects_at_once() -> None:
    pool, fc, order, waiting = await one_running_and_queued(max_requests=2, queued=2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await submit(fc, order, "over", pool=pool) is Outcome.REJECTED_CAPACITY
    assert loop.time() - started < 1.0  # at once, not after the 5 s TTL
    assert fc.queued == 2
    fc.stop()
    assert await asyncio.gather(*waiting) == [Outcome.EVICTED_OTHER] * 2


async def test_ttl_evicts_a_waiting_request_in_time() -> None:
    pool = Pool(1)
    fc = FlowController(config(ttl_s=0.2), pool.detector, pool.candidates)
    order: list[str] = []
    await submit(fc, order, "running", pool=pool)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await submit(fc, order, "late", pool=pool) is Outcome.EVICTED_TTL
    assert 0.19 <= loop.time() - started < 1.5
    assert fc.queued == 0


async def test_empty_pool_ttl_is_no_endpoints() -> None:
    pool = Pool(1)
    pool.endpoints = []
    fc = FlowController(config(ttl_s=0.05), pool.detector, pool.candidates)
    assert await fc.enqueue_and_wait("r", "f", 0, 10) is Outcome.EVICTED_NO_ENDPOINTS


async def test_cancelled_while_queued_leaves_the_queue() -> None:
    pool = Pool(1)
    fc = FlowController(config(), pool.detector, pool.candidates)
    order: list[str] = []
    await submit(fc, order, "running", pool=pool)
    gone = asyncio.create_task(submit(fc, order, "gone", pool=pool))
    stays = asyncio.create_task(submit(fc, order, "stays", pool=pool))
    await asyncio.sleep(0.01)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert fc.queued == 1
    await free_one(fc, pool)
    assert await stays is Outcome.DISPATCHED
    assert order == ["running", "stays"]


async def test_thousands_cancelled_together_leave_a_bounded_queue_in_order() -> None:
    """A whole flow reset at once (clients gone, a TTL for all): each leaves its queue, the order
    of those that stay holds, and the flow keeps no more dead entries than live ones (plus a few)."""
    pool, fc, order, tasks = await one_running_and_queued(max_requests=5000, queued=3000)
    assert fc.queued == 3000
    stay = {1, 1500, 2998}
    for i, task in enumerate(tasks):
        if i not in stay:
            task.cancel()
    await asyncio.gather(*tasks[:1], return_exceptions=True)
    await asyncio.sleep(0.05)
    assert fc.queued == 3
    (flow,) = [f for band in fc._order for f in band.flows.values()]
    assert len(flow) == 3 and len(flow.heap) <= 3 + 64
    for _ in range(3):
        await free_one(fc, pool)
    assert order == ["running", "q1", "q1500", "q2998"]
    assert fc.queued == 0 and all(not band.flows for band in fc._order)


@pytest.mark.parametrize(
    ("fairness", "expected"), [(RR, ["a1", "b1", "a2", "b2", "a3"]), (STRICT, ["a1", "a2", "a3", "b1", "b2"])]
)
async def test_fairness_between_flows(fairness: object, expected: list[str]) -> None:
    pool = Pool(1)
    fc = FlowController(config(fairness=fairness), pool.detector, pool.candidates)
    order: list[str] = []
    await submit(fc, order, "running", pool=pool)
    tasks = []
    for rid in ("a1", "a2", "a3", "b1", "b2"):  # tenant a floods first
        tasks.append(asyncio.create_task(submit(fc, order, rid, fid=rid[0], pool=pool)))
        await asyncio.sleep(0.001)
    for _ in range(5):
        await free_one(fc, pool)
    await asyncio.gather(*tasks)
    assert order[1:] == expected


async def test_edf_serves_the_earliest_deadline_first() -> None:
    pool = Pool(1)
    fc = FlowController(config(ordering=EDF, ttl_s=10.0), pool.detector, pool.candidates)
    order: list[str] = []
    await submit(fc, order, "running", pool=pool)
    first = asyncio.create_task(submit(fc, order, "long", pool=pool))
    await asyncio.sleep(0.01)
    fc.config.ttl_s = 1.0  # a later request with a shorter TTL has the earlier deadline
    second = asyncio.create_task(submit(fc, order, "short", pool=pool))
    await asyncio.sleep(0.01)
    await free_one(fc, pool)
    await free_one(fc, pool)
    await asyncio.gather(first, second)
    assert order == ["running", "short", "long"]


async def test_many_streams_each_get_one_answer() -> None:
    """300 requests on a pool of 8 slots with a small band, arriving faster than the slots free:
    some go, some are refused, some time out, some are cancelled by their client; none hangs and
    the queues end empty."""
    pool = Pool(8)
    fc = FlowController(config(max_requests=40, ttl_s=0.3, fairness=RR), pool.detector, pool.candidates)
    order: list[str] = []
    rng = random.Random(7)

    async def client(i: int) -> Outcome | str:
        await asyncio.sleep(rng.random() * 0.3)
        task = asyncio.create_task(
            submit(fc, order, f"r{i}", fid=f"t{i % 5}", prio=rng.choice((10, 0, -10)), pool=pool)
        )
        if i % 10 == 0:
            await asyncio.sleep(0.01)
            task.cancel()
        try:
            outcome = await task
        except asyncio.CancelledError:
            return "cancelled"
        if outcome is Outcome.DISPATCHED:
            # Served, then it completes: 8 slots at 20-60 ms serve at most 400 a second, and the
            # 300 arrive within 0.3 s, so the band of 40 overflows whatever the machine's timing.
            await asyncio.sleep(0.02 + rng.random() * 0.04)
            pool.ep.inflight_requests -= 1
            fc.wake()
        return outcome

    results = await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(300))), 10.0)
    assert len(results) == 300
    assert fc.queued == 0 and pool.ep.inflight_requests == 0
    assert {Outcome.DISPATCHED, Outcome.REJECTED_CAPACITY} <= set(results)
    assert set(results) <= {Outcome.DISPATCHED, Outcome.REJECTED_CAPACITY, Outcome.EVICTED_TTL, "cancelled"}


async def test_priority_holdback_keeps_headroom_for_higher_priorities() -> None:
    """Ceilings 1.0 / 0.75 / 0.5 on a pool of 4 slots: a standard request waits at 3 in flight,
    a sheddable one at 2, a critical one goes until all 4 are used."""
    pool = Pool(4)
    cfg = config()
    cfg.usage_limit = PriorityHoldbackPolicy(min_ceiling=0.5)
    fc = FlowController(cfg, pool.detector, pool.candidates)
    order: list[str] = []
    for rid in ("s1", "s2"):
        assert await submit(fc, order, rid, prio=0, pool=pool) is Outcome.DISPATCHED
    shed = asyncio.create_task(submit(fc, order, "shed", prio=-10, pool=pool))  # 2/4 = 0.5: held
    assert await submit(fc, order, "s3", prio=0, pool=pool) is Outcome.DISPATCHED  # 0.5 < 0.75
    std = asyncio.create_task(submit(fc, order, "s4", prio=0, pool=pool))  # 0.75: held
    assert await submit(fc, order, "crit", prio=10, pool=pool) is Outcome.DISPATCHED  # 0.75 < 1.0
    await asyncio.sleep(0.01)
    assert fc.queued == 2
    for _ in range(4):  # 3 in flight, 2 (s4 goes: 3), 2, 1 (shed goes)
        await free_one(fc, pool)
    assert list(await asyncio.gather(std, shed)) == [Outcome.DISPATCHED] * 2
    assert order == ["s1", "s2", "s3", "crit", "s4", "shed"]


async def test_after_stop_only_what_can_go_at_once_goes() -> None:
    pool = Pool(2)
    fc = FlowController(config(), pool.detector, pool.candidates)
    order: list[str] = []
    fc.stop()
    assert await submit(fc, order, "a", pool=pool) is Outcome.DISPATCHED  # draining, not saturated
    assert await submit(fc, order, "b", pool=pool) is Outcome.DISPATCHED
    assert await submit(fc, order, "c", pool=pool) is Outcome.REJECTED_OTHER  # would have to wait
    assert fc.queued == 0


async def test_a_cancel_in_the_same_turn_as_the_stop_leaves_the_count_right() -> None:
    """A waiting request whose client goes away in the very turn epp starts stopping: the stop's
    answer was not a dispatch, so nothing was in transit; a request that can go at once still
    goes (the count going below zero made it a 503)."""
    pool = Pool(1)
    fc = FlowController(config(), pool.detector, pool.candidates)
    order: list[str] = []
    await submit(fc, order, "holder", pool=pool)
    waiting = asyncio.ensure_future(submit(fc, order, "waits", pool=pool))
    await asyncio.sleep(0.01)
    assert fc.queued == 1
    fc.stop()
    waiting.cancel()  # the same turn: the waiter's future is answered, then its task cancelled
    with pytest.raises(asyncio.CancelledError):
        await waiting
    pool.ep.inflight_requests -= 1  # the holder finished: the pool has room
    assert await submit(fc, order, "after", pool=pool) is Outcome.DISPATCHED


class _FailsOnce(GlobalStrictFairnessPolicy):
    """A fairness plugin with a bug that shows once."""

    failed = False

    def pick(self, heads: Mapping[str, tuple[float, ...]], last: str | None) -> str:
        if not self.failed:
            self.failed = True
            raise ZeroDivisionError("a plugin bug")
        return super().pick(heads, last)


async def test_a_plugin_error_in_dispatch_is_counted_and_dispatch_goes_on() -> None:
    """Dispatch runs as a loop callback, outside any task: a plugin that raises there is logged and
    counted as a recovered background error, and the queue is looked at again a recheck later, so
    the waiting request goes then rather than at its TTL."""
    pool = Pool(1)
    supervisor = Supervisor()
    fc = FlowController(
        config(ttl_s=30.0, fairness=_FailsOnce()), pool.detector, pool.candidates, recheck_s=0.02,
        supervisor=supervisor,
    )  # fmt: skip
    order: list[str] = []
    await submit(fc, order, "r0", pool=pool)
    waiting = asyncio.ensure_future(submit(fc, order, "r1", pool=pool))
    await asyncio.sleep(0.01)
    assert fc.queued == 1
    pool.ep.inflight_requests -= 1
    fc.wake()  # dispatch: the plugin raises
    async with asyncio.timeout(2):
        assert await waiting is Outcome.DISPATCHED
    assert order == ["r0", "r1"]
    assert supervisor.restarts == {"flow-control-dispatch": 1}


async def test_bands_of_priorities_seen_once_do_not_pile_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """An objective whose priority is edited over and over brings a band per value: the empty ones
    the config does not list are forgotten past a bound, the listed and busy ones stay."""
    from epp.flowcontrol import controller

    monkeypatch.setattr(controller, "MAX_UNLISTED_BANDS", 8)
    pool, fc, order, waiting = await one_running_and_queued(max_requests=10, queued=1)  # q0 at 0
    for priority in range(1000, 1100):  # the pool is full: each queues in a band of its own, then leaves
        task = asyncio.create_task(submit(fc, order, f"p{priority}", prio=priority, pool=pool))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert len(fc._bands) <= 3 + 8  # the listed ones (10, 0, -10) and the bound
    assert {10, 0, -10} <= set(fc._bands)
    await free_one(fc, pool)
    assert await waiting[0] is Outcome.DISPATCHED and order == ["running", "q0"]
