"""program-aware-fairness: least attained service between programs, through the real flow
controller (requests queued on a saturated pool, dispatched as slots free), its decay, its bounded
per-program state and eviction sweep, its metrics and its parameters."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from epp.flowcontrol.config import BandConfig, FlowControlConfig
from epp.flowcontrol.controller import FlowController, Outcome
from epp.framework import (
    ConfigError,
    CycleState,
    FairnessPolicy,
    Params,
    PluginHandle,
    ResponseStats,
    SchedulingResult,
    ServiceContext,
)
from epp.testing import make_endpoint, make_request
from epp_scorers.flow_policies import program_aware
from epp_scorers.flow_policies.fairness import RoundRobinFairnessPolicy
from epp_scorers.flow_policies.ordering import FcfsOrderingPolicy
from epp_scorers.flow_policies.program_aware import ProgramAwareFairness
from epp_scorers.saturation_detectors.concurrency import ConcurrencyDetector

FAIRNESS = "x-llm-d-inference-fairness-id"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stats(input_tokens: int, output_tokens: int) -> ResponseStats:
    return ResponseStats(0.1, 1.0, output_tokens, False, input_tokens)


def serve(policy: ProgramAwareFairness, program: str, input_tokens: int, output_tokens: int) -> None:
    """What epp's request path tells the policy about one request of `program`, start to end."""
    request = make_request(headers={FAIRNESS: program}, request_id=f"{program}-x")
    endpoint = make_endpoint("a")
    policy.pre_request(CycleState(), request, SchedulingResult("default", {}))
    policy.response_measured(request, endpoint, stats(input_tokens, output_tokens))
    policy.response_complete(request, endpoint)


async def drain_through_controller(
    fairness: FairnessPolicy, cost: dict[str, tuple[int, int]], per_program: int, served: int
) -> list[str]:
    """Each program queues `per_program` requests on a pool of one slot (the heavy one first);
    `served` of them are dispatched one at a time, each completing (its tokens reported to the
    policy when it is program-aware) before the next slot frees. Returns the programs in dispatch
    order."""
    endpoint = make_endpoint("a")
    band = BandConfig(0, 1000, 10**9, FcfsOrderingPolicy(), fairness)
    fc = FlowController(
        FlowControlConfig(ttl_s=30.0, no_endpoint_ttl_s=30.0, default_band=band),
        ConcurrencyDetector(max_concurrency=1),
        lambda: [endpoint],
    )
    endpoint.inflight_requests = 1  # the slot is taken: everything below queues
    order: list[str] = []

    async def submit(program: str, i: int) -> None:
        outcome = await fc.enqueue_and_wait(f"{program}{i}", program, 0, 100, {FAIRNESS: program})
        assert outcome is Outcome.DISPATCHED
        endpoint.inflight_requests += 1
        order.append(program)

    tasks = []
    for program in cost:  # dict order: the heavy program queues all its requests first
        for i in range(per_program):
            tasks.append(asyncio.create_task(submit(program, i)))
            await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert fc.queued == per_program * len(cost)
    for n in range(1, served + 1):
        endpoint.inflight_requests -= 1
        fc.wake()
        for _ in range(200):  # bounded: the dispatch lands within a few loop turns
            if len(order) == n:
                break
            await asyncio.sleep(0.001)
        assert len(order) == n
        if isinstance(fairness, ProgramAwareFairness):
            serve(fairness, order[-1], *cost[order[-1]])
    fc.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    return order[:served]


async def test_least_attained_service_shares_tokens_not_turns() -> None:
    """A heavy program (1,000 + 2 x 500 tokens a request) queued 20 requests before a light one
    (100 + 2 x 50) queued 20. Round robin alternates: the heavy program gets 10x the tokens.
    Program-aware fairness serves the light program until it has used as much: tokens stay within
    one heavy request of each other."""
    cost = {"heavy": (1000, 500), "light": (100, 50)}
    weight = {p: i + 2 * o for p, (i, o) in cost.items()}

    def tokens(order: list[str]) -> dict[str, int]:
        return {p: order.count(p) * weight[p] for p in cost}

    rr = await drain_through_controller(RoundRobinFairnessPolicy(), cost, 20, 12)
    assert rr.count("heavy") == rr.count("light") == 6
    assert tokens(rr)["heavy"] == 10 * tokens(rr)["light"]

    policy = ProgramAwareFairness(half_life_s=0)
    las = await drain_through_controller(policy, cost, 20, 12)
    # Cold start (no service yet): the head that waited longest, the heavy one, goes first; then
    # the light program catches up before the heavy one goes again.
    assert las[0] == "heavy"
    assert las[1:11] == ["light"] * 10
    used = tokens(las)
    assert abs(used["heavy"] - used["light"]) <= weight["heavy"]
    assert policy.programs["heavy"].service == used["heavy"]
    assert policy.programs["light"].in_flight == 0 and policy.programs["light"].dispatched == 10


