"""The example scorer against its formula, with epp's scorer test kit (`epp.testing`)."""

from __future__ import annotations

import pytest
from epp_kv_headroom import KvHeadroomScorer

from epp.framework import ConfigError, Scorer
from epp.testing import (
    build,
    load_scheduler,
    make_endpoint,
    make_request,
    plugin_class,
    route,
    run_profile,
    score,
)
from epp_scorers.scorers.kv_cache import KvCacheUtilizationScorer
from epp_scorers.scorers.queue import QueueScorer


@pytest.mark.parametrize(
    ("endpoints", "expected"),
    [
        ([], []),
        ([{"kv": 0.5}], [1.0]),
        # free 0.7 shared by 61 requests vs free 0.65 shared by 3
        ([{"kv": 0.3, "running": 60}, {"kv": 0.35, "running": 2}], [(0.7 / 61) / (0.65 / 3), 1.0]),
        ([{"kv": 0.5, "running": 1}, {"kv": 0.5, "running": 1, "waiting": 2}], [1.0, 0.5]),
        ([{"kv": 1.0}, {"kv": 1.0}], [0.0, 0.0]),  # nothing free anywhere: no preference
    ],
)
def test_formula(endpoints: list[dict[str, float]], expected: list[float]) -> None:
    eps = [make_endpoint(f"e{i}", **kw) for i, kw in enumerate(endpoints)]  # type: ignore[arg-type]
    assert score(KvHeadroomScorer(), eps) == pytest.approx(expected)


def test_waiting_can_be_left_out() -> None:
    eps = [make_endpoint("a", kv=0.5, waiting=9), make_endpoint("b", kv=0.5)]
    # From a config's parameters, parsed as the config loader does ...
    assert score(build(KvHeadroomScorer, {"countWaiting": False}), eps) == [1.0, 1.0]
    # ... and built directly in code.
    assert score(KvHeadroomScorer(count_waiting=False), eps) == [1.0, 1.0]
    assert score(build(KvHeadroomScorer, {"countWaiting": True}), eps) == pytest.approx([0.1, 1.0])


def test_parameters_are_checked() -> None:
    with pytest.raises(ConfigError, match="'countWaiting' must be true or false"):
        build(KvHeadroomScorer, {"countWaiting": "no"})
    with pytest.raises(ConfigError, match="unknown parameter 'countwaiting'"):
        build(KvHeadroomScorer, {"countwaiting": False})
    assert [p.name for p in KvHeadroomScorer.parameters] == ["countWaiting"]


def test_is_a_scorer_named_after_its_type() -> None:
    scorer = build(KvHeadroomScorer)
    assert isinstance(scorer, Scorer)
    assert scorer.name == "kv-headroom-scorer"
    assert build(KvHeadroomScorer, name="headroom").name == "headroom"


def test_entry_point_makes_it_available_to_configs() -> None:
    assert plugin_class("kv-headroom-scorer") is KvHeadroomScorer  # no adapter: it derives from Scorer
    scheduler = load_scheduler(
        """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- {type: kv-headroom-scorer, parameters: {countWaiting: false}}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: kv-headroom-scorer, weight: 1}
"""
    )
    # Waiting requests are not counted: b has more free KV per running request.
    endpoints = [make_endpoint("a", kv=0.5, running=1), make_endpoint("b", kv=0.4, waiting=30)]
    assert route(scheduler, endpoints, make_request()).primary.endpoints[0].name == "b"


def test_prefers_the_emptier_pod_where_kv_utilization_alone_does_not() -> None:
    busy = make_endpoint("busy", kv=0.30, running=60)
    quiet = make_endpoint("quiet", kv=0.35, running=2)
    baseline = run_profile([(QueueScorer(), 2), (KvCacheUtilizationScorer(), 2)], [busy, quiet])
    assert baseline.picked == ["busy"]
    defaults: list[tuple[Scorer, float]] = [(QueueScorer(), 2.0), (KvCacheUtilizationScorer(), 2.0)]
    custom = run_profile([*defaults, (KvHeadroomScorer(), 2.0)], [busy, quiet])
    assert custom.picked == ["quiet"]
    assert custom.scores["kv-headroom-scorer"]["quiet"] == 1.0
