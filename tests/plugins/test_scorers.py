"""Every in-tree scorer against the reference formulas: tables of cases with ties, empty candidate
lists and endpoints that were never scraped."""

from __future__ import annotations

import base64
import random
from dataclasses import replace
from typing import Any

import pytest

from epp.framework import (
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginHandle,
    ProfileResult,
    SchedulingResult,
)
from epp.testing import build, make_endpoint, make_request, score
from epp_scorers.data import PREFIX_MATCH, PrefixMatch
from epp_scorers.producers.approx_prefix import ApproxPrefixCacheProducer
from epp_scorers.producers.inflight import InFlightLoadProducer
from epp_scorers.scorers.active_request import ActiveRequestScorer
from epp_scorers.scorers.kv_cache import KvCacheUtilizationScorer
from epp_scorers.scorers.load_aware import LoadAwareScorer
from epp_scorers.scorers.lora_affinity import LoraAffinityScorer
from epp_scorers.scorers.no_hit_lru import NoHitLruScorer
from epp_scorers.scorers.prefix_cache import PrefixCacheScorer
from epp_scorers.scorers.queue import QueueScorer, RunningRequestsSizeScorer
from epp_scorers.scorers.session_affinity import SessionAffinityScorer
from epp_scorers.scorers.token_load import TokenLoadScorer

NEVER_SCRAPED = Endpoint("10.9.9.9", 8000, "never-scraped")


def eps(n: int, **per_field: list[Any]) -> list[Endpoint]:
    """n endpoints e0..e(n-1), field lists give each one's metrics."""
    return [make_endpoint(f"e{i}", **{k: v[i] for k, v in per_field.items()}) for i in range(n)]


def approx(values: list[float]) -> list[Any]:
    return [pytest.approx(v) for v in values]


def result_for(*endpoints: Endpoint, profile: str = "default", **others: Endpoint) -> SchedulingResult:
    profiles = {profile: ProfileResult(profile, list(endpoints))}
    profiles.update({name: ProfileResult(name, [ep]) for name, ep in others.items()})
    return SchedulingResult(profile, profiles)


# --- queue-scorer, running-requests-size-scorer ---------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], []),
        ([5], [1.0]),
        ([3, 3, 3], [1.0, 1.0, 1.0]),  # all equal: no preference
        ([0, 10, 5], [1.0, 0.0, 0.5]),
        ([2, 6], [1.0, 0.0]),
        ([7, 8, 9, 11], [1.0, 0.75, 0.5, 0.0]),
        ([0, 100, 25], [1.0, 0.0, 0.75]),  # queues too long for the lookup table: the formula
    ],
)
@pytest.mark.parametrize(
    ("scorer", "field"), [(QueueScorer(), "waiting"), (RunningRequestsSizeScorer(), "running")]
)
def test_min_max_queue_scorers(scorer: Any, field: str, values: list[int], expected: list[float]) -> None:
    assert score(scorer, eps(len(values), **{field: values})) == approx(expected)


def test_queue_scorers_count_a_never_scraped_endpoint_as_empty() -> None:
    busy = make_endpoint("busy", waiting=4, running=4)
    assert score(QueueScorer(), [NEVER_SCRAPED, busy]) == [1.0, 0.0]
    assert score(RunningRequestsSizeScorer(), [NEVER_SCRAPED, busy]) == [1.0, 0.0]


# --- kv-cache-utilization-scorer ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "expected"),
    [([], []), ([0.0, 0.25, 1.0], [1.0, 0.75, 0.0]), ([0.5, 0.5], [0.5, 0.5])],
)
def test_kv_cache_utilization(usage: list[float], expected: list[float]) -> None:
    assert score(KvCacheUtilizationScorer(), eps(len(usage), kv=usage)) == approx(expected)
    assert score(KvCacheUtilizationScorer(), [NEVER_SCRAPED]) == [1.0]


