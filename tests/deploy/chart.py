"""The EPP container as the upstream llm-d-router chart runs it: its argument vector and probes.

Two sources that must agree: `CHART_ARGS`, written out here (so the manifests are checked even
without ../shared), and the code block of ../shared/upstream/README.md ("The EPP container as
the upstream chart runs it"), which `readme_chart_args` parses. Both use the placeholders NAME
(the pool) and NS (its namespace).

Where the chart puts `--ha-enable-leader-election` (more than one replica): right after
`--config-file FILE`, before `--grpc-health-port` (llm-d-router
config/charts/routerlib/templates/_deployment.yaml). Its probes: gRPC health on the health port,
service `inference-extension` with one replica and `liveness` / `readiness` with several;
liveness after 5 s every 10 s, readiness every 2 s.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from tests.support.kustomize_render import REPO

UPSTREAM_README = REPO.parent / "shared" / "upstream" / "README.md"
README_SECTION = "## The EPP container as the upstream chart runs it"

CHART_ARGS: tuple[str, ...] = (
    "--pool-name", "NAME",
    "--pool-namespace", "NS",
    "--pool-group", "inference.networking.k8s.io",
    "--zap-encoder", "json",
    "--config-file", "/config/default-plugins.yaml",
    "--grpc-health-port", "9003",
    "--tracing=false",
    "--metrics-endpoint-auth=false",
)  # fmt: skip
HA_FLAG = "--ha-enable-leader-election"
HEALTH_PORT = 9003


def readme_chart_args(readme: Path = UPSTREAM_README) -> list[str]:
    """The argument vector in the README's section on the chart's container: its first indented
    code block, split as a shell would. Raises AssertionError naming what is missing."""
    lines = readme.read_text().splitlines()
    try:
        start = lines.index(README_SECTION)
    except ValueError:
        raise AssertionError(f"{readme}: no section {README_SECTION!r}") from None
    block: list[str] = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("    ") and line.strip():
            block.append(line.strip())
        elif block:
            break  # the first code block ended
    if not block:
        raise AssertionError(f"{readme}: no indented code block under {README_SECTION!r}")
    return shlex.split(" ".join(block))


def chart_args(
    pool: str, namespace: str, *, ha: bool = False, template: tuple[str, ...] | list[str] = CHART_ARGS
) -> list[str]:
    """The chart's vector for this pool and namespace; with `ha`, as it renders several replicas."""
    args = [pool if a == "NAME" else namespace if a == "NS" else a for a in template]
    if ha:
        after_config = args.index("--config-file") + 2
        args.insert(after_config, HA_FLAG)
    return args


def chart_probes(*, ha: bool = False, port: int = HEALTH_PORT) -> dict[str, dict[str, Any]]:
    """The chart's livenessProbe and readinessProbe."""
    liveness, readiness = ("liveness", "readiness") if ha else ("inference-extension", "inference-extension")
    return {
        "livenessProbe": {
            "grpc": {"port": port, "service": liveness},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
        },
        "readinessProbe": {"grpc": {"port": port, "service": readiness}, "periodSeconds": 2},
    }
