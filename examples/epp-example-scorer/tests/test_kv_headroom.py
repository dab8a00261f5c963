"""The example scorer against its formula, with epp's scorer test kit."""

from __future__ import annotations

import pytest
from epp_kv_headroom import KvHeadroomScorer

from epp.framework import Params, Scorer
from epp.testing import make_endpoint, run_profile, score
from scorers import KvCacheUtilizationScorer, QueueScorer


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
    assert score(KvHeadroomScorer(params=Params({"countWaiting": False})), eps) == [1.0, 1.0]


def test_prefers_the_emptier_pod_where_kv_utilization_alone_does_not() -> None:
    busy = make_endpoint("busy", kv=0.30, running=60)
    quiet = make_endpoint("quiet", kv=0.35, running=2)
    baseline = run_profile([(QueueScorer(), 2), (KvCacheUtilizationScorer(), 2)], [busy, quiet])
    assert baseline.picked == ["busy"]
    defaults: list[tuple[Scorer, float]] = [(QueueScorer(), 2.0), (KvCacheUtilizationScorer(), 2.0)]
    custom = run_profile([*defaults, (KvHeadroomScorer(), 2.0)], [busy, quiet])
    assert custom.picked == ["quiet"]
    assert custom.scores["kv-headroom-scorer"]["quiet"] == 1.0