async def test_head_wait_breaks_ties_and_waits_are_recorded() -> None:
    """Equal service: the flow whose head waited longer goes; its wait counts toward its mean."""
    policy = ProgramAwareFairness()
    endpoint = make_endpoint("a")
    band = BandConfig(0, 100, 10**9, FcfsOrderingPolicy(), policy)
    fc = FlowController(
        FlowControlConfig(ttl_s=30.0, no_endpoint_ttl_s=30.0, default_band=band),
        ConcurrencyDetector(max_concurrency=1),
        lambda: [endpoint],
    )
    endpoint.inflight_requests = 1
    order: list[str] = []

    async def submit(program: str) -> None:
        if await fc.enqueue_and_wait(program, program, 0, 10) is Outcome.DISPATCHED:
            endpoint.inflight_requests += 1
            order.append(program)

    early = asyncio.create_task(submit("early"))
    await asyncio.sleep(0.05)
    late = asyncio.create_task(submit("late"))
    await asyncio.sleep(0.01)
    endpoint.inflight_requests = 0
    fc.wake()
    await asyncio.wait_for(early, 2.0)
    assert order == ["early"]
    assert policy.programs["early"].waits == 1 and policy.programs["early"].mean_wait_ms >= 50
    fc.stop()
    await late


def test_attained_service_halves_every_half_life() -> None:
    clock = Clock()
    policy = ProgramAwareFairness(half_life_s=10.0, clock=clock)
    serve(policy, "p", 1000, 0)
    state = policy.programs["p"]
    assert policy.service(state, clock.now) == pytest.approx(1000)
    clock.now += 10.0
    assert policy.service(state, clock.now) == pytest.approx(500)
    clock.now += 20.0
    assert policy.service(state, clock.now) == pytest.approx(125)
    serve(policy, "p", 100, 0)  # new service adds to the decayed value
    assert policy.service(state, clock.now) == pytest.approx(225)
    # lasHalfLifeSeconds 0: lifetime totals.
    flat = ProgramAwareFairness(half_life_s=0, clock=clock)
    serve(flat, "p", 1000, 0)
    clock.now += 3600
    assert flat.service(flat.programs["p"], clock.now) == 1000


def test_a_program_back_from_idle_is_not_penalised() -> None:
    """A program that used a lot an hour ago (half-life 60 s) scores like a fresh one against a
    program that used a little just now."""
    clock = Clock()
    policy = ProgramAwareFairness(clock=clock)
    serve(policy, "old", 100_000, 0)
    clock.now += 3600
    serve(policy, "recent", 100, 0)
    assert policy.pick({"recent": (0.0,), "old": (0.0,)}, None) == "old"


def test_idle_programs_are_evicted_and_state_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    policy = ProgramAwareFairness(eviction_ttl_s=100.0, clock=clock)
    serve(policy, "idle", 10, 10)
    policy.program("never-completed")  # seen (queued) but never served
    busy = make_request(headers={FAIRNESS: "busy"})
    policy.pre_request(CycleState(), busy, SchedulingResult("default", {}))  # in flight
    clock.now += 50
    serve(policy, "recent", 10, 10)
    clock.now += 51
    assert policy.evict_idle() == 2
    assert set(policy.programs) == {"busy", "recent"}  # in flight / completed within the TTL
    # A stream that went away still ends its request: the program becomes evictable.
    policy.response_complete(busy, make_endpoint("a"))
    clock.now += 101
    assert policy.evict_idle() == 2 and not policy.programs
    # Ids made up per request cannot grow the state past the bound (least recently active go).
    monkeypatch.setattr(program_aware, "MAX_PROGRAMS", 50)
    for i in range(120):
        policy.program(f"p{i}")
    assert len(policy.programs) == 50 and "p119" in policy.programs and "p0" not in policy.programs