# --- load-aware-scorer ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("threshold", "queues", "expected"),
    [
        (None, [], []),
        (None, [0, 64, 128, 500], [0.5, 0.25, 0.0, 0.0]),
        (None, [1], [0.5 * (1 - 1 / 128)]),
        (10, [0, 5, 10, 11], [0.5, 0.25, 0.0, 0.0]),
        (0, [64], [0.25]),  # a threshold below 1 falls back to 128
    ],
)
def test_load_aware(threshold: int | None, queues: list[int], expected: list[float]) -> None:
    params = {} if threshold is None else {"threshold": threshold}
    assert score(build(LoadAwareScorer, params), eps(len(queues), waiting=queues)) == approx(expected)


# --- lora-affinity-scorer -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ({"loras": ["sql"], "max_loras": 1}, 1.0),  # active
        ({"loras": ["sql", "x"], "waiting_loras": ["y"], "max_loras": 2}, 1.0),  # active beats full
        ({"loras": ["x"], "max_loras": 2}, 0.8),  # room to load
        ({"loras": ["x"], "waiting_loras": ["sql"], "max_loras": 2}, 0.6),  # full, but waiting
        ({"loras": ["x"], "waiting_loras": ["y"], "max_loras": 2}, 0.0),  # full, not there
        ({}, 0.0),  # never scraped / no LoRA support (max_lora 0)
    ],
)
def test_lora_affinity(endpoint: dict[str, Any], expected: float) -> None:
    request = make_request(model="sql")
    assert score(LoraAffinityScorer(), [make_endpoint("e", **endpoint)], request) == [expected]


# --- active-request-scorer and the in-flight producer ----------------------------------------------


def charge(
    handle: PluginHandle,
    producer: InFlightLoadProducer,
    request: InferenceRequest,
    result: SchedulingResult,
    candidates: list[Endpoint],
) -> None:
    """Route `request` as the director does: charge the ledger with every profile's primary, then
    the producer's pre-request hook adds its token estimate to those charges."""
    cycle = CycleState()
    producer.produce(cycle, request, candidates)
    handle.ledger.charge(request, result.targets())
    producer.pre_request(cycle, request, result)


@pytest.mark.parametrize(
    ("params", "counts", "expected"),
    [
        ({}, [], []),
        ({}, [0, 0, 0], [1.0, 1.0, 1.0]),
        ({}, [0, 2, 4], [1.0, 0.5, 0.0]),
        ({}, [3, 3], [0.0, 0.0]),  # all busy and equal: (M - c) / M = 0
        ({"idleThreshold": 2}, [0, 2, 4], [1.0, 1.0, 0.0]),
        ({"maxBusyScore": 0.5}, [0, 2, 4], [1.0, 0.25, 0.0]),
        ({"idleThreshold": 1, "maxBusyScore": 0.5}, [1, 2, 8], [1.0, 0.375, 0.0]),
        ({"idleThreshold": -3}, [0, 4], [1.0, 0.0]),  # negative threshold falls back to 0
    ],
)
def test_active_request_formula(params: dict[str, Any], counts: list[int], expected: list[float]) -> None:
    # The counts are the in-flight ledger's, on each endpoint.
    endpoints = [make_endpoint(f"e{i}", inflight_requests=c) for i, c in enumerate(counts)]
    scorer = build(ActiveRequestScorer, params)
    assert score(scorer, endpoints) == approx(expected)


def test_in_flight_counts_follow_the_request_lifecycle() -> None:
    handle = PluginHandle()
    producer = build(InFlightLoadProducer, handle=handle)
    a, b = make_endpoint("a"), make_endpoint("b")
    requests = [make_request("x" * 400, request_id=str(i)) for i in range(3)]
    for req, target in zip(requests, [a, a, b], strict=True):
        charge(handle, producer, req, result_for(target), [a, b])
    assert (a.inflight_requests, b.inflight_requests) == (2, 1)
    assert (a.inflight_tokens, b.inflight_tokens) == (200, 100)  # 400 characters = 100 tokens
    scorer = ActiveRequestScorer()
    assert score(scorer, [a, b]) == [0.0, 0.5]
    handle.ledger.release(requests[0])
    handle.ledger.release(requests[0])  # twice: no double release
    assert (a.inflight_requests, b.inflight_requests) == (1, 1)
    assert (a.inflight_tokens, b.inflight_tokens) == (100, 100)
    # b leaves the pool (its counters leave with it); its request ending is harmless to the others.
    handle.ledger.release(requests[2])
    assert (a.inflight_requests, a.inflight_tokens) == (1, 100)
    assert (b.inflight_requests, b.inflight_tokens) == (0, 0)
    assert len(handle.ledger) == 1


