"""Predicted-latency routing: the producer (its online model learning from measured responses),
latency-scorer, slo-headroom-tier-filter, latency-slo-admitter and prefix-cache-affinity-filter's
latencyPredictor TTFT source, on real endpoints and metrics objects."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Mapping

import numpy as np
import pytest

from epp.framework import (
    ConfigError,
    CycleState,
    Endpoint,
    InferenceRequest,
    ProfileResult,
    ResponseStats,
    SchedulingResult,
)
from epp.testing import build, load_scheduler, make_endpoint, make_request
from epp_scorers.admitters.latency_slo import LatencySloAdmitter
from epp_scorers.filters.prefix_affinity import PrefixCacheAffinityFilter
from epp_scorers.filters.slo_headroom_tier import SloHeadroomTierFilter
from epp_scorers.producers import predicted_latency
from epp_scorers.producers.approx_prefix import ApproxPrefixCacheProducer
from epp_scorers.producers.latency_model import OnlineLinearModel
from epp_scorers.producers.latency_sidecar import SidecarConfig, parse_coefficients
from epp_scorers.producers.predicted_latency import (
    LATENCY_PREDICTION,
    LatencyPredictions,
    PredictedLatencyProducer,
)
from epp_scorers.scorers.latency import LatencyScorer


# The relation the tests teach: TTFT grows with the queue and the batch, TPOT with the batch.
def TTFT_MS(ep: Endpoint) -> float:
    return 40.0 + 100.0 * ep.metrics.waiting_queue_size + 10.0 * ep.metrics.running_requests


def TPOT_MS(ep: Endpoint) -> float:
    return 5.0 + 2.0 * ep.metrics.running_requests


def stats(ttft_ms: float, tpot_ms: float, output_tokens: int = 11) -> ResponseStats:
    first = ttft_ms / 1000.0
    return ResponseStats(first, first + tpot_ms * (output_tokens - 1) / 1000.0, output_tokens, True)


def serve(
    producer: PredictedLatencyProducer,
    ep: Endpoint,
    request: InferenceRequest,
    ttft_ms: float,
    tpot_ms: float,
) -> None:
    """One request routed to `ep` and answered in `ttft_ms` / `tpot_ms`, through the hooks epp runs."""
    cycle = CycleState()
    producer.produce(cycle, request, [ep])
    result = SchedulingResult("default", {"default": ProfileResult("default", [ep], [ep])})
    producer.pre_request(cycle, request, result)
    producer.response_measured(request, ep, stats(ttft_ms, tpot_ms))
    producer.response_complete(request, ep)


def teach(producer: PredictedLatencyProducer, n: int = 80, seed: int = 1) -> None:
    rng = random.Random(seed)
    for i in range(n):
        ep = make_endpoint(
            f"t{i % 4}", waiting=rng.randrange(6), running=rng.randrange(8), kv=rng.random() * 0.5
        )
        serve(producer, ep, make_request("x" * 400, request_id=f"teach-{i}"), TTFT_MS(ep), TPOT_MS(ep))


def trained(**kwargs: object) -> PredictedLatencyProducer:
    producer = PredictedLatencyProducer(streaming_mode=True, **kwargs)  # type: ignore[arg-type]
    teach(producer)
    return producer


def predictions(
    producer: PredictedLatencyProducer, endpoints: list[Endpoint], headers: Mapping[str, str] | None = None
) -> tuple[CycleState, InferenceRequest, LatencyPredictions]:
    cycle, request = CycleState(), make_request("x" * 400, headers=headers)
    producer.produce(cycle, request, endpoints)
    published = cycle.read(LATENCY_PREDICTION)
    assert published is not None
    return cycle, request, published


# --- the model -----------------------------------------------------------------------------------


def test_the_online_model_learns_a_known_linear_relation() -> None:
    rng = np.random.default_rng(0)
    model = OnlineLinearModel(3, window=256, min_samples=32)
    truth = np.array([3.0, -2.0, 0.5])
    x = rng.uniform(0, 100, size=(40, 3))
    assert model.predict(x) is None  # nothing before the first fit
    for row in x:
        model.add(row, float(row @ truth + 7.0))
    fresh = rng.uniform(0, 100, size=(5, 3))
    predicted = model.predict(fresh)
    assert predicted is not None
    np.testing.assert_allclose(predicted, np.maximum(fresh @ truth + 7.0, 0.0), rtol=1e-3, atol=0.05)


def test_the_model_keeps_a_bounded_window_and_follows_a_change() -> None:
    model = OnlineLinearModel(1, window=64, min_samples=32, refit_every=8)
    for i in range(64):
        model.add(np.array([float(i % 10)]), 10.0 * (i % 10))
    for i in range(64):  # the pool got twice as slow
        model.add(np.array([float(i % 10)]), 20.0 * (i % 10))
    assert model.samples == 64 and model.seen == 128
    predicted = model.predict(np.array([[5.0]]))
    assert predicted is not None and predicted[0] == pytest.approx(100.0, rel=1e-3)


def test_the_model_never_predicts_faster_than_the_fastest_observation() -> None:
    model = OnlineLinearModel(1, window=64, min_samples=32)
    for i in range(40):
        model.add(np.array([float(i)]), 30.0 + 2.0 * i)
    predicted = model.predict(np.array([[-100.0], [10.0]]))  # far outside the data, and inside
    assert predicted is not None and predicted.tolist() == pytest.approx([30.0, 50.0])


def test_the_producer_learns_ttft_and_tpot_from_measured_responses() -> None:
    producer = PredictedLatencyProducer(streaming_mode=True)
    a, b = make_endpoint("a", waiting=0, running=1, kv=0.1), make_endpoint("b", waiting=4, running=6, kv=0.4)
    assert not predictions(producer, [a, b])[2].available  # no model yet: nothing published
    teach(producer)
    _, _, published = predictions(producer, [a, b])
    for ep in (a, b):
        p = published.get(ep)
        assert p is not None
        assert p.ttft_ms == pytest.approx(TTFT_MS(ep), abs=2.0)
        assert p.tpot_ms == pytest.approx(TPOT_MS(ep), abs=0.5)


def test_without_streaming_mode_ttft_is_the_whole_response_and_tpot_is_neutral() -> None:
    producer = PredictedLatencyProducer()
    rng = random.Random(2)
    for i in range(60):
        ep = make_endpoint("a", waiting=rng.randrange(5))
        serve(producer, ep, make_request("x" * 400, request_id=f"r{i}"), TTFT_MS(ep), 10.0)
    ep = make_endpoint("a", waiting=2)
    p = predictions(producer, [ep], {"x-llm-d-slo-tpot-ms": "1"})[2].get(ep)
    assert p is not None
    assert p.ttft_ms == pytest.approx(TTFT_MS(ep) + 10.0 * 10, abs=2.0)  # the e2e latency
    assert p.tpot_valid and p.tpot_headroom_ms == 0.0


def test_headroom_and_validity_follow_the_slo_headers() -> None:
    producer = trained()
    fast, slow = make_endpoint("fast", waiting=0, running=1), make_endpoint("slow", waiting=3, running=1)
    # TTFT about 50 and 350 ms, TPOT about 7 ms on both.
    _, _, published = predictions(
        producer, [fast, slow], {"x-slo-ttft-ms": "200", "x-llm-d-slo-tpot-ms": "20"}
    )
    p_fast, p_slow = published.get(fast), published.get(slow)
    assert p_fast is not None and p_slow is not None
    assert p_fast.valid and p_fast.ttft_headroom_ms == pytest.approx(150.0, abs=3.0)
    assert not p_slow.ttft_valid and p_slow.ttft_headroom_ms == pytest.approx(-150.0, abs=3.0)
    assert p_slow.tpot_valid and p_slow.tpot_headroom_ms == pytest.approx(13.0, abs=0.5)
    # No SLO (or a malformed one): headroom is minus the prediction.
    p = predictions(producer, [fast], {"x-llm-d-slo-ttft-ms": "soon"})[2].get(fast)
    assert p is not None and not p.ttft_valid and p.ttft_headroom_ms == pytest.approx(-p.ttft_ms)


def test_a_running_request_with_a_tighter_tpot_slo_tightens_the_endpoint_budget() -> None:
    producer = trained(slo_buffer_factor=1.0)
    ep = make_endpoint("a", running=1)
    strict = make_request("x" * 400, headers={"x-llm-d-slo-tpot-ms": "8"}, request_id="strict")
    cycle = CycleState()
    producer.produce(cycle, strict, [ep])
    producer.pre_request(cycle, strict, SchedulingResult("d", {"d": ProfileResult("d", [ep], [ep])}))
    p = predictions(producer, [ep], {"x-llm-d-slo-tpot-ms": "50"})[2].get(ep)
    assert p is not None and p.tpot_headroom_ms == pytest.approx(8.0 - p.tpot_ms)
    producer.response_complete(strict, ep)  # it finished: the budget is the request's own again
    p = predictions(producer, [ep], {"x-llm-d-slo-tpot-ms": "50"})[2].get(ep)
    assert p is not None and p.tpot_headroom_ms == pytest.approx(50.0 - p.tpot_ms)


def test_prefill_endpoints_have_a_neutral_tpot() -> None:
    producer = trained(endpoint_role_label="llm-d.ai/role")
    ep = make_endpoint("p", role="prefill", running=5)
    p = predictions(producer, [ep], {"x-llm-d-slo-tpot-ms": "1"})[2].get(ep)
    assert p is not None and p.tpot_valid and p.tpot_headroom_ms == 0.0


def test_producer_parameters_are_checked() -> None:
    producer = build(
        PredictedLatencyProducer, {"streamingMode": True, "sloBufferFactor": 0.9, "contextTTL": "5m"}
    )
    assert producer.streaming_mode and producer.slo_buffer_factor == 0.9
    with pytest.raises(ConfigError, match="sloBufferFactor must be > 0"):
        build(PredictedLatencyProducer, {"sloBufferFactor": 0})
    with pytest.raises(ConfigError, match="unknown parameter 'streamingmode'"):
        build(PredictedLatencyProducer, {"streamingmode": True})


def test_state_is_bounded_by_the_requests_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    producer = trained()
    assert not producer._pending and not producer._running_tpot_slo  # every response ended
    monkeypatch.setattr(predicted_latency, "_MAX_PENDING", 3)
    ep = make_endpoint("a", running=1)
    requests = []
    for i in range(5):  # routed, never answered
        request = make_request("x" * 400, headers={"x-llm-d-slo-tpot-ms": "50"}, request_id=f"open-{i}")
        requests.append(request)
        cycle = CycleState()
        producer.produce(cycle, request, [ep])
        producer.pre_request(cycle, request, SchedulingResult("d", {"d": ProfileResult("d", [ep], [ep])}))
    kept = [id(r) for r in requests[2:]]
    assert list(producer._pending) == kept
    assert list(producer._running_tpot_slo[ep.key]) == kept


def _route(producer: PredictedLatencyProducer, request: InferenceRequest, ep: Endpoint) -> None:
    cycle = CycleState()
    producer.produce(cycle, request, [ep])
    producer.pre_request(cycle, request, SchedulingResult("d", {"d": ProfileResult("d", [ep], [ep])}))


def test_two_requests_in_flight_under_one_request_id_keep_their_own_entries() -> None:
    """x-request-id is the client's: two requests in flight under one id, on two endpoints, each
    keep their running TPOT SLO until their own response ends, and none is left behind."""
    producer = trained()
    a, b = make_endpoint("a", running=1), make_endpoint("b", running=1)
    first, second = (
        make_request("x" * 400, headers={"x-llm-d-slo-tpot-ms": "8"}, request_id="same") for _ in range(2)
    )
    _route(producer, first, a)
    _route(producer, second, b)
    assert set(producer._running_tpot_slo) == {a.key, b.key}
    producer.response_complete(first, a)
    assert set(producer._running_tpot_slo) == {b.key}  # the second's, still running
    producer.response_complete(second, b)
    assert not producer._pending and not producer._running_tpot_slo


def test_a_fallback_serving_takes_the_requests_tpot_slo_with_it() -> None:
    """Envoy reports that a fallback served: the request's TPOT SLO constrains that endpoint's
    budget from then on, not the one it was planned for; it goes when the response ends."""
    producer = trained()
    planned, fallback = make_endpoint("a", running=1), make_endpoint("b", running=1)
    request = make_request("x" * 400, headers={"x-llm-d-slo-tpot-ms": "8"})
    _route(producer, request, planned)
    producer.served_elsewhere(request, planned, fallback)
    assert producer._running_tpot_slo == {fallback.key: {id(request): 8.0}}
    producer.response_complete(request, fallback)
    assert not producer._pending and not producer._running_tpot_slo


# --- latency-scorer ------------------------------------------------------------------------------


def test_the_scorer_prefers_the_endpoint_closest_to_the_slo_among_those_that_meet_it() -> None:
    producer = trained()
    a, b, c = (make_endpoint(n, waiting=w, running=1) for n, w in (("a", 0), ("b", 1), ("c", 4)))
    cycle, request, _ = predictions(
        producer, [a, b, c], {"x-llm-d-slo-ttft-ms": "300", "x-llm-d-slo-tpot-ms": "50"}
    )
    least = LatencyScorer().score(cycle, request, [a, b, c])
    assert least[1] > least[0] > 0.0 and least[2] == 0.0  # b is closest; c misses: 0
    most = LatencyScorer(strategy="most").score(cycle, request, [a, b, c])
    assert most[0] > most[1] and most[2] == 0.0


def test_without_an_slo_the_scorer_prefers_the_lowest_predicted_latency() -> None:
    producer = trained()
    a, b, c = (
        make_endpoint(n, waiting=w, running=1, inflight_requests=1) for n, w in (("a", 2), ("b", 0), ("c", 5))
    )
    cycle, request, _ = predictions(producer, [a, b, c])
    scores = LatencyScorer(strategy="most").score(cycle, request, [a, b, c])  # negative: always least
    assert scores[1] == max(scores) and scores[2] == min(scores)


def test_when_all_miss_idle_endpoints_win_then_the_mildest_deficit() -> None:
    producer = trained()
    busy_fast = make_endpoint("busy-fast", waiting=1, running=1, inflight_requests=3)
    idle_slow = make_endpoint("idle-slow", waiting=5, running=1, inflight_requests=0)
    cycle, request, _ = predictions(producer, [busy_fast, idle_slow], {"x-llm-d-slo-ttft-ms": "10"})
    assert LatencyScorer().score(cycle, request, [busy_fast, idle_slow])[0] == 0.0
    # Nobody idle: TPOT-only misses beat TTFT misses.
    tpot_miss = make_endpoint("tpot-miss", waiting=0, running=7, inflight_requests=1)
    ttft_miss = make_endpoint("ttft-miss", waiting=3, running=0, inflight_requests=1)
    cycle, request, _ = predictions(
        producer, [tpot_miss, ttft_miss], {"x-llm-d-slo-ttft-ms": "200", "x-llm-d-slo-tpot-ms": "10"}
    )
    scores = LatencyScorer().score(cycle, request, [tpot_miss, ttft_miss])
    assert scores[0] > 0.0 and scores[1] == 0.0


@pytest.mark.parametrize(
    ("headers", "busiest"),
    [
        ({"x-llm-d-slo-ttft-ms": "300", "x-llm-d-slo-tpot-ms": "50"}, 0),  # some meet it
        ({}, 0),  # no SLO: every headroom negative
        ({"x-llm-d-slo-ttft-ms": "10"}, 0),  # all miss: the idle ones first
        ({"x-llm-d-slo-ttft-ms": "200", "x-llm-d-slo-tpot-ms": "10"}, 1),  # none idle: TPOT-only misses
        ({"x-llm-d-slo-ttft-ms": "1", "x-llm-d-slo-tpot-ms": "1000"}, 1),  # none idle: TTFT-only misses
        ({"x-llm-d-slo-ttft-ms": "200", "x-llm-d-slo-tpot-ms": "10"}, -1),  # TPOT-only and TTFT-only
    ],
)
@pytest.mark.parametrize("strategy", ["least", "most"])
def test_the_scorer_gives_a_large_pool_the_same_scores_as_endpoint_by_endpoint(
    headers: dict[str, str], busiest: int, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above 16 candidates the scorer works on the prediction table's columns: every score is
    the one the loop gives, to the last bit, in every bucket; endpoints the producer never saw
    score 0 either way."""
    from epp_scorers.scorers import latency

    producer = trained()
    rng = random.Random(len(headers))
    pool = [
        make_endpoint(
            f"e{i}",
            waiting=rng.randrange(6),
            running=rng.randrange(8),
            inflight_requests=rng.randrange(max(busiest, 0), 3),
        )
        for i in range(40)
    ]
    if busiest < 0:  # half fast to first token but slow per token, half the other way round; none idle
        pool = [
            make_endpoint(f"e{i}", waiting=0, running=rng.randrange(6, 8), inflight_requests=1)
            if i % 2
            else make_endpoint(
                f"e{i}", waiting=rng.randrange(3, 6), running=rng.randrange(2), inflight_requests=1
            )
            for i in range(40)
        ]
    cycle, request, _ = predictions(producer, pool[:36], headers)  # four were not candidates then
    scorer = LatencyScorer(strategy=strategy)
    arrays = list(scorer.score(cycle, request, pool))
    monkeypatch.setattr(latency, "SMALL_POOL_SIZE", 1000)  # the loop
    loop = scorer.score(cycle, request, pool)
    assert isinstance(loop, list) and arrays == loop
    assert arrays[36:] == [0.0] * 4 and max(arrays) > 0.0


