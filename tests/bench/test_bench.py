"""The bench: workloads are repeatable and bounded; a short real run reports every figure."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from epp.framework.registry import installed_registry
from epp.scheduling.loader import load_config
from epp_bench import runner
from epp_bench.__main__ import build_parser, config_from_args
from epp_bench.floor import floor_sim_args, floor_workload
from epp_bench.gateway import render_envoy_config
from epp_bench.load import LoadResult, RequestResult
from epp_bench.report import ladder_tables, table
from epp_bench.runner import (
    ADAPTIVE_CONFIG,
    LADDER_FIGURES,
    TUNED_CONFIG,
    BenchConfig,
    adaptive_config,
    tuned_config,
)
from epp_bench.workloads import (
    Arrivals,
    MultiTurn,
    SharedPrefix,
    Workload,
    conversation_prompt,
    oracle_hit_rate,
)

FIGURES = {
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "itl_mean_s",
    "output_tokens_per_s",
    "requests_per_s",
    "errors",
    "hit_rate",
    "pods_per_group",
    "group_on_top_pod",
}


def test_shared_prefix_is_repeatable_and_sized() -> None:
    spec = SharedPrefix(groups=3, prompts_per_group=4, system_tokens=100, question_tokens=10, output_tokens=5)
    a = Workload(spec, Arrivals(rate=5), seed=7).turns()
    b = Workload(spec, Arrivals(rate=5), seed=7).turns()
    assert [(t.at, t.prompt) for t in a] == [(t.at, t.prompt) for t in b]
    assert len(a) == 12 and all(len(t.prompt) == 110 * 4 for t in a)
    assert len({t.prompt[:400] for t in a}) == 3  # three system prompts
    assert [t.at for t in a] == sorted(t.at for t in a)
    assert Workload(spec, Arrivals(rate=5), seed=8).turns()[0].prompt != a[0].prompt
    assert len(Workload(spec, Arrivals(rate=5), seed=7, max_requests=5).turns()) == 5


def test_poisson_rate_and_ladder() -> None:
    times = Arrivals(rate=50).times(5000, random.Random(1))
    assert abs(5000 / times[-1] - 50) < 3
    ladder = Arrivals(ladder=((10, 2.0), (40, 1.0))).times(10_000, random.Random(1))
    assert ladder[-1] <= 3.0  # the ladder ends the arrivals
    assert 40 < len(ladder) < 80  # ~20 + ~40


def test_multi_turn_rounds_and_prompt_growth() -> None:
    wl = Workload(MultiTurn(users=2, rounds=3, system_tokens=20), Arrivals(rate=1), seed=1)
    turns = wl.turns()
    assert sorted((t.user, t.round) for t in turns) == [(u, r) for u in range(2) for r in range(3)]
    first = conversation_prompt(wl.system_prompts[0], [], "q1")
    second = conversation_prompt(wl.system_prompts[0], [("q1", "a1")], "q2")
    assert second.startswith(first.removesuffix("Assistant:"))


def test_oracle_counts_the_longest_earlier_prefix() -> None:
    a = "a" * 128 + "b" * 64
    b = "a" * 128 + "c" * 64
    assert oracle_hit_rate([a]) == 0.0
    assert oracle_hit_rate([a, b]) == 128 / (192 * 2)
    assert oracle_hit_rate([a, a]) == 192 / 384


def test_the_request_only_gateway_keeps_the_response_body_from_epp() -> None:
    def response_body_mode(response_body: bool = True) -> str:
        config = render_envoy_config(
            "epp", listen_port=0, admin_port=0, epp_grpc_port=9002, response_body=response_body
        )
        http = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ext_proc = next(f for f in http["typed_config"]["http_filters"] if f["name"].endswith("ext_proc"))
        return str(ext_proc["typed_config"]["processing_mode"]["response_body_mode"])

    assert response_body_mode() == "FULL_DUPLEX_STREAMED"  # as the inference extension's gateways
    assert response_body_mode(response_body=False) == "NONE"


def test_stickiness_counts_the_pods_each_group_was_served_by() -> None:
    served = [(0, "a"), (0, "a"), (0, "a"), (0, "b"), (1, "c"), (1, "c")]
    load = LoadResult([RequestResult(True, 200, served_by=pod, group=g) for g, pod in served])
    load.results.append(RequestResult(False, 503, served_by="d", group=1))  # failed: not counted
    figures = load.summary()
    assert figures["pods_per_group"] == 1.5  # group 0 on two pods, group 1 on one
    assert figures["group_on_top_pod"] == (0.75 + 1.0) / 2


def test_short_run_of_two_policies_reports_every_figure(tmp_path: Path) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    result = subprocess.run(
        [sys.executable, "-m", "epp_bench", "run", "--policy", "round-robin", "--policy", "epp",
         "--policy", "epp-request-only", "--simulators", "2",
         "--groups", "2", "--prompts-per-group", "4", "--system-tokens", "512", "--question-tokens", "16",
         "--output-tokens", "8", "--rate", "20", "--max-seconds", "30", "--sim-arg=--time-factor=0.2",
         "--out", str(out), "--plot", str(png), "--no-progress"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert set(doc["policies"]) == {"round-robin", "epp", "epp-request-only"}
    for name, figures in doc["policies"].items():
        assert set(figures) >= FIGURES, name
        assert figures["errors"] == 0, name
        assert figures["requests"] == 8
        assert figures["ttft_p50_s"] > 0 and figures["output_tokens_per_s"] > 0
        assert 0 <= figures["hit_rate"] <= 1
    assert 0 < doc["oracle_hit_rate"] <= 1
    assert doc["workload"]["kind"] == "shared-prefix"
    # Sticky prefix routing reuses the cache at least as well as spreading does.
    assert doc["policies"]["epp"]["hit_rate"] >= doc["policies"]["round-robin"]["hit_rate"]
    # Without the response body epp still routes (same config, same picks for this workload).
    assert doc["policies"]["epp-request-only"]["hit_rate"] >= doc["policies"]["round-robin"]["hit_rate"]
    assert png.stat().st_size > 10_000
    assert "TTFT p50" in result.stdout and "oracle" in result.stdout


def test_load_ladder_runs_each_policy_at_each_rate(tmp_path: Path) -> None:
    out, png = tmp_path / "ladder.json", tmp_path / "ladder.png"
    result = subprocess.run(
        [sys.executable, "-m", "epp_bench", "run", "--policy", "round-robin", "--policy", "epp",
         "--simulators", "2",
         "--groups", "2", "--prompts-per-group", "3", "--system-tokens", "256", "--question-tokens", "16",
         "--output-tokens", "4", "--ladder", "10,30", "--ladder-seconds", "0.5", "--max-seconds", "20",
         "--sim-arg=--time-factor=0.2", "--out", str(out), "--plot", str(png), "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["ladder"] == [10.0, 30.0]
    assert [run["rate"] for run in doc["runs"]] == [10.0, 30.0]
    # At most rate x --ladder-seconds requests per rung.
    assert [run["workload"]["arrivals"]["rate"] for run in doc["runs"]] == [10.0, 30.0]
    for run, requests in zip(doc["runs"], (5, 6), strict=True):  # 10 x 0.5; all 6 at 30 req/s
        assert set(run["policies"]) == {"round-robin", "epp"}
        assert all(f["requests"] == requests for f in run["policies"].values())
        assert all(f["errors"] == 0 for f in run["policies"].values())
    assert set(doc["summary"]) == {"round-robin", "epp"}
    for points in doc["summary"].values():
        assert [p["rate"] for p in points] == [10.0, 30.0]
        assert all(p["ttft_p90_s"] > 0 and 0 <= p["hit_rate"] <= 1 for p in points)
    assert result.stdout.count("TTFT p50") == 2  # one table per rate
    assert "load ladder summary" in result.stdout and "30 req/s" in result.stdout
    assert png.stat().st_size > 10_000


def test_ladder_flag_takes_rates_or_stages() -> None:
    from epp_bench.__main__ import build_parser, config_from_args

    args = build_parser().parse_args(["run", "--policy", "epp", "--ladder", "5,10"])
    assert args.ladder == [5.0, 10.0]
    assert config_from_args(args).workload.arrivals.ladder == ()
    args = build_parser().parse_args(["run", "--policy", "epp", "--ladder", "5:2,10:1"])
    assert config_from_args(args).workload.arrivals.ladder == ((5.0, 2.0), (10.0, 1.0))
    assert build_parser().parse_args(["demo", "--ladder", "8,20"]).ladder == [8.0, 20.0]


async def test_ladder_seeds_run_every_rate_with_each_seed_and_report_medians(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--ladder-seeds N: each rate once per workload seed (every policy meets the same draws), the
    summary each figure's median over them and each seed's TTFT p90; runner.run_bench stands in
    for the real runs here (test_load_ladder_runs_each_policy_at_each_rate runs them)."""
    seen: list[tuple[float, int]] = []

    async def fake_run_bench(cfg: BenchConfig, show_progress: bool = True) -> dict[str, Any]:
        rate, seed = cfg.workload.arrivals.rate, cfg.workload.seed
        seen.append((rate, seed))
        figures = {key: 0.0 for key in LADDER_FIGURES}
        return {
            "policies": {
                "epp": {**figures, "ttft_p90_s": rate + seed, "hit_rate": 0.1 * seed},
                "peer": {**figures, "ttft_p90_s": 10.0 * seed, "hit_rate": 0.5},
            },
            "oracle_hit_rate": 0.9,
        }

    monkeypatch.setattr(runner, "run_bench", fake_run_bench)
    args = build_parser().parse_args(
        ["run", "--policy", "epp", "--seed", "3", "--ladder", "1,2", "--ladder-seeds", "3"]
    )
    doc = await runner.run_ladder(config_from_args(args), args.ladder, 24, False, args.ladder_seeds)
    assert seen == [(1.0, 3), (1.0, 4), (1.0, 5), (2.0, 3), (2.0, 4), (2.0, 5)]
    assert [(run["rate"], run["seed"]) for run in doc["runs"]] == seen
    epp_points, peer_points = doc["summary"]["epp"], doc["summary"]["peer"]
    assert [p["ttft_p90_s_each"] for p in epp_points] == [[4.0, 5.0, 6.0], [5.0, 6.0, 7.0]]
    assert [p["ttft_p90_s"] for p in epp_points] == [5.0, 6.0]  # the medians
    assert [p["hit_rate"] for p in epp_points] == pytest.approx([0.4, 0.4])
    assert [p["ttft_p90_s"] for p in peer_points] == [40.0, 40.0] and epp_points[0]["seeds"] == 3
    text = ladder_tables(doc)
    assert "load ladder summary (median of 3 seeds)" in text and "--- 2 req/s, seed 5 ---" in text
    assert "4.00 5.00 6.00" in text and "30.00 40.00 50.00" in text  # each seed's p90
    for bad in ("0", "x"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["run", "--ladder", "1", "--ladder-seeds", bad])


