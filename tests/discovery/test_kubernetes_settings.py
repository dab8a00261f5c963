"""Flags for Kubernetes discovery and HA, and where the client configuration comes from."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from epp.discovery.kubeclient import KubeConfigSource, resolve_config_source
from epp.discovery.leader import default_identity
from epp.discovery.pool import default_namespace
from epp.discovery.selector import Selector
from epp.errors import KubeConfigError
from epp.settings import parse_settings


def run_epp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epp", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_pool_mode_flags_and_defaults() -> None:
    s = parse_settings(["--pool-name", "llama", "--pool-namespace", "llm"])
    assert s.uses_kubernetes and s.pool_name == "llama" and s.pool_namespace == "llm"
    assert s.pool_group == "inference.networking.k8s.io"
    assert s.metrics_pool_name == "llama"
    assert not s.ha_enable_leader_election
    assert (s.ha_lease_duration_s, s.ha_renew_deadline_s, s.ha_retry_period_s) == (15.0, 10.0, 2.0)
    old = parse_settings(["--pool-name", "p", "--pool-group", "inference.networking.x-k8s.io"])
    assert old.pool_group == "inference.networking.x-k8s.io"
    # Go-style single-dash flags, as Go EPP manifests write them.
    assert parse_settings(["-pool-name=p", "-ha-enable-leader-election"]).ha_enable_leader_election
    sel = parse_settings(
        ["--endpoint-selector", "app=vllm, tier=gpu", "--endpoint-target-ports", "8000,8001"]
    )
    assert sel.endpoint_selector == Selector.from_labels({"app": "vllm", "tier": "gpu"})
    assert sel.endpoint_target_ports == (8000, 8001)
    assert sel.uses_kubernetes and sel.metrics_pool_name == "standalone"
    standalone = parse_settings(["--endpoints", "a:1"])
    assert not standalone.uses_kubernetes and standalone.metrics_pool_name == "standalone"


def test_namespace_and_pod_name_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """NAMESPACE and POD_NAME, as the chart sets them from the Downward API and Go reads them."""
    env = {"NAMESPACE": "llm", "POD_NAME": "router-epp-7d9f8b6c5d-x2k4q"}
    s = parse_settings(["--pool-name", "p"], environ=env)
    assert s.pool_namespace == "llm"  # no --pool-namespace: $NAMESPACE
    assert (s.namespace_env, s.pod_name_env) == ("llm", "router-epp-7d9f8b6c5d-x2k4q")
    assert (
        parse_settings(["--pool-name", "p", "--pool-namespace", "other"], environ=env).pool_namespace
        == "other"
    )
    standalone = ["--endpoint-selector", "app=vllm", "--endpoint-target-ports", "8000"]
    assert parse_settings(standalone, environ=env).pool_namespace == "llm"
    unset = parse_settings(["--pool-name", "p"], environ={"NAMESPACE": ""})
    assert unset.namespace_env is None and unset.pod_name_env is None
    # The leader-election identity: <pod>_<uuid>, as client-go writes it (a pod's hostname is its name).
    first, second = (
        default_identity("router-epp-7d9f8b6c5d-x2k4q"),
        default_identity("router-epp-7d9f8b6c5d-x2k4q"),
    )
    assert first.startswith("router-epp-7d9f8b6c5d-x2k4q_") and first != second  # fresh per start
    monkeypatch.setenv("POD_NAME", "from-env")
    assert default_identity().startswith("from-env_")
    monkeypatch.delenv("POD_NAME")
    assert default_identity().startswith(socket.gethostname() + "_")


def test_pool_namespace_defaults_to_the_service_account_namespace(tmp_path: Path) -> None:
    assert default_namespace(tmp_path / "missing") == "default"
    ns_file = tmp_path / "namespace"
    ns_file.write_text("inference\n")
    assert default_namespace(ns_file) == "inference"
    ns_file.write_text("")
    assert default_namespace(ns_file) == "default"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no endpoints"),
        (["--pool-name", "p", "--endpoints", "a:1"], "one discovery mode"),
        (
            ["--pool-name", "p", "--endpoint-selector", "a=b", "--endpoint-target-ports", "1"],
            "one discovery mode",
        ),
        (["--endpoint-selector", "app=x"], "needs --endpoint-target-ports"),
        (["--endpoint-target-ports", "8000"], "goes with --endpoint-selector"),
        (
            ["--endpoint-selector", "app in vllm", "--endpoint-target-ports", "8000"],
            'invalid endpoint-selector "app in vllm": unable to parse requirement',
        ),
        (["--endpoint-selector", "a=b", "--endpoint-target-ports", "80,x"], "not a port number"),
        (["--endpoint-selector", "a=b", "--endpoint-target-ports", "1,2,3,4,5,6,7,8,9"], "1-8"),
        (["--pool-name", "p", "--pool-group", "example.com"], "--pool-group"),
        (["--endpoints", "a:1", "--ha-enable-leader-election"], "needs Kubernetes discovery"),
        (["--pool-name", "p", "--ha-renew-deadline", "20s"], "--ha-renew-deadline < --ha-lease-duration"),
        (["--pool-name", "p", "--kubeconfig", "/nonexistent/kubeconfig"], "no such file"),
    ],
)
def test_bad_discovery_flags_exit_with_one_line(args: list[str], message: str) -> None:
    result = run_epp(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_no_cluster_and_no_kubeconfig_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env["HOME"] = str(tmp_path)  # no ~/.kube/config
    result = run_epp("--pool-name", "p", env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "epp: error: no Kubernetes client config: not running in a cluster (KUBERNETES_SERVICE_HOST is "
        "unset) and no ~/.kube/config; give --kubeconfig PATH or set KUBECONFIG"
    ]
    bad = tmp_path / "broken.yaml"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")  # no current-context
    result = run_epp("--pool-name", "p", "--kubeconfig", str(bad), env=env)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "current-context" in result.stderr
    # --check-config needs no discovery and no cluster.
    assert run_epp("--check-config", env=env).returncode == 0


def test_config_source_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    flag, env_file, home_file = tmp_path / "flag", tmp_path / "env", tmp_path / ".kube" / "config"
    for f in (flag, env_file, home_file):
        f.parent.mkdir(exist_ok=True)
        f.write_text("{}")
    in_cluster = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    both = {**in_cluster, "KUBECONFIG": f"/missing{os.pathsep}{env_file}"}
    assert resolve_config_source(flag, both) == KubeConfigSource(str(flag))
    assert resolve_config_source(None, both) == KubeConfigSource(both["KUBECONFIG"])
    assert resolve_config_source(None, in_cluster) == KubeConfigSource(None)
    assert resolve_config_source(None, {}) == KubeConfigSource(str(home_file))
    with pytest.raises(KubeConfigError, match="KUBECONFIG"):
        resolve_config_source(None, {"KUBECONFIG": "/missing"})
