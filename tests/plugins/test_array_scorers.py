"""The scorers and the picker that work on numpy arrays give what their list versions gave, bit for
bit, whatever the candidates are: the datastore's tuple (its columns), a subset of it (a gather),
or endpoints in no datastore; and plugins written for lists keep working beside them."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from epp.datalayer.datastore import Datastore
from epp.framework import SMALL_POOL_SIZE, CycleState, Endpoint, InferenceRequest, Picker, Scorer
from epp.scheduling.profile import SchedulerProfile, WeightedScorer, describe
from epp.testing import build, make_endpoint, make_request
from epp_scorers.data import PREFIX_MATCH, PrefixMatch
from epp_scorers.pickers.max_score import MaxScorePicker
from epp_scorers.scorers.kv_cache import KvCacheUtilizationScorer
from epp_scorers.scorers.prefix_cache import PrefixCacheScorer
from epp_scorers.scorers.queue import QueueScorer, RunningRequestsSizeScorer


# The list versions, as they were before the scorers moved to arrays.
def low_is_better(values: Sequence[int]) -> list[float]:
    if not values:
        return []
    low, high = min(values), max(values)
    if high == low:
        return [1.0] * len(values)
    return [(high - v) / (high - low) for v in values]


def prefix_reference(match: PrefixMatch, endpoints: Sequence[Endpoint], w: float, scale: int) -> list[float]:
    out = []
    for ep in endpoints:
        m = match.matched.get(ep.key, 0)
        length = min(1.0, m * (match.block_size_tokens / scale))
        out.append(w * length * length + (1.0 - w) * m / match.total_blocks if m else 0.0)
    return out


def candidate_sets(rng: random.Random, n: int, waiting_max: int) -> list[Sequence[Endpoint]]:
    endpoints = [
        make_endpoint(
            f"e{i}",
            waiting=rng.randint(0, waiting_max),
            running=rng.randint(0, waiting_max),
            kv=rng.choice([0.0, 0.5, 1.0, rng.random()]),
        )
        for i in range(n)
    ]
    store = Datastore()
    store.replace_all(endpoints)
    subset = [ep for ep in store.endpoints() if rng.random() < 0.6] or list(store.endpoints()[:1])
    rng.shuffle(subset)
    loose = [make_endpoint(ep.name, waiting=ep.metrics.waiting_queue_size) for ep in endpoints]
    for ep, twin in zip(endpoints, loose, strict=True):
        twin.metrics = ep.metrics
    return [store.endpoints(), subset, loose]


@pytest.mark.parametrize("n", [1, 2, 7, 40, 300])
@pytest.mark.parametrize("waiting_max", [0, 3, 1000])  # 0: all equal; 3: many ties
def test_load_scorers_match_their_list_versions_bit_for_bit(n: int, waiting_max: int) -> None:
    rng = random.Random(n * 1000 + waiting_max)
    for endpoints in candidate_sets(rng, n, waiting_max):
        queue = QueueScorer().score(CycleState(), make_request(), endpoints)
        running = RunningRequestsSizeScorer().score(CycleState(), make_request(), endpoints)
        kv = KvCacheUtilizationScorer().score(CycleState(), make_request(), endpoints)
        # Arrays above a small pool, lists up to it (faster there): the same values either way.
        assert isinstance(queue, np.ndarray) is (len(endpoints) > SMALL_POOL_SIZE)
        assert isinstance(kv, np.ndarray) is (len(endpoints) > SMALL_POOL_SIZE)
        assert list(queue) == low_is_better([ep.metrics.waiting_queue_size for ep in endpoints])
        assert list(running) == low_is_better([ep.metrics.running_requests for ep in endpoints])
        assert list(kv) == [1.0 - ep.metrics.kv_cache_usage for ep in endpoints]


@pytest.mark.parametrize("n", [10, 50])
@pytest.mark.parametrize(("w", "scale"), [(0.0, 8192), (0.5, 4096), (1.0, 100)])
def test_prefix_scorer_matches_its_list_version_bit_for_bit(w: float, scale: int, n: int) -> None:
    rng = random.Random(7)
    for endpoints in candidate_sets(rng, n, 5):
        # Matched: some candidates, an endpoint that is not one, and a zero count.
        matched = {ep.key: rng.randint(1, 390) for ep in endpoints[:: max(1, len(endpoints) // 6)]}
        matched["10.99.0.1:8000"] = 200
        matched[endpoints[-1].key] = 0
        match = PrefixMatch(matched, 390, 64)
        cycle = CycleState()
        cycle.write(PREFIX_MATCH, match)
        scorer = build(PrefixCacheScorer, {"matchLengthWeight": w, "matchLengthScaleTokens": scale})
        scores = scorer.score(cycle, make_request(), endpoints)
        assert list(scores) == prefix_reference(match, endpoints, w, scale)
    assert list(scorer.score(CycleState(), make_request(), endpoints)) == [0.0] * len(endpoints)


@pytest.mark.parametrize("max_endpoints", [1, 2, 5])
@pytest.mark.parametrize("scores", [[0.1, 0.9, 0.5, 0.9, 0.2], [0.3] * 5, [0.0, 1.0, 0.0, 0.0, 1.0]])
def test_max_score_picker_picks_alike_from_a_list_and_an_array(
    max_endpoints: int, scores: list[float]
) -> None:
    endpoints = [make_endpoint(n) for n in "abcde"]
    from_list = MaxScorePicker(max_endpoints=max_endpoints, rng=random.Random(3))
    from_array = MaxScorePicker(max_endpoints=max_endpoints, rng=random.Random(3))
    as_array = np.array(scores)
    picks = [from_list.pick(CycleState(), endpoints, scores) for _ in range(50)]
    assert picks == [from_array.pick(CycleState(), endpoints, as_array) for _ in range(50)]
    if len(set(scores)) < len(scores):  # ties: every tied best endpoint gets picked first sometimes
        best = max(scores)
        assert {p[0].name for p in picks} == {
            ep.name for ep, s in zip(endpoints, scores, strict=True) if s == best
        }


class ListScorer(Scorer):
    """A third-party scorer as written before arrays: a list, from ep.metrics."""

    type_name = "list-scorer"

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        return [1.0 if ep.metrics.waiting_queue_size == 0 else 0.25 for ep in endpoints]


class ListPicker(Picker):
    """A third-party picker that relies on list methods."""

    type_name = "list-picker"
    seen: list[Any] = []

    def pick(self, cycle: CycleState, endpoints: Sequence[Endpoint], scores: Any) -> list[Endpoint]:
        self.seen.append(scores)
        return [endpoints[scores.index(max(scores))]]


@pytest.mark.parametrize("n", [3, 40])  # below and above the profile's numpy threshold
def test_list_plugins_work_beside_array_scorers(n: int) -> None:
    store = Datastore()
    store.replace_all(
        [make_endpoint(f"e{i}", waiting=0 if i == n - 1 else 2 + i % 3, kv=0.5) for i in range(n)]
    )
    picker = ListPicker()
    profile = SchedulerProfile(
        "p", [], [WeightedScorer(ListScorer(), 2.0), WeightedScorer(QueueScorer(), 1.0)], picker
    )
    result = profile.run(CycleState(), make_request(), store.endpoints())
    assert result is not None and result.endpoints == [store.endpoints()[-1]]
    assert type(picker.seen[-1]) is list  # converted for a picker that did not ask for arrays
    assert result.totals[-1] == 3.0 and result.scores[store.endpoints()[-1].key] == 3.0
    decision = describe(result)
    last = decision["scores"][store.endpoints()[-1].key]  # type: ignore[index]
    assert last == {"total": 3.0, "list-scorer": 1.0, "queue-scorer": 1.0}
    assert all(type(v) is float for v in last.values())