def test_in_flight_charges_each_profile_primary() -> None:
    handle = PluginHandle()
    producer = build(InFlightLoadProducer, handle=handle)
    decode, prefill = make_endpoint("d"), make_endpoint("p")
    req = make_request("y" * 80)
    charge(handle, producer, req, result_for(decode, profile="decode", prefill=prefill), [decode, prefill])
    assert (decode.inflight_requests, prefill.inflight_requests) == (1, 1)
    assert (decode.inflight_tokens, prefill.inflight_tokens) == (20, 20)  # 80 characters = 20 tokens


def test_active_request_reads_the_ledgers_count_on_the_endpoint() -> None:
    endpoints = [make_endpoint("a", inflight_requests=4), make_endpoint("b", inflight_requests=0)]
    assert ActiveRequestScorer().score(CycleState(), make_request(), endpoints) == [0.0, 1.0]
    assert ActiveRequestScorer().consumes() == ()  # no producer's data: the count is on the endpoint


# --- token-load-scorer ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("threshold", "in_flight", "prompt_chars", "expected"),
    [
        (100, [], 0, []),
        (100, [0, 50, 100, 400], 0, [1.0, 0.5, 0.0, 0.0]),
        (100, [0, 50], 80, [0.8, 0.3]),  # the request's own 20 tokens count
        (0, [2_097_152], 0, [0.5]),  # threshold below 1: 4 Mi default
    ],
)
def test_token_load_formula(
    threshold: int, in_flight: list[int], prompt_chars: int, expected: list[float]
) -> None:
    endpoints = eps(len(in_flight), inflight_tokens=in_flight)
    request = make_request("z" * prompt_chars)
    cycle = CycleState()
    InFlightLoadProducer().produce(cycle, request, endpoints)
    scorer = build(TokenLoadScorer, {"queueThresholdTokens": threshold})
    assert scorer.score(cycle, request, endpoints) == approx(expected)
    assert score(scorer, endpoints, request) == approx(expected)  # with the default producer


def test_token_load_counts_only_the_uncached_part_of_the_prompt() -> None:
    # 4 blocks of 64 tokens hashed; the prompt is 300 tokens; a holds 2 blocks, b none.
    match = PrefixMatch({"a:8000": 2}, total_blocks=4, block_size_tokens=64)
    a, b = make_endpoint("a"), make_endpoint("b")
    assert match.uncached_tokens(a, 300) == (256 - 128) + 44
    assert match.uncached_tokens(b, 300) == 300
    assert match.uncached_tokens(a, 100) == 128  # estimate shorter than the hashed blocks: no tail
    producer = InFlightLoadProducer()
    request = make_request("q" * 1200)  # 300 tokens
    cycle = CycleState()
    cycle.write(PREFIX_MATCH, match)
    producer.produce(cycle, request, [a, b])
    scorer = TokenLoadScorer(queue_threshold_tokens=1000)
    assert scorer.score(cycle, request, [a, b]) == approx([1 - 172 / 1000, 1 - 300 / 1000])


@pytest.mark.parametrize("n", [5, 40])  # the list and the array paths
def test_token_load_gives_each_endpoint_the_formula_over_its_own_uncached_tokens(n: int) -> None:
    """A pool where a few endpoints hold part of the prompt and each has its own tokens in flight:
    every score is 1 - min(t, T) / T of that endpoint's own t, to the last bit."""
    rng = random.Random(n)
    endpoints = [make_endpoint(f"e{i}", inflight_tokens=rng.randrange(0, 900)) for i in range(n)]
    holders = rng.sample(endpoints, 3)
    match = PrefixMatch({ep.key: b for ep, b in zip(holders, (1, 3, 4), strict=True)}, 4, 64)
    request = make_request("q" * 1200)  # 300 tokens, 256 of them hashed
    cycle = CycleState()
    cycle.write(PREFIX_MATCH, match)
    InFlightLoadProducer().produce(cycle, request, endpoints)
    scores = list(TokenLoadScorer(queue_threshold_tokens=1000).score(cycle, request, endpoints))
    expected = []
    for ep in endpoints:
        t = float(ep.inflight_tokens + match.uncached_tokens(ep, 300))
        expected.append(1.0 if t <= 0 else 1.0 - min(t, 1000.0) / 1000.0)
    assert scores == expected