def test_a_huge_fairness_id_is_kept_by_its_hash_and_still_tells_programs_apart() -> None:
    """A client's header of tens of kB does not become a program key or a metric label whole."""
    policy = ProgramAwareFairness()
    long_a, long_b = "a" * 60_000, "a" * 59_999 + "b"
    serve(policy, long_a, 10, 10)
    serve(policy, long_b, 10, 10)
    serve(policy, long_a, 10, 10)
    assert len(policy.programs) == 2
    assert all(len(pid) <= 256 for pid in policy.programs)
    assert sorted(state.completions for state in policy.programs.values()) == [1, 2]
    serve(policy, "x" * 256, 1, 1)  # at the bound: kept as it is
    assert "x" * 256 in policy.programs


async def test_eviction_sweep_runs_as_a_background_service() -> None:
    policy = ProgramAwareFairness(eviction_ttl_s=0.05, eviction_sweep_s=0.02)
    serve(policy, "p", 1, 1)
    context = ServiceContext(lambda: [], lambda joined, left: None, lambda *a: None)  # type: ignore[arg-type]
    task = asyncio.create_task(policy.run(context))
    try:
        for _ in range(100):
            if not policy.programs:
                break
            await asyncio.sleep(0.01)
        assert not policy.programs
    finally:
        task.cancel()
    # evictionTtlSeconds 0: no sweep at all.
    never = ProgramAwareFairness(eviction_ttl_s=0)
    await asyncio.wait_for(never.run(context), 1.0)


def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("program_id", "")): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name.startswith("llm_d_epp_program_aware_")
    }


def test_metrics_follow_the_kept_state() -> None:
    clock = Clock()
    handle = PluginHandle(CollectorRegistry())
    policy = ProgramAwareFairness.from_params("paf", Params({"evictionTtlSeconds": 10}), handle)
    policy.clock = clock
    assert samples(handle.registry) == {("llm_d_epp_program_aware_jains_fairness_index", ""): 1.0}
    for program, wait in (("a", 10.0), ("b", 30.0)):
        state = policy.program(program)
        state.waits, state.mean_wait_ms = 1, wait
        serve(policy, program, 100, 50)
    got = samples(handle.registry)
    # Jain's index over (10, 30): 40^2 / (2 x 1000) = 0.8.
    assert got[("llm_d_epp_program_aware_jains_fairness_index", "")] == pytest.approx(0.8)
    assert got[("llm_d_epp_program_aware_avg_wait_time_milliseconds", "a")] == 10.0
    assert got[("llm_d_epp_program_aware_attained_service_tokens", "b")] == pytest.approx(200)
    clock.now += 11
    policy.evict_idle()
    assert samples(handle.registry) == {("llm_d_epp_program_aware_jains_fairness_index", ""): 1.0}


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"strategy": "wfq"}, "strategy"),
        ({"lasWeightService": -1}, "lasWeightService"),
        ({"lasWeightHeadWait": -0.1}, "lasWeightHeadWait"),
        ({"lasHalfLifeSeconds": -5}, "lasHalfLifeSeconds"),
        ({"evictionTtlSeconds": -1}, "evictionTtlSeconds"),
        ({"evictionSweepSeconds": 0}, "evictionSweepSeconds"),
        ({"lasDecayFactor": 0.9}, "lasHalfLifeSeconds"),
        ({"lasWeightService": "high"}, "lasWeightService"),
    ],
)
def test_bad_parameters_are_refused(params: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        ProgramAwareFairness.from_params("paf", Params(params), PluginHandle(CollectorRegistry()))


def test_defaults_are_upstreams() -> None:
    policy = ProgramAwareFairness.from_params("paf", Params({}), PluginHandle(CollectorRegistry()))
    assert (
        policy.weight_service,
        policy.weight_head_wait,
        policy.half_life_s,
        policy.eviction_ttl_s,
        policy.eviction_sweep_s,
    ) == (0.8, 0.2, 60.0, 3600.0, 300.0)
