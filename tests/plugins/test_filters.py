"""Filters: role filters, Kubernetes label selectors, and the prefix-cache affinity gate."""

from __future__ import annotations

import random
from typing import Any

import pytest

from epp.framework import ConfigError, CycleState, Endpoint
from epp.testing import build, make_endpoint, make_request
from epp_scorers.data import INFLIGHT_LOAD, PREFIX_MATCH, PrefixMatch
from epp_scorers.filters.labels import ByLabel, LabelSelectorFilter
from epp_scorers.filters.prefix_affinity import PrefixCacheAffinityFilter
from epp_scorers.filters.roles import DecodeFilter, EncodeFilter, PrefillFilter
from epp_scorers.producers.inflight import InFlightLoadProducer

ROLES = [
    None,
    "decode",
    "prefill",
    "prefill-decode",
    "both",
    "encode",
    "encode-prefill",
    "encode-prefill-decode",
]


def kept(flt: Any, endpoints: list[Any], cycle: CycleState | None = None) -> list[str]:
    return [ep.name for ep in flt.filter(cycle or CycleState(), make_request(), endpoints)]


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (DecodeFilter(), ["none", "decode", "prefill-decode", "both", "encode-prefill-decode"]),
        (PrefillFilter(), ["prefill", "prefill-decode", "both", "encode-prefill", "encode-prefill-decode"]),
        (EncodeFilter(), ["encode", "encode-prefill", "encode-prefill-decode"]),
    ],
)
def test_role_filters(flt: Any, expected: list[str]) -> None:
    endpoints = [make_endpoint(role or "none", role=role) for role in ROLES]
    assert kept(flt, endpoints) == expected
    assert kept(flt, []) == []


@pytest.mark.parametrize("flt", [DecodeFilter(), ByLabel(label="llm-d.ai/role", valid_values=["decode"])])
def test_a_label_filter_gives_the_same_tuple_its_last_result_until_the_datastore_relabels(flt: Any) -> None:
    """The director hands every request the datastore's tuple: the filter keeps its result for
    that tuple (the same object, so scorers' lookups are kept too) and the datastore makes a new
    tuple when a label changes. A pool it does not narrow comes back as it is."""
    from epp.datalayer.datastore import Datastore

    store = Datastore()
    store.replace_all([Endpoint(f"10.0.0.{i}", 8000, f"p{i}", {"llm-d.ai/role": "decode"}) for i in range(3)])
    assert flt.filter(CycleState(), make_request(), store.endpoints()) is store.endpoints()
    relabelled = [
        Endpoint(f"10.0.0.{i}", 8000, f"p{i}", {"llm-d.ai/role": "prefill" if i else "decode"})
        for i in range(3)
    ]
    store.replace_all(relabelled)
    first = flt.filter(CycleState(), make_request(), store.endpoints())
    assert [ep.name for ep in first] == ["p0"] and isinstance(first, tuple)
    assert flt.filter(CycleState(), make_request(), store.endpoints()) is first
    assert [ep.name for ep in flt.filter(CycleState(), make_request(), list(store.endpoints()))] == ["p0"]
    store.replace_all([Endpoint(f"10.0.0.{i}", 8000, f"p{i}", {"llm-d.ai/role": "decode"}) for i in range(3)])
    assert [ep.name for ep in flt.filter(CycleState(), make_request(), store.endpoints())] == [
        "p0",
        "p1",
        "p2",
    ]


def test_role_filter_names() -> None:
    assert (DecodeFilter().name, DecodeFilter("d").name) == ("decode-filter", "d")
    assert (build(DecodeFilter).name, build(DecodeFilter, name="d").name) == ("decode-filter", "d")


