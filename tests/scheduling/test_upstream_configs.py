"""Every EndpointPickerConfig upstream ships (../shared/upstream/configs: llm-d-router's
deploy/config, the charts' rendered default configs, the llm-d guides), through the real
`epp --check-config`: each loads, or fails naming the plugin types epp does not have (all of
them) and nothing else: never a YAML, apiVersion or parameter error."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest
import yaml

from epp.framework.registry import installed_registry

UPSTREAM = Path(__file__).resolve().parents[2].parent / "shared" / "upstream" / "configs"
CONFIGS = sorted(UPSTREAM.glob("*.yaml")) if UPSTREAM.is_dir() else []
MISSING = re.compile(r"^epp: invalid config: (.+?): plugin types epp does not have: (.+) \(docs/plugins\.md")

pytestmark = pytest.mark.skipif(not CONFIGS, reason=f"{UPSTREAM} is absent")


def _run_check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epp", "--check-config", "--config-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@cache
def _every_check() -> dict[Path, subprocess.CompletedProcess[str]]:
    # About two seconds of interpreter start each, for forty-odd files: two at a time.
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CONFIGS, pool.map(_run_check_config, CONFIGS), strict=True))


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    """`epp --check-config` on one upstream file, in a fresh interpreter (run once per file)."""
    return _every_check()[path]


def types_needed(path: Path) -> list[str]:
    """The plugin types the file declares that epp does not have, in order."""
    doc = yaml.safe_load(path.read_text())
    registry = installed_registry()
    declared = [p["type"] for p in doc.get("plugins") or []]
    return list(dict.fromkeys(t for t in declared if t not in registry))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_an_upstream_config_loads_or_names_the_missing_plugin_types(path: Path) -> None:
    result = check_config(path)
    needed = types_needed(path)
    if result.returncode == 0:
        assert not needed
        assert result.stdout.strip() == "config is valid"
        assert "Traceback" not in result.stderr
        return
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    match = MISSING.match(lines[0])
    assert match is not None, f"{path.name} failed for another reason: {lines[0]}"
    assert match.group(1) == str(path)
    # A type close to one epp has carries a suggestion: "x (did you mean y?)".
    named = [re.sub(r" \(did you mean .+\?\)$", "", t) for t in match.group(2).split(", ")]
    # Every type the file declares and epp lacks, in one message (plus any a reference needs).
    assert named[: len(needed)] == needed, (named, needed)
    for type_name in named:
        assert type_name in path.read_text()


def test_the_configs_epp_loads_include_the_charts_defaults_and_the_main_guides() -> None:
    loaded = {p.name for p in CONFIGS if check_config(p).returncode == 0}
    assert {
        "chart_gie_epplib_default-plugins.yaml",
        "chart_routerlib_default-plugins_vllm-http.yaml",
        "chart_routerlib_default-plugins_sglang.yaml",
        "llm-d_guides_inference-scheduling_scheduler.yaml",
        "llm-d_guides_optimized-baseline_router.yaml",
        "llm-d_guides_pd-disaggregation_router.yaml",
        "llm-d_guides_tiered-prefix-cache_router_single-host.yaml",
        "llm-d_guides_wide-ep_router.yaml",
        # precise prefix-cache routing from KV events (docs/kv-events.md)
        "llm-d_guides_precise-prefix-cache-aware_scheduler.yaml",
        "llm-d_guides_precise-prefix-cache-aware_gaie-kv-events.yaml",
        "llm-d_guides_precise-prefix-cache-routing_router.yaml",
        "llm-d-router_deploy_config_epp-precise-prefix-cache-config.yaml",
        "llm-d-router_deploy_config_sim-epp-kvcache-config.yaml",
        "llm-d-router_deploy_config_sim-epp-no-hit-lru.yaml",
        "llm-d-router_deploy_config_sim-epp-tokenizer-vllm-http-config.yaml",
        "llm-d_guides_flow-control_router.yaml",
        "llm-d-router_deploy_config_probabilistic-admitter-epp-config.yaml",
        "llm-d-router_deploy_config_soft-reflective-ceiling-epp-config.yaml",
        # predicted-latency routing (docs/predicted-latency.md)
        "chart_routerlib_default-plugins_latencypredictor.yaml",
        "llm-d_guides_predicted-latency-routing_router.yaml",
        "llm-d-router_deploy_config_sim-program-aware-config.yaml",
    } <= loaded
