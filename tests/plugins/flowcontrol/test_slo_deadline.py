"""slo-deadline-ordering-policy: a flow's queue served by arrival + x-llm-d-slo-ttft-ms, through
the real flow controller; the header's parsing as upstream reads it."""

from __future__ import annotations

import asyncio

import pytest

from epp.flowcontrol.config import BandConfig, FlowControlConfig
from epp.flowcontrol.controller import FlowController, Outcome
from epp.framework import FlowItem
from epp.testing import make_endpoint
from epp_scorers.flow_policies.fairness import GlobalStrictFairnessPolicy
from epp_scorers.flow_policies.slo_deadline import SloDeadlineOrderingPolicy, slo_ttft_s
from epp_scorers.saturation_detectors.concurrency import ConcurrencyDetector

SLO = "x-llm-d-slo-ttft-ms"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({SLO: "250"}, 0.25),
        ({SLO: " 1000 "}, 1.0),
        ({SLO: "0"}, 0.0),
        ({SLO: "+20"}, 0.02),
        ({"x-slo-ttft-ms": "40"}, 0.04),  # the deprecated alias
        ({SLO: "10", "x-slo-ttft-ms": "99"}, 0.01),  # the new name first
        ({SLO: "", "x-slo-ttft-ms": "99"}, None),  # present but empty: no SLO (as in Go)
        ({}, None),
        ({SLO: "-5"}, None),
        ({SLO: "1.5"}, None),
        ({SLO: "1_000"}, None),
        ({SLO: "soon"}, None),
        ({SLO: str(2**63)}, None),  # past what a Go duration holds
        ({SLO: "9" * 5000}, None),  # past what int() takes: invalid, not an error
    ],
)
def test_slo_header(headers: dict[str, str], expected: float | None) -> None:
    assert slo_ttft_s(headers) == expected


def test_key_orders_by_deadline_then_arrival() -> None:
    policy = SloDeadlineOrderingPolicy()

    def item(enqueued: float, seq: int, headers: dict[str, str]) -> FlowItem:
        return FlowItem("r", "f", 0, 1, enqueued, float("inf"), seq, headers)

    tight_late = item(10.0, 3, {SLO: "100"})  # deadline 10.1
    loose_early = item(9.0, 1, {SLO: "5000"})  # deadline 14.0
    none = item(1.0, 0, {})
    same_deadline = item(9.9, 2, {SLO: "200"})  # deadline 10.1 too, but arrived first
    ranked = sorted([none, loose_early, tight_late, same_deadline], key=policy.key)
    assert ranked == [same_deadline, tight_late, loose_early, none]


async def test_controller_serves_the_earliest_slo_deadline_first() -> None:
    """One flow, one busy slot: requests queue in the order none, loose, tight, tight-invalid; as
    slots free they go tight, loose, then the two without a valid SLO in arrival order."""
    endpoint = make_endpoint("a")
    band = BandConfig(0, 100, 10**9, SloDeadlineOrderingPolicy(), GlobalStrictFairnessPolicy())
    fc = FlowController(
        FlowControlConfig(ttl_s=30.0, no_endpoint_ttl_s=30.0, default_band=band),
        ConcurrencyDetector(max_concurrency=1),
        lambda: [endpoint],
    )
    endpoint.inflight_requests = 1
    order: list[str] = []

    async def submit(rid: str, headers: dict[str, str]) -> None:
        if await fc.enqueue_and_wait(rid, "f", 0, 10, headers) is Outcome.DISPATCHED:
            endpoint.inflight_requests += 1
            order.append(rid)

    tasks = []
    for rid, headers in (
        ("none", {}),
        ("loose", {SLO: "10000"}),
        ("tight", {SLO: "50"}),
        ("invalid", {SLO: "fast"}),
    ):
        tasks.append(asyncio.create_task(submit(rid, headers)))
        await asyncio.sleep(0.005)
    assert fc.queued == 4
    for n in range(1, 5):
        endpoint.inflight_requests -= 1
        fc.wake()
        for _ in range(200):
            if len(order) == n:
                break
            await asyncio.sleep(0.001)
    await asyncio.wait_for(asyncio.gather(*tasks), 2.0)
    assert order == ["tight", "loose", "none", "invalid"]