def _peak_prefill(config_text: str) -> int:
    (affinity,) = (
        p for p in yaml.safe_load(config_text)["plugins"] if p["type"] == "prefix-cache-affinity-filter"
    )
    return int(affinity["parameters"]["peakPrefillThroughput"])


def test_epp_tuned_is_given_the_simulators_prefill_rate() -> None:
    # The shipped file holds the simulator's rate at its default speed; a slower simulated model
    # (--time-factor) or another per-token prefill time gets its own, as an operator would set it.
    shipped = TUNED_CONFIG.read_text()
    assert _peak_prefill(shipped) == _peak_prefill(tuned_config([])) == 4000
    assert _peak_prefill(tuned_config(["--time-factor=4", "--max-num-seqs", "4"])) == 1000
    assert _peak_prefill(tuned_config(["--prefill-time-per-token-s", "0.0001"])) == 10000
    # What the bench hands epp is a config epp loads.
    loaded = load_config(tuned_config(["--time-factor=4"]), installed_registry())
    assert loaded.scheduler is not None


def test_epp_adaptive_is_a_named_policy_the_demo_does_not_run() -> None:
    """`--policy epp-adaptive` runs examples/configs/epp-adaptive.yaml as it is; the demo's
    default policy list leaves it out, and an unknown name is still refused."""
    parse = build_parser().parse_args
    assert "epp-adaptive" not in config_from_args(parse(["run"])).policies
    cfg = config_from_args(parse(["run", "--policy", "epp", "--policy", "epp-adaptive"]))
    assert cfg.policies == ["epp", "epp-adaptive"]
    text = adaptive_config(cfg.sim_args)
    assert text == ADAPTIVE_CONFIG.read_text()
    profile = yaml.safe_load(text)["schedulingProfiles"][0]["plugins"]
    assert profile[0] == {"pluginRef": "prefix-cache-affinity-filter"}
    weights = {ref["pluginRef"]: ref.get("weight") for ref in profile}
    assert weights["prefix-cache-scorer"] == 3.5 and weights["active-request-scorer"] == 1
    assert load_config(text, installed_registry()).scheduler is not None
    with pytest.raises(SystemExit, match="unknown policy 'epp-saturation'"):
        config_from_args(parse(["run", "--policy", "epp-saturation"]))


