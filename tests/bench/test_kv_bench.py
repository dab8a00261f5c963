"""The KV-events bench (epp_bench.kv_bench) end to end, in miniature: real simulators publishing KV
events, real Envoy + epp with the precise scorer, real vllm-router kv_aware on the same events."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from epp_bench.kv_bench import (
    GAIE_WEIGHTS,
    GUIDE_WEIGHTS,
    PRECISE_CONFIG,
    PRECISE_CONFIGS,
    SCENARIOS,
    ConfigPolicy,
    Scenario,
    at_load,
    main,
    quick,
    with_replicas,
)
from epp_bench.make_tokenizer import write_tokenizer

pytestmark = pytest.mark.timeout(120)

UPSTREAM = Path(__file__).resolve().parents[2].parent / "shared" / "upstream" / "configs"


def check_config(text: str) -> subprocess.CompletedProcess[str]:
    """`epp --check-config` on a config's text."""
    return subprocess.run(
        [sys.executable, "-m", "epp", "--config-text", text, "--endpoints", "127.0.0.1:8000",
         "--check-config"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_quick_restart_run_reports_every_figure(tmp_path: Path) -> None:
    """Two pods, a restart of one at half time: the precise epp (two replicas behind the Envoy) and
    vllm-router kv_aware serve every request and each result has throughput, TTFT percentiles and
    hit rates to compare. The load, the draw and the replicas are the ones asked for (--rate,
    --seed, --replicas)."""
    out = tmp_path / "kv.json"
    run = subprocess.run(
        [
            sys.executable, "-m", "epp_bench.kv_bench", "--quick", "--scenario", "restart",
            "--policy", "epp-precise", "--policy", "vllm-router-kv-aware", "--rate", "6", "--seed", "3",
            "--replicas", "2", "--out", str(out),
            "--plot", str(tmp_path / "kv.png"),
        ],
        capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    doc: dict[str, Any] = orjson.loads(out.read_bytes())["scenarios"]["restart"]
    assert doc["restart_at"] == 0.5 and 0 < doc["oracle_hit_rate"] < 1
    assert doc["workload"]["arrivals"]["rate"] == 6 and doc["workload"]["seed"] == 3
    assert doc["epp_replicas"] == 2 and "=== restart (2 epp replicas) ===" in run.stdout
    # Peers run one router, as they would.
    assert [doc["policies"][p]["epp_replicas"] for p in ("epp-precise", "vllm-router-kv-aware")] == [2, 1]
    for policy in ("epp-precise", "vllm-router-kv-aware"):
        figures = doc["policies"][policy]
        assert figures["requests"] == 12
        # The restarted pod fails what it was running: at most a request or two, never the rest.
        assert figures["errors"] <= 2, figures
        for key in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "output_tokens_per_s", "hit_rate"):
            assert not math.isnan(figures[key]) and figures[key] >= 0, (policy, key)
        # Routing on the events keeps most of each group's prompts on the pod holding its prefix
        # (round-robin over the 2 pods reaches a quarter to a third of the oracle here).
        assert figures["hit_rate"] >= 0.5 * doc["oracle_hit_rate"], (policy, figures["hit_rate"])
    assert "TTFT p90 epp-precise vs vllm-router-kv-aware" in run.stdout
    assert (tmp_path / "kv.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "name", ["epp-precise", "epp-precise-approx", "epp-precise-shared", "epp-precise-guide-shared"]
)
def test_precise_config_loads_in_epp(tmp_path: Path, name: str) -> None:
    write_tokenizer(tmp_path)
    approx, shared = name == "epp-precise-approx", name.endswith("-shared")
    # epp-precise-guide-shared has the precise-prefix-cache-aware guide's weights (precise 2, KV
    # utilization 1, queue 1), the others the gaie-kv-events guide's (3, 2, 2).
    weights = (2.0, 1.0, 1.0) if "-guide-" in name else (3.0, 2.0, 2.0)
    text = PRECISE_CONFIGS[name].render(tmp_path, "42", "tcp://127.0.0.1:5557", "127.0.0.1:6379")
    assert PRECISE_CONFIGS[name].event_fed
    # epp-precise-approx adds the approximate scorer behind the events, epp-precise-shared the
    # Valkey index the bench starts (and nothing else).
    assert ("pluginRef: prefix-cache-scorer" in text) is approx
    assert PRECISE_CONFIGS[name].shares_index is shared
    assert ('valkeyConfig: {address: "127.0.0.1:6379"}' in text) is shared
    assert text.count("pluginRef") == 4 + approx
    for scorer, weight in zip(
        ("precise-prefix-cache-scorer", "kv-cache-utilization-scorer", "queue-scorer"), weights, strict=True
    ):
        assert f"{{pluginRef: {scorer}, weight: {weight}}}" in text, (scorer, text)
    check = check_config(text)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "precise-prefix-cache-scorer" in PRECISE_CONFIG
    # The picked pod is credited before its events arrive (--check-config names any parameter
    # epp ignores).
    assert "speculativeIndexing: true" in PRECISE_CONFIG and "ignored" not in check.stdout + check.stderr


@pytest.mark.parametrize(
    ("weights", "guide"),
    [
        (GAIE_WEIGHTS, "llm-d_guides_precise-prefix-cache-aware_gaie-kv-events.yaml"),
        (GUIDE_WEIGHTS, "llm-d_guides_precise-prefix-cache-aware_scheduler.yaml"),
    ],
)
def test_precise_weights_are_the_upstream_guides(weights: tuple[float, float, float], guide: str) -> None:
    """The bench's precise configs weigh their scorers as the upstream guide they are named after."""
    doc = yaml.safe_load((UPSTREAM / guide).read_text())
    (profile,) = doc["schedulingProfiles"]
    weight = {ref["pluginRef"]: ref.get("weight") for ref in profile["plugins"]}
    scorers = ("precise-prefix-cache-scorer", "kv-cache-utilization-scorer", "queue-scorer")
    assert tuple(float(weight[name]) for name in scorers) == weights


def test_quick_scenarios_stay_small() -> None:
    for scenario in SCENARIOS.values():
        small = quick(scenario)
        assert small.simulators == 2 and len(small.workload.turns()) == 12 and small.max_seconds <= 20
        assert small.restart_at == scenario.restart_at and small.epp_replicas == scenario.epp_replicas


def test_more_load_on_the_same_caches() -> None:
    """--rate and --seed change the arrivals and the draw, nothing else; a rate that is not
    positive is refused before anything starts."""
    eviction = SCENARIOS["eviction"]
    loaded = at_load(eviction, 20.0, 2)
    assert loaded.workload.arrivals.rate == 20.0 and loaded.workload.seed == 2
    assert loaded.workload.spec == eviction.workload.spec
    assert (loaded.simulators, loaded.kv_cache_blocks) == (eviction.simulators, eviction.kv_cache_blocks)
    assert at_load(eviction, None, None) == eviction

    # Another seed draws other prompts and arrival times; the same seed at another rate sends the
    # same prompts, only sooner.
    def prompts(scenario: Scenario) -> list[str]:
        return [turn.prompt for turn in scenario.workload.turns()]

    assert prompts(loaded) != prompts(eviction)
    assert prompts(at_load(eviction, 20.0, None)) == prompts(eviction)
    with pytest.raises(SystemExit) as refused:
        main(["--rate", "0", "--scenario", "eviction"])
    assert refused.value.code == 2


def test_more_replicas_on_the_same_caches() -> None:
    """--replicas puts that many epp replicas behind the Envoy of any scenario, nothing else
    changes; fewer than one is refused before anything starts."""
    eviction = SCENARIOS["eviction"]
    doubled = with_replicas(eviction, 2)
    assert doubled.epp_replicas == 2 and eviction.epp_replicas == 1
    assert dataclasses.replace(doubled, epp_replicas=1) == eviction
    assert with_replicas(SCENARIOS["replicas"], None).epp_replicas == 2  # the scenario's own
    with pytest.raises(SystemExit) as refused:
        main(["--replicas", "0", "--scenario", "eviction"])
    assert refused.value.code == 2


MY_PRECISE = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters:
    tokenProcessorConfig: {blockSize: ${block_size}, hashSeed: "${hash_seed}"}
    indexerConfig:
      tokenizersPoolConfig: {modelName: "${tokenizer}"}
    kvEventsConfig: {zmqEndpoint: "${zmq_endpoint}", topicFilter: "kv@", discoverPods: false}
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: precise-prefix-cache-scorer, weight: 3}
  - {pluginRef: queue-scorer, weight: 1}
"""


def test_your_own_config_runs_fed_by_the_events(tmp_path: Path) -> None:
    """--policy NAME=FILE: the bench fills the file's placeholders, the engines publish to the
    address it names, and the run reports it like a built-in policy, with the KV-event batches
    epp applied. A config whose subscription matches nothing is run too, and called out."""
    mine, deaf = tmp_path / "mine.yaml", tmp_path / "deaf.yaml"
    mine.write_text(MY_PRECISE)
    deaf.write_text(MY_PRECISE.replace('topicFilter: "kv@"', 'topicFilter: "nothing@"'))
    out = tmp_path / "kv.json"
    run = subprocess.run(
        [
            sys.executable, "-m", "epp_bench.kv_bench", "--quick", "--scenario", "restart",
            "--policy", f"mine={mine}", "--policy", f"deaf={deaf}", "--out", str(out),
        ],
        capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    doc: dict[str, Any] = orjson.loads(out.read_bytes())["scenarios"]["restart"]
    assert list(doc["policies"]) == ["mine", "deaf"]  # in the order given
    for name in ("mine", "deaf"):
        figures = doc["policies"][name]
        assert figures["requests"] == 12 and figures["errors"] <= 2, figures
        assert figures["event_fed"] is True
    # Every request's blocks reach epp as BlockStored batches (and the restart's clear).
    assert doc["policies"]["mine"]["kv_event_batches"] >= 12
    assert doc["policies"]["deaf"]["kv_event_batches"] == 0
    assert "hit rate mine" in run.stdout and "KV-event batches mine applied" in run.stdout
    assert "WARNING: deaf applied no KV-event batch" in run.stdout
    assert "WARNING: mine" not in run.stdout


def test_a_config_policy_is_checked_before_anything_starts(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text(MY_PRECISE)
    policy = ConfigPolicy.from_argument(f"mine={mine}")
    assert policy.event_fed
    text = policy.render(tmp_path, "42", "tcp://127.0.0.1:5557")
    assert 'zmqEndpoint: "tcp://127.0.0.1:5557"' in text and 'hashSeed: "42"' in text
    assert f'modelName: "{tmp_path}"' in text and "blockSize: 16" in text
    # Without the SUB address the config runs as given (no engine connects to epp).
    approximate = tmp_path / "approx.yaml"
    approximate.write_text("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n# costs $$0\n")
    assert not ConfigPolicy.from_argument(f"a={approximate}").event_fed

    typo = tmp_path / "typo.yaml"
    typo.write_text(MY_PRECISE.replace("${hash_seed}", "${hashseed}"))
    bad = [
        (f"mine={typo}", "placeholder the bench does not fill: ${hashseed}"),
        (f"mine={tmp_path / 'absent.yaml'}", "cannot read its config"),
        (f"epp={mine}", "give a name of your own"),
    ]
    for argument, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            ConfigPolicy.from_argument(argument)
    dollar = tmp_path / "dollar.yaml"
    dollar.write_text("name: $ 5\n")
    with pytest.raises(ValueError, match="write \\$\\$ for a literal \\$"):
        ConfigPolicy.from_argument(f"d={dollar}")
    # On the command line: a clear error and exit status 2, before any simulator starts.
    for argument in (f"mine={typo}", "nope"):
        with pytest.raises(SystemExit) as refused:
            main(["--policy", argument, "--scenario", "eviction"])
        assert refused.value.code == 2


def test_the_documented_config_policy_loads_in_epp(tmp_path: Path) -> None:
    """docs/benchmarks.md's example for --policy NAME=FILE, filled as the bench fills it, is a
    config epp accepts, and an event-fed one."""
    guide = (Path(__file__).parents[2] / "docs" / "benchmarks.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", guide, re.S) if "${zmq_endpoint}" in b]
    assert len(blocks) == 1
    example = tmp_path / "light.yaml"
    example.write_text(blocks[0])
    policy = ConfigPolicy.from_argument(f"light={example}")
    assert policy.event_fed
    write_tokenizer(tmp_path)
    check = check_config(policy.render(tmp_path, "42", "tcp://127.0.0.1:5557"))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ignored" not in check.stdout + check.stderr