@pytest.mark.parametrize(
    ("params", "body", "expected"),
    [
        ({}, {}, 100),
        ({"addEstimatedOutputTokens": True}, {}, 250),  # + round(100 x 1.5)
        ({"addEstimatedOutputTokens": True, "outputRatio": 0.5}, {}, 150),
        ({"addEstimatedOutputTokens": True}, {"max_tokens": 10}, 110),
        ({"addEstimatedOutputTokens": True, "maxEstimatedOutputTokens": 20}, {}, 120),
    ],
)
def test_in_flight_token_estimate(params: dict[str, Any], body: dict[str, Any], expected: int) -> None:
    handle = PluginHandle()
    producer = build(InFlightLoadProducer, params, handle=handle)
    request = make_request("w" * 400, body=body)
    ep = make_endpoint("a")
    result = result_for(ep)
    handle.ledger.charge(request, result.targets())
    producer.pre_request(CycleState(), request, result)
    assert ep.inflight_tokens == expected


# --- session-affinity-scorer ----------------------------------------------------------------------


def token(name: str) -> str:
    return base64.b64encode(name.encode()).decode()


@pytest.mark.parametrize(
    ("params", "headers", "expected"),
    [
        ({}, {}, [0.0, 0.0, 0.0]),
        ({}, {"x-session-token": token("ns/b")}, [0.0, 1.0, 0.0]),
        ({}, {"x-session-token": token("ns/gone")}, [0.0, 0.0, 0.0]),
        ({}, {"x-session-token": "%%% not base64"}, [0.0, 0.0, 0.0]),
        ({}, {"x-session-token": token("b")}, [0.0, 0.0, 0.0]),  # the namespace is part of the name
        (
            {"encodedEndpointHeaderConfig": {"header": "X-Sticky"}},
            {"x-sticky": token("ns/c")},
            [0.0, 0.0, 1.0],
        ),
    ],
)
def test_session_affinity_token(
    params: dict[str, Any], headers: dict[str, str], expected: list[float]
) -> None:
    endpoints = [make_endpoint(n, namespace="ns") for n in "abc"]
    scorer = build(SessionAffinityScorer, params)
    assert score(scorer, endpoints, make_request(headers=headers)) == expected


def test_session_tokens_carry_over_from_the_go_epp_and_from_an_earlier_epp() -> None:
    """In Kubernetes an endpoint is `<namespace>/<pod>-rank-<port index>` to the Go EPP, and its
    tokens say so: epp writes the same and reads both that and its earlier `<namespace>/<pod>`."""
    ports = [
        Endpoint("10.0.0.1", p, f"pod-a:{p}", namespace="ns", go_id=f"ns/pod-a-rank-{i}")
        for i, p in enumerate((8000, 8001))
    ]
    scorer = SessionAffinityScorer()
    assert scorer.response_headers(make_request(), result_for(ports[1]), ports[1]) == {
        "x-session-token": token("ns/pod-a-rank-1")
    }
    assert score(scorer, ports, make_request(headers={"x-session-token": token("ns/pod-a-rank-1")})) == [
        0.0,
        1.0,
    ]
    assert score(scorer, ports, make_request(headers={"x-session-token": token("ns/pod-a:8000")})) == [
        1.0,
        0.0,
    ]