def test_without_predictions_the_scorer_falls_back_to_kv_queue_and_prefix() -> None:
    producer = PredictedLatencyProducer()  # untrained
    a, b = make_endpoint("a", waiting=4, kv=0.5), make_endpoint("b", waiting=0, kv=0.1)
    cycle, request, _ = predictions(producer, [a, b])
    # (free kv + relative queue + prefix 0) / 3
    assert LatencyScorer().score(cycle, request, [a, b]) == [pytest.approx(0.17), pytest.approx(0.63)]


# --- slo-headroom-tier-filter --------------------------------------------------------------------


def test_the_tier_filter_keeps_endpoints_within_the_slo_and_explores_the_others() -> None:
    producer = trained()
    a, b, c = (make_endpoint(n, waiting=w, running=1) for n, w in (("a", 0), ("b", 1), ("c", 4)))
    cycle, request, _ = predictions(
        producer, [a, b, c], {"x-llm-d-slo-ttft-ms": "300", "x-llm-d-slo-tpot-ms": "50"}
    )
    # Without exploration the tiers are exact; by default (upstream's epsilonExploreNeg 0.01) a
    # request goes to the negative tier about once in a hundred.
    exact = SloHeadroomTierFilter(epsilon_explore_neg=0.0)
    assert list(exact.filter(cycle, request, [a, b, c])) == [a, b]
    default = SloHeadroomTierFilter(rng=random.Random(1))
    explored = sum(list(default.filter(cycle, request, [a, b, c])) == [c] for _ in range(2000))
    assert default.epsilon == 0.01 and 5 <= explored <= 60, explored  # 2,000 draws at 1 %: about 20
    explore = SloHeadroomTierFilter(epsilon_explore_neg=1.0, rng=random.Random(0))
    assert list(explore.filter(cycle, request, [a, b, c])) == [c]
    cycle, request, _ = predictions(producer, [a, b, c])  # no SLO: all negative, all kept
    assert list(exact.filter(cycle, request, [a, b, c])) == [a, b, c]
    cycle, request, _ = predictions(
        PredictedLatencyProducer(), [a, b, c], {"x-llm-d-slo-ttft-ms": "300", "x-llm-d-slo-tpot-ms": "50"}
    )
    assert list(exact.filter(cycle, request, [a, b, c])) == [a, b, c]  # no model
    with pytest.raises(ConfigError, match="epsilonExploreNeg"):
        build(SloHeadroomTierFilter, {"epsilonExploreNeg": 1.5})


