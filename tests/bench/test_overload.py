"""The overload bench, short and bounded: real simulators, Envoy and epp, both policies; every
request is accounted for and the table is printed (its figures are in docs/flow-control.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from epp.discovery.objectives import parse_objectives
from epp.framework.registry import installed_registry
from epp.scheduling.loader import load_config
from epp_bench import overload
from epp_bench.__main__ import build_parser
from epp_bench.__main__ import main as epp_bench_main
from epp_bench.overload import CLASSES, flow_control_config, objectives_yaml
from epp_bench.runner import simulators


def test_the_bench_config_and_objectives_load() -> None:
    loaded = load_config(flow_control_config(4, 5.0, 1, 0.25), installed_registry(), "bench")
    assert loaded.flow_control is not None and sorted(loaded.flow_control.bands) == [-10, 0, 100]
    assert loaded.flow_control.usage_limit is not None
    assert parse_objectives(yaml.safe_load_all(objectives_yaml()), "bench") == {
        name: priority for name, priority, _ in CLASSES
    }


@pytest.mark.timeout(180)
def test_a_short_overload_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "overload.json"
    args = ["overload", "--simulators", "1", "--max-num-seqs", "1", "--rate", "5", "--seconds", "2"]
    args += ["--unloaded-seconds", "2"]
    assert epp_bench_main([*args, "--ttl", "1", "--max-seconds", "20", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [run["policy"] for run in doc["runs"]] == ["epp", "epp-flow-control"]
    for run in doc["runs"]:
        for name, s in run["classes"].items():
            assert s["served"] + s["rejected_429"] + s["other_errors"] == s["requests"], (run["policy"], name)
    flow = doc["runs"][1]["classes"]
    assert flow["critical"]["served"] > 0
    assert flow["critical"]["other_errors"] == 0 and flow["standard"]["other_errors"] == 0
    assert "| epp-flow-control | critical |" in capsys.readouterr().out


async def test_the_class_mix_is_a_flag_and_bad_mixes_are_refused(tmp_path: Path) -> None:
    # A mix with no sheddable requests: the load sends none, and the summary says so per class.
    # (Straight at one simulator: the mix is the load generator's; test_a_short_overload_run
    # covers the same load through Envoy and epp.)
    args = build_parser().parse_args(["overload", "--rate", "8", "--seconds", "2", "--mix", "0.5,0.5,0"])
    cfg = overload.config_from_args(args)
    assert list(cfg.mix) == [0.5, 0.5, 0.0]
    async with simulators(1, cfg.model, []) as backends:
        run = await overload.run_load(
            f"http://{backends[0]}", cfg, cfg.rate, cfg.seconds, overload.mixed_classes(cfg)
        )
    classes = overload.summarize(run)
    assert "sheddable" not in classes and classes["critical"]["requests"] > 0
    assert classes["critical"]["served"] + classes["standard"]["served"] == len(run.outcomes)
    for bad in ("0.5,0.5", "a,b,c", "-1,1,1", "0,0,0"):
        with pytest.raises(SystemExit, match="--mix"):
            epp_bench_main(["overload", f"--mix={bad}", "--out", str(tmp_path / "x.json")])
