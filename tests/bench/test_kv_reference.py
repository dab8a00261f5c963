"""The KV-events bench's capacity-aware reference (epp_bench.kv_reference): the bench's arrivals
replayed through the simulator's own KV caches."""

from __future__ import annotations

import dataclasses

import pytest

from epp_bench.kv_bench import SCENARIOS
from epp_bench.kv_reference import capacity_reference
from epp_bench.workloads import Arrivals, MultiTurn, Workload, oracle_hit_rate


def _oracle(workload: Workload) -> float:
    return oracle_hit_rate([turn.prompt for turn in workload.turns()])


def test_roomy_caches_reach_the_oracle() -> None:
    """Caches that hold every prefix lose nothing to eviction: the reference is the oracle."""
    scenario = SCENARIOS["replicas"]  # 8 prefixes of 64 blocks over 4 pods of 512 blocks
    reference = capacity_reference(scenario.workload, scenario.simulators, scenario.kv_cache_blocks)
    assert reference["best"] == pytest.approx(_oracle(scenario.workload), abs=1e-9)
    # A hit leaves the question's 4 blocks to prefill: the floor is a warm request's prefill.
    assert reference["ttft_p90_floor_s"] < 0.05


def test_eviction_scenario_sits_well_below_the_oracle() -> None:
    """16 prefixes of 64 blocks in 4 x 256 blocks: even a router that knows every cache loses hits
    to eviction, so the oracle is no target there; halving the caches loses more."""
    scenario = SCENARIOS["eviction"]
    oracle = _oracle(scenario.workload)
    reference = capacity_reference(scenario.workload, scenario.simulators, scenario.kv_cache_blocks)
    assert set(reference) == {"longest-match", "partition", "best", "ttft_p90_floor_s"}
    assert reference["best"] == max(reference["longest-match"], reference["partition"])
    assert 0.3 < reference["best"] < oracle - 0.05
    # More than a tenth of the requests prefill most of their 1,088 tokens (0.25 ms each).
    assert reference["ttft_p90_floor_s"] > 0.15
    smaller = capacity_reference(scenario.workload, scenario.simulators, scenario.kv_cache_blocks // 2)
    assert smaller["best"] < reference["best"]


def test_a_restart_costs_hits() -> None:
    scenario = SCENARIOS["restart"]
    args = (scenario.workload, scenario.simulators, scenario.kv_cache_blocks)
    assert capacity_reference(*args, restart_at=0.5)["best"] < capacity_reference(*args)["best"]


def test_bad_input_is_refused() -> None:
    scenario = SCENARIOS["eviction"]
    with pytest.raises(ValueError, match="positive"):
        capacity_reference(scenario.workload, 0, 256)
    with pytest.raises(ValueError, match="shared-prefix"):
        capacity_reference(Workload(MultiTurn(), Arrivals()), 4, 256)
    tiny = dataclasses.replace(scenario, kv_cache_blocks=8)
    with pytest.raises(ValueError, match="does not fit"):
        capacity_reference(tiny.workload, tiny.simulators, tiny.kv_cache_blocks)