LABELS = {
    "a": {"tier": "gold", "zone": "z1"},
    "b": {"tier": "silver", "zone": "z2"},
    "c": {"zone": "z1"},
    "d": {},
}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({}, ["a", "b", "c", "d"]),  # empty selector keeps everything
        ({"matchLabels": {"tier": "gold"}}, ["a"]),
        ({"matchLabels": {"tier": "gold", "zone": "z2"}}, []),  # AND
        ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["gold", "silver"]}]}, ["a", "b"]),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["gold"]}]}, ["b", "c", "d"]),
        ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, ["a", "b"]),
        ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, ["c", "d"]),
        (
            {
                "matchLabels": {"zone": "z1"},
                "matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}],
            },
            ["c"],
        ),
    ],
)
def test_label_selector(selector: dict[str, Any], expected: list[str]) -> None:
    endpoints = [make_endpoint(name, labels=labels) for name, labels in LABELS.items()]
    assert kept(build(LabelSelectorFilter, selector), endpoints) == expected


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ({"matchExpressions": [{"key": "t", "operator": "In"}]}, "needs at least one value"),
        ({"matchExpressions": [{"key": "t", "operator": "Exists", "values": ["x"]}]}, "takes no values"),
        (
            {"matchExpressions": [{"key": "t", "operator": "Equals", "values": ["x"]}]},
            "'operator' must be one of",
        ),
        ({"matchExpressions": [{"operator": "Exists"}]}, "'key' must be a non-empty string"),
        ({"matchExpressions": [{"key": "t", "operator": "Exists", "value": 1}]}, "unknown field 'value'"),
        ({"matchExpressions": ["t=x"]}, "must be a mapping"),
        ({"matchLabels": {"t": True}}, "value must be a string"),
        ({"matchLabels": ["t"]}, "must be a mapping"),
    ],
)
def test_label_selector_errors(selector: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(LabelSelectorFilter, selector)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"label": "tier", "validValues": ["gold"]}, ["a"]),
        ({"label": "tier", "validValues": ["gold"], "allowsNoLabel": True}, ["a", "c", "d"]),
        ({"label": "tier", "allowsNoLabel": True}, ["c", "d"]),
    ],
)
def test_by_label(params: dict[str, Any], expected: list[str]) -> None:
    endpoints = [make_endpoint(name, labels=labels) for name, labels in LABELS.items()]
    assert kept(build(ByLabel, params), endpoints) == expected


def test_by_label_needs_a_label_and_values() -> None:
    with pytest.raises(ConfigError, match="'label' must be set"):
        build(ByLabel, {"validValues": ["x"]})
    with pytest.raises(ConfigError, match="validValues"):
        build(ByLabel, {"label": "x"})


# --- prefix-cache-affinity-filter ------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.3, 0.8])
def test_prefix_affinity_keeps_the_endpoints_at_the_threshold_in_the_candidates_order(
    threshold: float,
) -> None:
    """Among many candidates, the sticky ones are exactly those whose ratio reaches the threshold,
    in the order the candidates came, whatever order the match lists them in."""
    rng = random.Random(int(threshold * 10))
    endpoints = [make_endpoint(f"e{i}") for i in range(60)]
    holders = rng.sample(endpoints, 12)
    match = PrefixMatch({ep.key: rng.randrange(0, 11) for ep in holders}, 10, 64)
    cycle = CycleState()
    cycle.write(PREFIX_MATCH, match)
    flt = build(PrefixCacheAffinityFilter, {"affinityThreshold": threshold, "maxTTFTPenaltyMs": 0})
    expected = [ep for ep in endpoints if match.ratio(ep) >= threshold]
    assert list(flt.filter(cycle, make_request(), endpoints)) == (expected or endpoints)


def affinity_cycle(
    matched: dict[str, int], endpoints: list[Endpoint] | None = None, with_load: bool = False
) -> CycleState:
    """A cycle holding a prefix match (`matched`: endpoint name -> blocks of 10) and, with
    `with_load`, the in-flight producer's view of `endpoints` (their ledger counts)."""
    cycle = CycleState()
    cycle.write(PREFIX_MATCH, PrefixMatch({f"{k}:8000": v for k, v in matched.items()}, 10, 64))
    if with_load:
        InFlightLoadProducer().produce(cycle, make_request(), endpoints or [])
    return cycle