def test_the_table_says_worse_when_a_policy_is_slower_than_round_robin() -> None:
    figures = {"ttft_p90_s": 1.5, "hit_rate": 0.3}
    doc = {
        "oracle_hit_rate": 0.9,
        "policies": {
            "round-robin": figures,
            "epp": {**figures, "ttft_p90_s": 0.075},
            "power-of-two": {**figures, "ttft_p90_s": 1.68},
        },
    }
    lines = table(doc).splitlines()
    assert "TTFT p90 epp vs round-robin: 20.0x better" in lines
    assert "TTFT p90 power-of-two vs round-robin: 1.1x worse" in lines


def test_the_floor_workload_makes_only_each_groups_first_request_cold() -> None:
    """The shared-cache floor's workload: the same times, questions and later prompts; each
    group's first request has, in place of its system prompt, a text of that length no other
    request starts with."""
    spec = SharedPrefix(groups=3, prompts_per_group=4, system_tokens=100, question_tokens=10, output_tokens=5)
    plain = Workload(spec, Arrivals(rate=5), seed=7)
    floor = floor_workload(plain)
    before, after = plain.turns(), floor.turns()
    assert [(t.at, t.group, len(t.prompt)) for t in before] == [(t.at, t.group, len(t.prompt)) for t in after]
    firsts = {t.group: i for i, t in reversed(list(enumerate(before)))}
    for i, (old, new) in enumerate(zip(before, after, strict=True)):
        if i in firsts.values():
            assert new.prompt[400:] == old.prompt[400:]  # the question kept (100 tokens x 4 bytes)
            assert new.prompt[:400] != old.prompt[:400]
            assert not any(other.prompt.startswith(new.prompt[:64]) for other in after if other is not new)
        else:
            assert new.prompt == old.prompt
    assert [t.prompt for t in floor.turns()] == [t.prompt for t in after]  # repeatable
    with pytest.raises(ValueError, match="shared-prefix"):
        floor_workload(Workload(MultiTurn(users=1, rounds=1), Arrivals(rate=1))).turns()
    parse = build_parser().parse_args
    # Refused before any policy runs, not when the floor's turn comes.
    with pytest.raises(SystemExit, match="shared-prefix"):
        config_from_args(
            parse(["run", "--policy", "epp", "--policy", "shared-cache-floor", "--workload", "multi-turn"])
        )
    with pytest.raises(SystemExit, match="takes no config file"):
        config_from_args(parse(["run", "--policy", "round-robin=x.yaml"]))


