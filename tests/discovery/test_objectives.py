"""InferenceObjectives: the file form, and the watch against a loopback API server (list, then
ADDED / MODIFIED / DELETED; only objectives whose poolRef names our pool count)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from epp.discovery.kubeclient import KubeClient, resolve_config_source
from epp.discovery.objectives import ObjectiveStore, ObjectiveWatcher, load_objectives_file
from epp.errors import ConfigError
from tests.support.epp_app import wait_until
from tests.support.kube_api import KubeApiServer, Resource

OBJECTIVES = Resource("llm-d.ai", "v1alpha2", "inferenceobjectives", "InferenceObjective")


def objective(
    name: str, priority: int | None, pool: str = "pool", group: str | None = None
) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": pool}
    if group is not None:
        ref["group"] = group
    spec: dict[str, Any] = {"poolRef": ref}
    if priority is not None:
        spec["priority"] = priority
    return {"metadata": {"name": name, "namespace": "default"}, "spec": spec}


def test_priority_from_either_header_and_defaults() -> None:
    store = ObjectiveStore()
    store.replace({"chat": 10, "batch": -1, "plain": None})
    assert store.priority({"x-llm-d-inference-objective": "chat"}) == 10
    assert store.priority({"x-gateway-inference-objective": "batch"}) == -1
    assert store.priority({"x-llm-d-inference-objective": "plain"}) == 0  # priority unset: 0
    assert store.priority({"x-llm-d-inference-objective": "unknown"}) == 0
    assert store.priority({}) == 0
    assert store.has_negative
    store.delete("batch")
    assert not store.has_negative


def test_objectives_file(tmp_path: Path) -> None:
    path = tmp_path / "o.yaml"
    path.write_text("kind: InferenceObjective\nmetadata: {name: a}\nspec: {priority: 3}\n---\n")
    assert load_objectives_file(str(path)) == {"a": 3}
    path.write_text("kind: InferenceObjective\nmetadata: {name: a}\nspec: {priority: high}\n")
    with pytest.raises(ConfigError, match=r"spec\.priority must be an integer"):
        load_objectives_file(str(path))
    path.write_text("kind: InferencePool\nmetadata: {name: a}\n")
    with pytest.raises(ConfigError, match="expected kind InferenceObjective"):
        load_objectives_file(str(path))
    with pytest.raises(ConfigError, match="no-such-file"):
        load_objectives_file(str(tmp_path / "no-such-file"))
    for bad, message in [
        ("kind: InferenceObjective\nmetadata: [x]\n", "metadata must be a mapping"),
        ("kind: InferenceObjective\nmetadata: {name: a}\nspec: [x]\n", "spec must be a mapping"),
    ]:
        path.write_text(bad)
        with pytest.raises(ConfigError, match=message):
            load_objectives_file(str(path))
    # An error message shows a little of a document, without writing it all out first.
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    path.write_text(laughs)
    with pytest.raises(ConfigError, match="expected kind InferenceObjective") as err:
        load_objectives_file(str(path))
    assert len(str(err.value)) < 300


def test_objectives_past_the_bound_are_ignored_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from epp.discovery import objectives

    monkeypatch.setattr(objectives, "MAX_OBJECTIVES", 2)
    store = ObjectiveStore()
    store.replace({"a": 1, "b": 2, "c": 3})
    store.put("d", 4)
    assert len(store) == 2
    assert "1 InferenceObjectives ignored: at most 2" in caplog.text
    assert "InferenceObjective 'd' ignored: already 2 held" in caplog.text


async def test_watch_follows_the_pools_objectives(tmp_path: Path) -> None:
    api = await KubeApiServer(resources=[OBJECTIVES]).start()
    client = KubeClient(resolve_config_source(api.write_kubeconfig(tmp_path / "kubeconfig")))
    store = ObjectiveStore()
    api.put(OBJECTIVES, objective("chat", 10))
    api.put(OBJECTIVES, objective("other-pool", 5, pool="elsewhere"))
    api.put(OBJECTIVES, objective("other-group", 5, group="inference.networking.x-k8s.io"))
    watcher = ObjectiveWatcher(client, "default", "pool", "inference.networking.k8s.io", store)
    task = asyncio.get_running_loop().create_task(watcher.reflector.run())
    try:
        await wait_until(lambda: len(store) == 1, what="the listed objective")
        assert store.priority({"x-llm-d-inference-objective": "chat"}) == 10
        api.put(OBJECTIVES, objective("batch", -5))
        await wait_until(lambda: store.has_negative, what="the added sheddable objective")
        api.put(OBJECTIVES, objective("chat", 20))
        await wait_until(
            lambda: store.priority({"x-llm-d-inference-objective": "chat"}) == 20, what="the new priority"
        )
        api.put(OBJECTIVES, objective("chat", 20, pool="elsewhere"))  # moved to another pool
        await wait_until(lambda: len(store) == 1, what="the moved objective gone")
        api.delete(OBJECTIVES, "batch")
        await wait_until(lambda: len(store) == 0, what="the deleted objective gone")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
        await api.stop()


def test_check_config_reads_the_objectives_file(tmp_path: Path) -> None:
    bad = tmp_path / "objectives.yaml"
    bad.write_text("kind: InferenceObjective\nmetadata: {name: a}\nspec: {priority: 1.5}\n")
    result = subprocess.run(
        [sys.executable, "-m", "epp", "--check-config", "--inference-objectives-file", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "spec.priority must be an integer" in result.stderr