@pytest.mark.parametrize(
    ("params", "matched", "tokens", "expected"),
    [
        ({}, {"a": 9, "b": 8, "c": 2}, {}, ["a", "b"]),  # >= 0.8 of the blocks
        ({}, {"a": 7}, {}, ["a", "b", "c"]),  # nobody sticky: keep all
        ({"affinityThreshold": 0.5}, {"a": 7, "c": 5}, {}, ["a", "c"]),
        ({"affinityThreshold": 0}, {"a": 10}, {}, ["a", "b", "c"]),  # 0 disables the gate
        # TTFT gate: the sticky a has 40,000 tokens queued = 2,511 ms at 15,928 tokens/s.
        ({"maxTTFTPenaltyMs": 3000}, {"a": 10}, {"a": 40_000}, ["a"]),
        ({"maxTTFTPenaltyMs": 2000}, {"a": 10}, {"a": 40_000}, ["a", "b", "c"]),
        ({"maxTTFTPenaltyMs": 2000}, {"a": 10}, {"a": 40_000, "b": 20_000, "c": 20_000}, ["a"]),
        ({"maxTTFTPenaltyMs": 0}, {"a": 10}, {"a": 10**9}, ["a"]),  # 0: always stick
        ({"peakPrefillThroughput": 1000, "maxTTFTPenaltyMs": 1000}, {"a": 10}, {"a": 1500}, ["a", "b", "c"]),
    ],
)
def test_prefix_cache_affinity(
    params: dict[str, Any], matched: dict[str, int], tokens: dict[str, int], expected: list[str]
) -> None:
    # The in-flight tokens are the ledger's counts on each endpoint.
    endpoints = [make_endpoint(n, inflight_tokens=tokens.get(n, 0)) for n in "abc"]
    flt = build(PrefixCacheAffinityFilter, params)
    assert kept(flt, endpoints, affinity_cycle(matched, endpoints, with_load=True)) == expected


def test_prefix_cache_affinity_explores_and_declares_its_data() -> None:
    endpoints = [make_endpoint(n) for n in "abc"]
    flt = PrefixCacheAffinityFilter(exploration_probability=0.25, rng=random.Random(3))
    runs = [kept(flt, endpoints, affinity_cycle({"a": 10})) for _ in range(2000)]
    explored = sum(r == ["a", "b", "c"] for r in runs) / len(runs)
    assert 0.21 < explored < 0.29
    assert kept(flt, endpoints[:1], affinity_cycle({})) == ["a"]  # one candidate: nothing to do
    assert kept(PrefixCacheAffinityFilter(), endpoints, CycleState()) == ["a", "b", "c"]  # no match data
    # consumes() names DataKeys; str(key) is "kind/producer".
    assert tuple(PrefixCacheAffinityFilter().consumes()) == (PREFIX_MATCH, INFLIGHT_LOAD)
    assert [str(k) for k in build(PrefixCacheAffinityFilter).consumes()] == [
        "prefix-cache-match/approx-prefix-cache-producer",
        "inflight-load/inflight-load-producer",
    ]
    assert [str(k) for k in build(PrefixCacheAffinityFilter, {"maxTTFTPenaltyMs": 0}).consumes()] == [
        "prefix-cache-match/approx-prefix-cache-producer",
    ]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"affinityThreshold": 1.5}, "must be <= 1.0"),
        ({"explorationProbability": 2}, "must be <= 1.0"),
        ({"maxTTFTPenaltyMs": -1}, "must be >= 0"),
        ({"peakPrefillThroughput": 0}, "peakPrefillThroughput must be > 0"),
        ({"ttftSource": "sidecar"}, "must be one of 'prefillThroughput', 'latencyPredictor'"),
    ],
)
def test_prefix_cache_affinity_errors(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(PrefixCacheAffinityFilter, params)