# --- latency-slo-admitter ------------------------------------------------------------------------


def test_the_admitter_refuses_a_sheddable_request_no_endpoint_can_serve_in_time() -> None:
    producer, admitter = trained(), LatencySloAdmitter()
    loaded = [make_endpoint(n, waiting=4, running=3, kv=0.5) for n in ("a", "b")]  # about 470 ms
    slo = {"x-llm-d-slo-ttft-ms": "200", "x-llm-d-slo-tpot-ms": "50"}
    cycle, request, _ = predictions(producer, loaded, slo)
    reason = admitter.admit_with_data(cycle, request, -1, loaded)
    assert reason is not None and "latency SLO" in reason
    assert admitter.admit_with_data(cycle, request, 0, loaded) is None  # not sheddable
    cycle, request, _ = predictions(producer, loaded)
    assert admitter.admit_with_data(cycle, request, -1, loaded) is None  # no SLO to judge by
    # One endpoint within the SLO, one idle, or one cold: admitted.
    for extra in (
        make_endpoint("fast", waiting=0, running=1, kv=0.5),
        make_endpoint("idle", waiting=4, running=0, kv=0.5),
        make_endpoint("cold", waiting=4, running=3, kv=0.01),
    ):
        cycle, request, _ = predictions(producer, [*loaded, extra], slo)
        assert admitter.admit_with_data(cycle, request, -1, [*loaded, extra]) is None, extra.name
    # No model yet: fail open.
    cycle, request, _ = predictions(PredictedLatencyProducer(), loaded, slo)
    assert admitter.admit_with_data(cycle, request, -1, loaded) is None


