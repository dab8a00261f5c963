"""Saturation detectors, flow-control policies and the probabilistic admitter, built from config
parameters as the loader builds them."""

from __future__ import annotations

import time

import pytest

from epp.framework import ConfigError, CycleState, FlowItem, Params, PluginHandle
from epp.framework.registry import installed_registry
from epp.scheduling.loader import load_config
from epp.testing import make_endpoint, make_request
from epp_scorers.admitters.probabilistic import ProbabilisticAdmitter
from epp_scorers.flow_policies.fairness import GlobalStrictFairnessPolicy, RoundRobinFairnessPolicy
from epp_scorers.flow_policies.ordering import EdfOrderingPolicy, FcfsOrderingPolicy
from epp_scorers.flow_policies.usage_limits import (
    PriorityHoldbackPolicy,
    SoftReflectiveCeilingPolicy,
    StaticUsageLimitPolicy,
)
from epp_scorers.saturation_detectors.concurrency import ConcurrencyDetector
from epp_scorers.saturation_detectors.utilization import UtilizationDetector


def fresh(**kw: float) -> object:
    return make_endpoint(updated_at=time.monotonic(), **kw)  # type: ignore[arg-type]


def test_utilization_is_the_mean_roofline_and_stale_counts_as_full() -> None:
    det = UtilizationDetector.from_params(
        "u", Params({"queueDepthThreshold": 4, "kvCacheUtilThreshold": 0.5}), PluginHandle()
    )
    a = fresh(waiting=2, kv=0.4)  # max(0.5, 0.8) = 0.8
    b = fresh(waiting=8, kv=0.1)  # max(2.0, 0.2) = 2.0
    assert det.saturation([a, b]) == pytest.approx(1.4)  # type: ignore[list-item]
    stale = make_endpoint(waiting=0, updated_at=time.monotonic() - 1.0)  # older than 200ms
    assert det.saturation([stale]) == 1.0
    assert det.saturation([]) == 1.0


@pytest.mark.parametrize("n", [6, 60])  # a loop, and numpy on the columns above 16 endpoints
def test_utilization_of_a_pool_is_each_endpoints_roofline_averaged_and_its_filter_keeps_the_fine_ones(
    n: int,
) -> None:
    """Over a pool in a datastore (its metric columns) with stale, never-scraped and busy
    endpoints: the saturation is the plain definition's, to the last bit, and the filter keeps
    exactly the fresh endpoints under both limits, in order."""
    import random

    from epp.datalayer.datastore import Datastore

    rng = random.Random(n)
    now = time.monotonic()
    pool = [
        make_endpoint(
            f"e{i}",
            waiting=rng.randrange(0, 9),
            kv=round(rng.random(), 3),
            updated_at=rng.choice([now, now, now - 5.0, 0.0]),
        )
        for i in range(n)
    ]
    store = Datastore()
    store.replace_all(pool)
    endpoints = store.endpoints()
    det = UtilizationDetector.from_params(
        "u", Params({"queueDepthThreshold": 4, "kvCacheUtilThreshold": 0.5}), PluginHandle()
    )
    cutoff = time.monotonic() - det.staleness_s
    expected = 0.0
    for ep in endpoints:
        m = ep.metrics
        stale = m.updated_at <= 0.0 or m.updated_at < cutoff
        expected += 1.0 if stale else max(m.waiting_queue_size / 4, m.kv_cache_usage / 0.5)
    assert det.saturation(endpoints) == expected / n
    kept = [
        ep.name
        for ep in endpoints
        if ep.metrics.updated_at > 0.0
        and ep.metrics.updated_at >= cutoff
        and ep.metrics.waiting_queue_size < det.queue_limit
        and ep.metrics.kv_cache_usage < det.kv_limit
    ]
    assert [ep.name for ep in det.filter(CycleState(), make_request(), endpoints)] == (
        kept or [ep.name for ep in endpoints]
    )


def test_utilization_staleness_is_a_go_duration() -> None:
    det = UtilizationDetector.from_params("u", Params({"metricsStalenessThreshold": "2s"}), PluginHandle())
    assert det.staleness_s == 2.0
    assert det.saturation([make_endpoint(updated_at=time.monotonic() - 1.0)]) == 0.0


