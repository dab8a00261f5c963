"""Short-lived credentials from a kubeconfig exec plugin are refreshed in the background; a plugin
that fails once is logged, counted and retried (the refresher is supervised), and the next good
token is the one requests carry."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import yaml

from epp.discovery import kubeclient
from epp.discovery.kubeclient import KubeClient, KubeConfigSource
from epp.supervision import RestartBackoff, Supervisor, use_supervisor

# Prints token-<n> on its n-th run, and fails on its second run.
PLUGIN = """\
import json, pathlib, sys
counter = pathlib.Path(sys.argv[1])
n = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(n))
if n == 2:
    sys.exit("credential service unavailable")
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": {"token": f"token-{n}"}}))
"""


def exec_kubeconfig(tmp_path: Path) -> tuple[Path, Path]:
    plugin, counter = tmp_path / "plugin.py", tmp_path / "runs"
    plugin.write_text(PLUGIN)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [
            {
                "name": "u",
                "user": {
                    "exec": {
                        "apiVersion": "client.authentication.k8s.io/v1",
                        "command": sys.executable,
                        "args": [str(plugin), str(counter)],
                        "interactiveMode": "Never",
                    }
                },
            }
        ],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path, counter


async def test_a_failing_credential_plugin_is_retried_and_the_next_token_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kubeclient, "TOKEN_REFRESH_INTERVAL_S", 0.05)
    path, counter = exec_kubeconfig(tmp_path)
    supervisor = Supervisor(backoff=RestartBackoff(initial_s=0.01, max_s=0.05))
    with use_supervisor(supervisor):
        client = KubeClient(KubeConfigSource(str(path)))
        api = await client.api()
    try:
        assert api.configuration.api_key["BearerToken"].endswith("token-1")
        async with asyncio.timeout(10):
            while not api.configuration.api_key["BearerToken"].endswith("token-3"):
                await asyncio.sleep(0.02)
        # The second run failed: counted as a restart of the refresher, which went on.
        assert supervisor.restarts == {"kube-token-refresh": 1}
        assert int(counter.read_text()) >= 3
    finally:
        await client.close()