# --- prefix-cache-affinity-filter with ttftSource latencyPredictor -------------------------------


def test_prefix_affinity_breaks_stickiness_when_the_predicted_ttft_penalty_is_too_high() -> None:
    producer = trained()
    prefix = ApproxPrefixCacheProducer()
    sticky = make_endpoint("sticky", waiting=5, running=1)  # about 550 ms
    other = make_endpoint("other", waiting=0, running=1)  # about 50 ms
    request = make_request("a shared system prompt " * 40)
    cycle = CycleState()
    prefix.produce(cycle, request, [sticky, other])
    prefix.pre_request(cycle, request, SchedulingResult("d", {"d": ProfileResult("d", [sticky], [sticky])}))
    for penalty, kept in ((1000.0, [sticky]), (200.0, [sticky, other])):
        flt = build(
            PrefixCacheAffinityFilter,
            {"ttftSource": "latencyPredictor", "maxTTFTPenaltyMs": penalty, "affinityThreshold": 0.8},
        )
        cycle = CycleState()
        prefix.produce(cycle, request, [sticky, other])
        producer.produce(cycle, request, [sticky, other])
        assert list(flt.filter(cycle, request, [sticky, other])) == kept, penalty
    assert LATENCY_PREDICTION in flt.consumes()


# --- configs -------------------------------------------------------------------------------------