@pytest.mark.parametrize(
    "params",
    [
        {"queueDepthThreshold": 0},
        {"kvCacheUtilThreshold": 1.5},
        {"metricsStalenessThreshold": "soon"},
        {"headroom": -1},
    ],
)
def test_utilization_bad_parameters_are_errors(params: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        UtilizationDetector.from_params("u", Params(params), PluginHandle())


def test_concurrency_counts_requests_or_tokens() -> None:
    det = ConcurrencyDetector.from_params("c", Params({"maxConcurrency": 4}), PluginHandle())
    eps = [make_endpoint("a", inflight_requests=4), make_endpoint("b", inflight_requests=2)]
    assert det.saturation(eps) == pytest.approx(0.75)
    tok = ConcurrencyDetector.from_params(
        "t", Params({"concurrencyMode": "tokens", "maxTokenConcurrency": 100}), PluginHandle()
    )
    assert tok.saturation([make_endpoint(inflight_tokens=150)]) == 1.5
    with pytest.raises(ConfigError):
        ConcurrencyDetector.from_params("c", Params({"concurrencyMode": "bytes"}), PluginHandle())
    with pytest.raises(ConfigError):
        ConcurrencyDetector.from_params("c", Params({"maxConcurrency": 0}), PluginHandle())


def item(seq: int, enqueued: float, deadline: float = float("inf")) -> FlowItem:
    return FlowItem(f"r{seq}", "f", 0, 1, enqueued, deadline, seq)


def test_orderings() -> None:
    early, late = item(1, 1.0, deadline=9.0), item(2, 2.0, deadline=5.0)
    assert FcfsOrderingPolicy().key(early) < FcfsOrderingPolicy().key(late)
    assert EdfOrderingPolicy().key(late) < EdfOrderingPolicy().key(early)
    assert EdfOrderingPolicy().key(item(3, 3.0)) > EdfOrderingPolicy().key(early)  # no TTL: last


def test_fairness_policies() -> None:
    heads = {"b": (2.0,), "a": (3.0,), "c": (1.0,)}
    assert GlobalStrictFairnessPolicy().pick(heads, None) == "c"
    rr = RoundRobinFairnessPolicy()
    assert [rr.pick(heads, last) for last in (None, "a", "b", "c", "aa")] == ["a", "b", "c", "a", "b"]


def test_probabilistic_admitter_sheds_only_sheddable_requests() -> None:
    eps = [fresh(waiting=5)]  # saturation 1.0: probability min(1 x 300, 1) = 1
    always = ProbabilisticAdmitter(rand=lambda: 0.999)
    request = make_request()
    assert always.admit(request, 0, eps) is None  # type: ignore[arg-type]
    assert always.admit(request, -1, eps) is not None  # type: ignore[arg-type]
    assert always.admit(request, -1, []) is None
    idle = [fresh(waiting=0, kv=0.0)]
    assert always.admit(request, -1, idle) is None  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        ProbabilisticAdmitter.from_params("p", Params({"power": 0}), PluginHandle())


def test_usage_limit_policies() -> None:
    assert list(StaticUsageLimitPolicy(threshold=0.8).ceilings(0.5, [10, 0])) == [0.8, 0.8]
    rank = PriorityHoldbackPolicy.from_params("h", Params({"minCeiling": 0.4}), PluginHandle())
    assert list(rank.ceilings(0.0, [100, 0, -10])) == pytest.approx([1.0, 0.7, 0.4])
    assert list(rank.ceilings(0.0, [5])) == [1.0]
    value = PriorityHoldbackPolicy(min_ceiling=0.5, max_ceiling=0.9, domain="value")
    assert list(value.ceilings(0.0, [100, 0, -100])) == pytest.approx([0.9, 0.7, 0.5])
    with pytest.raises(ConfigError, match="minCeiling' is required"):
        PriorityHoldbackPolicy.from_params("h", Params({}), PluginHandle())
    with pytest.raises(ConfigError):
        PriorityHoldbackPolicy(min_ceiling=0.9, max_ceiling=0.5)
    with pytest.raises(ConfigError):
        StaticUsageLimitPolicy(threshold=0.0)


def test_detectors_filter_endpoints_past_their_limits() -> None:
    conc = ConcurrencyDetector(max_concurrency=2, headroom=0.5)  # limit 3
    busy, free = make_endpoint("busy", inflight_requests=3), make_endpoint("free", inflight_requests=2)
    assert conc.filter(CycleState(), make_request(), [busy, free]) == [free]
    util = UtilizationDetector(queue_depth_threshold=4)
    full, ok = fresh(waiting=4), fresh(waiting=3)
    assert util.filter(CycleState(), make_request(), [full, ok]) == [ok]  # type: ignore[list-item]
    assert util.filter(CycleState(), make_request(), [full]) == [full]  # type: ignore[list-item]  # fail open


def test_soft_reflective_ceiling() -> None:
    policy = SoftReflectiveCeilingPolicy()
    prios = [100, 0, -10]
    # Light load: 1 - 0.2 x i / 2 is above 0.2 for every band: all open.
    assert list(policy.ceilings(0.2, prios)) == [1.0, 1.0, 1.0]
    # Saturation 0.75: the ceilings 0.625 (band 1) and 0.25 (band 2) are reached: both open
    # together on one call in round(0.75 / 0.25) = 3.
    calls = [list(policy.ceilings(0.75, prios)) for _ in range(4)]
    assert calls == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    # Saturation 0.4: band 1's ceiling 0.8 is open, band 2's 0.6 too.
    assert list(policy.ceilings(0.4, prios)) == [1.0, 1.0, 1.0]
    # Saturated: every band but the highest closed (the highest is gated by saturation >= 1).
    assert list(policy.ceilings(1.2, prios)) == [1.0, 0.0, 0.0]
    assert list(policy.ceilings(0.9, [5])) == [1.0]
    with pytest.raises(ConfigError):  # no parameters
        load_config(
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
            "- {type: soft-reflective-ceiling-policy, parameters: {threshold: 1}}\n- type: queue-scorer\n",
            installed_registry(),
        )