def test_session_affinity_writes_the_token_of_the_serving_endpoint() -> None:
    a, b = make_endpoint("a", namespace="ns"), make_endpoint("b")
    scorer = SessionAffinityScorer()
    assert scorer.response_headers(make_request(), result_for(a), a) == {"x-session-token": token("ns/a")}
    assert scorer.response_headers(make_request(), None, b) == {"x-session-token": token("b")}
    # P/D: an instance for the prefill profile names the prefill pod, in its own header.
    prefill = build(
        SessionAffinityScorer,
        {"profileName": "prefill", "encodedEndpointHeaderConfig": {"header": "x-pre"}},
    )
    result = result_for(a, profile="decode", prefill=b)
    assert prefill.response_headers(make_request(), result, a) == {"x-pre": token("b")}
    assert prefill.response_headers(make_request(), result_for(a), a) is None


def test_session_id_strategy_binds_sticks_moves_and_expires() -> None:
    now = [0.0]
    scorer = SessionAffinityScorer(strategy="session_id", eviction_ttl_seconds=60, clock=lambda: now[0])
    a, b, c = (make_endpoint(n) for n in "abc")
    request = make_request(headers={"x-session-id": "s1"})

    def route(candidates: list[Endpoint], picked: Endpoint) -> list[float]:
        cycle = CycleState()
        scores = scorer.score(cycle, request, candidates)
        scorer.pre_request(cycle, request, result_for(picked))
        return scores

    assert route([a, b, c], b) == [0.0, 0.0, 0.0]  # unbound: no preference; binds to b
    assert route([a, b, c], b) == [0.0, 1.0, 0.0]
    assert route([a, b, c], a) == [0.0, 1.0, 0.0]  # picked elsewhere while b was there: stays on b
    assert route([a, b, c], b) == [0.0, 1.0, 0.0]
    assert route([a, c], c) == [0.0, 0.0]  # b gone: the session moves to c
    assert route([a, b, c], c) == [0.0, 0.0, 1.0]
    now[0] = 61.0
    assert route([a, b, c], a) == [0.0, 0.0, 0.0]  # expired: rebinds to a
    assert route([a, b, c], a) == [1.0, 0.0, 0.0]
    assert scorer.response_headers(request, result_for(a), a) is None  # nothing sent back
    assert score(scorer, [a, b], make_request()) == [0.0, 0.0]  # no session id


def test_session_affinity_follows_the_pool_as_endpoints_are_renamed() -> None:
    """The scorer finds a token's or a binding's endpoint by name in the pool's tuple (kept per
    tuple): the datastore's tuple after a rename in place names the endpoint anew, for tokens
    and for bindings alike."""
    from epp.datalayer.datastore import Datastore
    from epp_scorers.scorers import session_affinity

    store = Datastore()

    def rename_second(name: str) -> None:  # the same address: updated in place, a new tuple
        store.replace_all(
            [
                Endpoint("10.0.0.1", 8000, "a", namespace="ns"),
                Endpoint("10.0.0.2", 8000, name, namespace="ns"),
            ]
        )

    def by_token(scorer: SessionAffinityScorer, name: str) -> list[float]:
        return score(scorer, store.endpoints(), make_request(headers={"x-session-token": token(name)}))

    rename_second("b")
    scorer = SessionAffinityScorer()
    assert [by_token(scorer, "ns/b"), by_token(scorer, "ns/b"), by_token(scorer, "ns/a")] == [
        [0.0, 1.0],
        [0.0, 1.0],
        [1.0, 0.0],
    ]
    rename_second("b2")
    assert [by_token(scorer, "ns/b"), by_token(scorer, "ns/b2")] == [[0.0, 0.0], [0.0, 1.0]]
    for name in ("c", "d", "e", "f", "g", "b2"):  # more tuples than it keeps maps for
        rename_second(name)
        assert by_token(scorer, f"ns/{name}") == [0.0, 1.0]
    assert len(scorer._names) <= session_affinity.NAME_MAPS_KEPT

    bound = SessionAffinityScorer(strategy="session_id")
    request = make_request(headers={"x-session-id": "s1"})
    cycle = CycleState()
    bound.score(cycle, request, store.endpoints())
    bound.pre_request(cycle, request, result_for(store.endpoints()[1]))  # bound to ns/b2
    assert score(bound, store.endpoints(), request) == [0.0, 1.0]
    rename_second("b3")
    cycle = CycleState()
    assert bound.score(cycle, request, store.endpoints()) == [0.0, 0.0]  # its endpoint is gone by name
    bound.pre_request(cycle, request, result_for(store.endpoints()[0]))  # so the session moves
    assert score(bound, store.endpoints(), request) == [1.0, 0.0]