GUIDE = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
- type: predicted-latency-producer
  parameters: {streamingMode: true}
- type: prefix-cache-affinity-filter
  name: loose
  parameters: {ttftSource: latencyPredictor, maxTTFTPenaltyMs: 5000}
- type: slo-headroom-tier-filter
  parameters: {epsilonExploreNeg: 0}  # no exploration: the picks below must be the prediction's
- type: latency-scorer
- type: latency-slo-admitter
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: loose
  - pluginRef: slo-headroom-tier-filter
  - pluginRef: latency-scorer
  - pluginRef: max-score-picker
"""


@pytest.mark.parametrize("consumer", ["latency-scorer", "slo-headroom-tier-filter"])
def test_a_config_without_the_producer_gets_it_added_with_its_own_inputs(consumer: str) -> None:
    """The added producer gets what a declared one gets: the in-flight and prefix producers whose
    features it reads (else it would learn from scraped counts and no prefix share, silently)."""
    config = (
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
        f"plugins:\n{{declared}}- type: {consumer}\n- type: max-score-picker\n"
        "schedulingProfiles:\n- name: default\n"
        f"  plugins: [{{{{pluginRef: {consumer}}}}}, {{{{pluginRef: max-score-picker}}}}]\n"
    )
    added = load_scheduler(config.format(declared=""))
    declared = load_scheduler(config.format(declared="- type: predicted-latency-producer\n"))
    assert any(isinstance(p, PredictedLatencyProducer) for p in added.producers)
    kinds = sorted(type(p).__name__ for p in added.producers)
    assert kinds == sorted(type(p).__name__ for p in declared.producers)
    assert len(kinds) >= 3, kinds


def test_the_scheduler_routes_by_prediction_once_trained() -> None:
    scheduler = load_scheduler(GUIDE)
    producer = next(p for p in scheduler.producers if isinstance(p, PredictedLatencyProducer))
    teach(producer)
    quick, queued = (
        make_endpoint("quick", waiting=0, running=2),
        make_endpoint("queued", waiting=3, running=2),
    )
    picks = set()
    for i in range(10):
        request = make_request(
            f"prompt {i} " * 30,
            headers={"x-llm-d-slo-ttft-ms": "250", "x-llm-d-slo-tpot-ms": "50"},
            request_id=f"q{i}",
        )
        cycle = CycleState()
        result = scheduler.schedule(cycle, request, [quick, queued])
        picks.add(result.primary.endpoints[0].name)
    assert picks == {"quick"}


# --- upstream's training server ------------------------------------------------------------------

METRICS_PAGE = """\
# HELP ttft_intercept TTFT model intercept
ttft_intercept 12.5
ttft_coef{feature="num_request_waiting"} 100.0
ttft_coef{feature="input_token_length"} 0.5
ttft_coef{feature="encoder_input_size"} 9.0
tpot_intercept 3.0
tpot_coef{feature="num_request_running"} 2.0
training_samples_count{model="ttft",bucket="0"} 10
"""


class TrainingServer:
    """A stand-in for llm-d-latency-predictor's training server on a loopback port: it answers
    /metrics with `page` and records what /add_training_data_bulk receives."""

    def __init__(self, page: str) -> None:
        self.page = page
        self.entries: list[dict[str, object]] = []
        self.url = ""

    async def __aenter__(self) -> TrainingServer:
        from aiohttp import web

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(text=self.page)

        async def add(request: web.Request) -> web.Response:
            self.entries.extend((await request.json())["entries"])
            return web.json_response({"message": "ok"}, status=202)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_post("/add_training_data_bulk", add)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


def test_the_sidecar_is_configured_from_the_go_environment_variables() -> None:
    assert SidecarConfig.from_env({}) is None  # no training server: the in-process model alone
    config = SidecarConfig.from_env(
        {
            "TRAINING_SERVER_URL": "http://localhost:8000/",
            "PREDICTION_SERVER_URL": "http://localhost:8001, http://localhost:8002",
            "LATENCY_FLUSH_INTERVAL_SEC": "2",
            "LATENCY_HTTP_TIMEOUT_SEC": "bad",
        }
    )
    assert config == SidecarConfig(
        "http://localhost:8000", ("http://localhost:8001", "http://localhost:8002"), flush_interval_s=2.0
    )
    assert parse_coefficients("ttft_intercept 1\n") is None  # an XGBoost server publishes no tpot model


async def test_observations_go_to_the_training_server_and_its_linear_model_is_used() -> None:
    async with TrainingServer(METRICS_PAGE) as server:
        config = SidecarConfig(server.url, flush_interval_s=0.02, http_timeout_s=2.0, metrics_interval_s=60.0)
        producer = PredictedLatencyProducer(streaming_mode=True, sidecar=config)
        ep = make_endpoint("a", waiting=2, running=3, kv=0.25)
        request = make_request("y" * 80)  # 20 tokens
        task = asyncio.get_running_loop().create_task(producer.run(None))  # type: ignore[arg-type]
        try:
            for _ in range(200):
                if producer.sidecar is not None and producer.sidecar.models() is not None:
                    break
                await asyncio.sleep(0.01)
            p = predictions(producer, [ep], {"x-llm-d-slo-ttft-ms": "500"})[2].get(ep)
            assert p is not None  # the server's model, though epp's own has seen nothing
            assert p.ttft_ms == pytest.approx(12.5 + 100.0 * 2 + 0.5 * 100)  # "x" * 400: 100 tokens
            assert p.tpot_ms == pytest.approx(3.0 + 2.0 * 3)
            serve(producer, ep, request, 120.0, 8.0)
            for _ in range(200):
                if server.entries:
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    [entry] = server.entries
    assert entry["actual_ttft_ms"] == pytest.approx(120.0) and entry["actual_tpot_ms"] == pytest.approx(8.0)
    assert entry["input_token_length"] == 20 and entry["num_request_waiting"] == 2
    assert entry["num_request_running"] == 3 and entry["kv_cache_percentage"] == 0.25


async def test_an_unreachable_training_server_leaves_the_in_process_model_in_charge() -> None:
    config = SidecarConfig("http://127.0.0.1:9", flush_interval_s=0.01, http_timeout_s=0.5)
    producer = PredictedLatencyProducer(streaming_mode=True, sidecar=config)
    task = asyncio.get_running_loop().create_task(producer.run(None))  # type: ignore[arg-type]
    try:
        teach(producer)
        await asyncio.sleep(0.05)  # a few failed calls
        ep = make_endpoint("a", waiting=1, running=1)
        p = predictions(producer, [ep])[2].get(ep)
        assert p is not None and p.ttft_ms == pytest.approx(TTFT_MS(ep), abs=2.0)
        assert not task.done()  # failures are logged and retried, not raised
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_the_predicted_latency_histograms_cap_the_model_labels_they_take_from_requests() -> None:
    """The model and target names are the client's: past MAX_MODEL_LABEL_SETS sets, or longer
    than MAX_MODEL_LABEL_CHARS, they are reported as other (a set admitted before keeps its own)."""
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    labels, old = (
        ("plugin_name", "plugin_type", "model_name", "target_model_name"),
        ("model_name", "target_model_name"),
    )
    histograms = predicted_latency.PredictionHistograms(
        Histogram("ttft", "", labels, registry=registry),
        Histogram("tpot", "", labels, registry=registry),
        Histogram("old_ttft", "", old, registry=registry),
        Histogram("old_tpot", "", old, registry=registry),
    )
    plugin = predicted_latency.PredictedLatencyProducer("plp")
    prediction = predicted_latency.LatencyPrediction(100.0, 10.0, True, True, 0.0, 0.0, 0)

    def observe(model: str) -> None:
        histograms.observe(plugin, make_request(model=model), prediction, tpot=True)

    observe("first")
    observe("m" * (predicted_latency.MAX_MODEL_LABEL_CHARS + 1))
    for i in range(predicted_latency.MAX_MODEL_LABEL_SETS + 5):
        observe(f"model-{i}")
    observe("first")

    def count(name: str, model: str) -> float | None:
        return registry.get_sample_value(f"{name}_count", {"model_name": model, "target_model_name": model})

    assert count("old_ttft", "first") == 2 and count("old_tpot", "first") == 2
    # the long name, and the sets past the cap (1,000 minus "first" and "other" taken before)
    assert count("old_ttft", "other") == 1 + 7
    models = {s.labels["model_name"] for f in registry.collect() if f.name == "ttft" for s in f.samples}
    assert len(models) == predicted_latency.MAX_MODEL_LABEL_SETS and "model-999" not in models