def test_the_floor_keeps_every_prefix_beside_a_full_batch() -> None:
    """The floor's simulators hold every group's system prompt and a full batch of running
    requests; a bigger cache the user asked for is kept."""
    spec = SharedPrefix(
        groups=16, prompts_per_group=24, system_tokens=1536, question_tokens=64, output_tokens=32
    )
    workload = Workload(spec, Arrivals(rate=7))

    def blocks(*sim_args: str) -> int:
        return int(floor_sim_args(list(sim_args), workload)[-1].removeprefix("--kv-cache-blocks="))

    assert blocks("--kv-cache-blocks=512", "--max-num-seqs=4") >= 16 * 96 + 4 * 102
    assert blocks("--max-num-seqs=256") >= 16 * 96 + 256 * 102
    assert blocks("--kv-cache-blocks=100000") == 100000


def test_the_floor_serves_every_later_request_from_a_warm_cache(tmp_path: Path) -> None:
    """`--policy shared-cache-floor`: the simulators hold every group's prefix before the load, so
    the only prefix misses are the groups' first requests, wherever epp sends them."""
    out = tmp_path / "floor.json"
    groups, per_group, system, question = 2, 4, 512, 16
    result = subprocess.run(
        [sys.executable, "-m", "epp_bench", "run", "--policy", "shared-cache-floor", "--simulators", "2",
         "--groups", str(groups), "--prompts-per-group", str(per_group), "--system-tokens", str(system),
         "--question-tokens", str(question), "--output-tokens", "4", "--rate", "20", "--max-seconds", "30",
         "--sim-arg=--time-factor=0.2", "--sim-arg=--kv-cache-blocks=40", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(out.read_text())
    floor = doc["policies"]["shared-cache-floor"]
    n = groups * per_group
    assert floor["requests"] == n and floor["errors"] == 0
    # Every request after a group's first hits its whole system prompt on whichever pod it went to
    # (40 blocks per simulator would hold one prompt; the floor gives them room for all).
    assert floor["hit_rate"] == pytest.approx((n - groups) * system / (n * (system + question)))
    assert 0 < doc["oracle_hit_rate"] <= 1