def test_session_bindings_are_bounded_in_count_and_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Session ids are the clients' to choose: at most MAX_SESSIONS bindings (the least recently
    seen go first), an id past MAX_SESSION_ID_CHARS kept by its hash, and a sweep that stops at
    the first binding still in use."""
    from epp_scorers.scorers import session_affinity

    monkeypatch.setattr(session_affinity, "MAX_SESSIONS", 3)
    now = [0.0]
    scorer = SessionAffinityScorer(strategy="session_id", eviction_ttl_seconds=60, clock=lambda: now[0])
    a, b = make_endpoint("a"), make_endpoint("b")

    def route(session: str, picked: Endpoint) -> list[float]:
        request, cycle = make_request(headers={"x-session-id": session}), CycleState()
        scores = scorer.score(cycle, request, [a, b])
        scorer.pre_request(cycle, request, result_for(picked))
        return scores

    for session in ("s1", "s2", "s3"):
        route(session, a)
    route("s1", a)  # seen again: now the most recent
    route("s4", b)  # one too many: s2, the least recently seen, goes
    assert route("s1", b) == [1.0, 0.0] and route("s3", b) == [1.0, 0.0]
    assert route("s2", b) == [0.0, 0.0]  # forgotten (and bound again, to b)
    long_id = "x" * (session_affinity.MAX_SESSION_ID_CHARS + 1)
    route(long_id, b)
    assert route(long_id, a) == [0.0, 1.0]  # still its session
    assert all(len(sid) <= session_affinity.MAX_SESSION_ID_CHARS for sid in scorer._bindings)
    assert route(long_id[:-1] + "y", a) == [0.0, 0.0]  # another id of the same length: not bound
    now[0] = 61.0
    route("fresh", a)  # the sweep: every binding before this one has expired
    assert list(scorer._bindings) == ["fresh"]


# --- prefix-cache-scorer and approx-prefix-cache-producer -----------------------------------------


@pytest.mark.parametrize(
    ("params", "match", "expected"),
    [
        ({}, None, [0.0, 0.0, 0.0]),  # no producer ran
        ({}, PrefixMatch({}, 0, 64), [0.0, 0.0, 0.0]),  # prompt shorter than a block
        ({}, PrefixMatch({"a:8000": 2, "b:8000": 4}, 4, 64), [0.5, 1.0, 0.0]),
        # 0.5 x min(1, m x 64 / 256)^2 + 0.5 x m / 4
        (
            {"matchLengthWeight": 0.5, "matchLengthScaleTokens": 256},
            PrefixMatch({"a:8000": 2, "b:8000": 4}, 4, 64),
            [0.375, 1.0, 0.0],
        ),
        (
            {"matchLengthWeight": 1.0, "matchLengthScaleTokens": 1024},
            PrefixMatch({"a:8000": 8}, 16, 64),
            [0.25, 0, 0],
        ),
    ],
)
def test_prefix_cache_score(params: dict[str, Any], match: PrefixMatch | None, expected: list[float]) -> None:
    cycle = CycleState()
    if match is not None:
        cycle.write(PREFIX_MATCH, match)
    endpoints = [make_endpoint(n) for n in "abc"]
    scorer = build(PrefixCacheScorer, params)
    assert list(scorer.score(cycle, make_request(), endpoints)) == approx(expected)


@pytest.mark.parametrize(
    ("params", "reported", "block", "max_blocks"),
    [
        ({}, None, 64, 2048),  # default 16 tokens is raised to the 64-token minimum; 131072 / 64
        ({}, 16, 64, 2048),  # vLLM's 16-token blocks: also raised
        ({}, 128, 128, 1024),  # autoTune takes the server's block size
        ({"autoTune": False, "blockSizeTokens": 256}, 128, 256, 512),
        ({"maxPrefixTokensToMatch": 0, "maxPrefixBlocksToMatch": 10}, None, 64, 10),
        ({"maxPrefixTokensToMatch": 4096}, None, 64, 64),
        ({"maxPrefixTokensToMatch": 0, "maxPrefixBlocksToMatch": 0}, None, 64, 1 << 40),  # unlimited
    ],
)
def test_prefix_producer_block_size_and_cap(
    params: dict[str, Any], reported: int | None, block: int, max_blocks: int
) -> None:
    producer = build(ApproxPrefixCacheProducer, params)
    endpoints = [make_endpoint("a", block_size=reported)]
    assert producer.block_size(endpoints) == block
    assert producer.max_blocks_for(block) == max_blocks


def produce(producer: ApproxPrefixCacheProducer, prompt: str, endpoints: list[Endpoint]) -> CycleState:
    cycle = CycleState()
    producer.produce(cycle, make_request(prompt), endpoints)
    return cycle


def match_of(producer: ApproxPrefixCacheProducer, cycle: CycleState) -> PrefixMatch:
    """The prefix match the producer published in `cycle`."""
    match = cycle.read(producer.key)
    assert match is not None
    return match


def test_prefix_producer_learns_where_prompts_went_and_forgets_removed_endpoints() -> None:
    producer = ApproxPrefixCacheProducer()
    a, b = make_endpoint("a"), make_endpoint("b")
    system = "You are a helpful assistant. " * 40  # 1160 characters: 4 blocks of 256
    cycle = produce(producer, system + "first question", [a, b])
    first = match_of(producer, cycle)
    assert (first.total_blocks, first.block_size_tokens, dict(first.matched)) == (4, 64, {})
    producer.pre_request(cycle, make_request(), result_for(b))
    second = match_of(producer, produce(producer, system + "second question", [a, b]))
    assert dict(second.matched) == {b.key: 4}
    assert score(PrefixCacheScorer(), [a, b]) == [0.0, 0.0]  # a fresh producer knows nothing
    producer.endpoint_removed(b)
    assert dict(match_of(producer, produce(producer, system, [a, b])).matched) == {}


def test_a_late_hook_does_not_index_blocks_for_an_endpoint_that_left() -> None:
    """A fallback reported (or a pre-request run) after its endpoint left the pool: nothing would
    ever remove blocks indexed for it then, so none are; the same pod back (a new endpoint) is."""
    producer = ApproxPrefixCacheProducer()
    a, b = make_endpoint("a"), make_endpoint("b")
    prompt = "You are a helpful assistant. " * 40
    cycle = produce(producer, prompt, [a, b])
    request = make_request()
    producer.pre_request(cycle, request, result_for(a))
    producer.endpoint_removed(b)
    producer.served_elsewhere(request, a, b)  # Envoy: the fallback b served, after b left
    late = produce(producer, prompt, [a, b])
    producer.pre_request(late, make_request(), result_for(b))  # queued before b left
    assert b.key not in producer.index._ids
    assert dict(match_of(producer, produce(producer, prompt, [a, b])).matched) == {}
    back = make_endpoint("b")
    producer.pre_request(produce(producer, prompt, [a, back]), make_request(), result_for(back))
    assert dict(match_of(producer, produce(producer, prompt, [a, back])).matched) == {back.key: 4}


def test_prefix_producer_records_the_prefill_endpoint_too_and_respects_salt_and_model() -> None:
    producer = ApproxPrefixCacheProducer()
    decode, prefill = make_endpoint("d"), make_endpoint("p")
    prompt = "x" * 1024
    cycle = produce(producer, prompt, [decode, prefill])
    producer.pre_request(cycle, make_request(), result_for(decode, profile="decode", prefill=prefill))
    assert dict(match_of(producer, produce(producer, prompt, [decode, prefill])).matched) == {
        decode.key: 4,
        prefill.key: 4,
    }
    salted = CycleState()
    producer.produce(salted, make_request(prompt, body={"cache_salt": "tenant"}), [decode])
    assert dict(match_of(producer, salted).matched) == {}
    other_model = CycleState()
    producer.produce(other_model, make_request(prompt, model="other"), [decode])
    assert dict(match_of(producer, other_model).matched) == {}


def test_prefix_producer_records_every_profiles_pick_whatever_the_profiles_are_named() -> None:
    producer = ApproxPrefixCacheProducer()
    decode, prefill = make_endpoint("d"), make_endpoint("p")
    prompt = "z" * 1024
    cycle = produce(producer, prompt, [decode, prefill])
    producer.pre_request(cycle, make_request(), result_for(decode, profile="dec", pre=prefill))
    found = match_of(producer, produce(producer, prompt, [decode, prefill])).matched
    assert dict(found) == {decode.key: 4, prefill.key: 4}


def test_named_producer_writes_under_its_own_key() -> None:
    producer = build(ApproxPrefixCacheProducer, name="cpu")
    assert str(producer.key) == "prefix-cache-match/cpu"
    cycle = produce(producer, "y" * 600, [make_endpoint("a")])
    named = cycle.read(PREFIX_MATCH.for_producer("cpu"))
    assert named is not None and named.total_blocks == 2
    assert cycle.read(PREFIX_MATCH) is None


# --- no-hit-lru-scorer ------------------------------------------------------------------------------


def lru_round(
    scorer: NoHitLruScorer, endpoints: list[Endpoint], matched: dict[str, int], pick: int
) -> list[float]:
    cycle = CycleState()
    cycle.write(PREFIX_MATCH, PrefixMatch(matched, 4, 64))
    scores = scorer.score(cycle, make_request(), endpoints)
    scorer.pre_request(cycle, make_request(), result_for(endpoints[pick]))
    return scores


def test_no_hit_lru_spreads_cold_requests_and_is_neutral_on_warm_ones() -> None:
    scorer = NoHitLruScorer()
    a, b, c = (make_endpoint(n) for n in "abc")
    assert lru_round(scorer, [a, b, c], {}, pick=0) == [1.0, 0.5, 0.0]  # all unused: candidate order
    # a was used last: unused b, c first, then a at rank 2 + its LRU position 0.
    assert lru_round(scorer, [a, b, c], {}, pick=1) == [0.0, 1.0, 0.5]
    # LRU is now [a, b]: c unused (rank 0), a (1 + 0), b (1 + 1).
    assert lru_round(scorer, [a, b, c], {}, pick=2) == [0.5, 0.0, 1.0]
    # A warm request (someone holds a block): neutral, and the LRU does not move.
    assert lru_round(scorer, [a, b, c], {b.key: 1}, pick=1) == [0.5, 0.5, 0.5]
    assert list(scorer.lru) == [a.key, b.key, c.key]
    assert lru_round(scorer, [b], {}, pick=0) == [1.0]
    assert scorer.score(CycleState(), make_request(), []) == []
    scorer.endpoint_removed(a)
    assert a.key not in scorer.lru


def test_no_hit_lru_positions_count_the_whole_lru_and_its_size_is_bounded() -> None:
    scorer = build(NoHitLruScorer, {"lruSize": 2})
    a, b, c, d = (make_endpoint(n) for n in "abcd")
    for ep in (a, b, c):
        lru_round(scorer, [ep], {}, pick=0)
    assert list(scorer.lru) == [b.key, c.key]  # a fell out
    # candidates [c, d]: d unused (rank 0), c at 1 + position 1 = 2 -> clamped to 0.
    assert lru_round(scorer, [c, d], {}, pick=1) == [0.0, 1.0]


def test_prefix_index_capacity_follows_the_servers_kv_in_index_blocks() -> None:
    """A server with 64 blocks of 16 tokens holds 1,024 tokens: 16 index blocks of 64 tokens."""
    producer = ApproxPrefixCacheProducer()
    server = make_endpoint("s")
    server.metrics = replace(server.metrics, block_size=16, num_gpu_blocks=64)
    for i in range(3):  # 3 prompts of 8 blocks each: only the last 16 blocks fit
        prompt = f"{i}" * 2048
        cycle = produce(producer, prompt, [server])
        producer.pre_request(cycle, make_request(prompt), result_for(server))
    assert producer.index.entries() == 16
    assert dict(match_of(producer, produce(producer, "0" * 2048, [server])).matched) == {}
    assert dict(match_of(producer, produce(producer, "2" * 2048, [server])).matched) == {server.key: 8}
