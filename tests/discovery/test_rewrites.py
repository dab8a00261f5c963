"""InferenceModelRewrites: precedence (exact over generic, oldest object first, first rule in an
object), weighted choice, the file form and its errors, and the watch against a loopback API
server (list, then ADDED / MODIFIED / DELETED; only rewrites whose poolRef names our pool;
invalid objects skipped)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from epp.discovery.kubeclient import KubeClient, resolve_config_source
from epp.discovery.rewrites import (
    MAX_REWRITES,
    MAX_TARGETS,
    RewriteStore,
    RewriteWatcher,
    load_rewrites_file,
    parse_rewrite,
)
from epp.errors import ConfigError
from tests.support.epp_app import RunningEpp, wait_until
from tests.support.extproc_client import one_request, request_headers
from tests.support.kube_api import (
    PODS,
    POOLS_V1,
    KubeApiServer,
    Resource,
    inference_pool,
    pod,
    running_k8s_epp,
)

TO_T = {"targets": [{"modelRewrite": "t"}]}
REWRITES = Resource("llm-d.ai", "v1alpha2", "inferencemodelrewrites", "InferenceModelRewrite")


def rule(targets: dict[str, int | None], *models: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "targets": [
            {"modelRewrite": t} if w is None else {"modelRewrite": t, "weight": w} for t, w in targets.items()
        ]
    }
    if models:
        out["matches"] = [{"model": {"type": "Exact", "value": m}} for m in models]
    return out


def rewrite(
    name: str, *rules: dict[str, Any], pool: str = "pool", created: str | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "default"}
    if created is not None:
        meta["creationTimestamp"] = created
    return {"metadata": meta, "spec": {"poolRef": {"name": pool}, "rules": list(rules)}}


def target(store: RewriteStore, model: str) -> str | None:
    found = store.rule_for(model)
    return found.choose(random.Random(0)) if found is not None else None


def test_exact_beats_generic_and_the_oldest_object_wins() -> None:
    store = RewriteStore()
    store.replace(
        [
            parse_rewrite(rewrite("fallback", rule({"base": None}), created="2025-01-01T00:00:00Z")),
            parse_rewrite(rewrite("newer", rule({"lora-v2": None}, "lora"), created="2025-03-01T00:00:00Z")),
            parse_rewrite(
                rewrite(
                    "older",
                    rule({"lora-v1": None}, "lora", "alias"),
                    rule({"never": None}, "lora"),  # a later rule of the same object loses
                    created="2025-02-01T00:00:00Z",
                )
            ),
        ]
    )
    assert target(store, "lora") == "lora-v1"
    assert target(store, "alias") == "lora-v1"  # any match of a rule matches
    assert target(store, "unknown") == "base"  # the generic fallback
    store.delete("older")
    assert target(store, "lora") == "lora-v2"
    assert target(store, "alias") == "base"
    store.delete("fallback")
    assert target(store, "unknown") is None


def test_a_change_that_changes_nothing_is_not_indexed_again_and_the_matches_are_bounded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The index is rebuilt on the event loop at each change: a status-only update costs nothing,
    and the objects together match at most MAX_TOTAL_MATCHES models."""
    from epp.discovery import rewrites

    monkeypatch.setattr(rewrites, "MAX_TOTAL_MATCHES", 5)
    store = RewriteStore()
    builds = 0
    index = store._index

    def counting() -> None:
        nonlocal builds
        builds += 1
        index()

    monkeypatch.setattr(store, "_index", counting)
    three = parse_rewrite(rewrite("three", rule({"t": None}, "a", "b", "c")))
    store.put(three)
    store.put(parse_rewrite(rewrite("three", rule({"t": None}, "a", "b", "c"))))  # the same again
    assert builds == 1
    store.put(parse_rewrite(rewrite("more", rule({"t": None}, "d", "e", "f"))))  # 6 > 5
    assert builds == 1 and len(store) == 1 and target(store, "d") is None
    assert "would match more than 5 models" in caplog.text
    store.put(parse_rewrite(rewrite("two", rule({"t": None}, "d", "e"))))
    assert builds == 2 and target(store, "e") == "t"
    store.delete("three")
    store.put(parse_rewrite(rewrite("more", rule({"t": None}, "x", "y", "z"))))  # room again
    assert target(store, "z") == "t"


def test_weighted_split_follows_the_weights() -> None:
    """Each target's share of 10,000 seeded draws is within 2 points of its weight's share, and a
    target without a weight among weighted ones is never chosen (as upstream)."""
    store = RewriteStore()
    store.put(parse_rewrite(rewrite("canary", rule({"v1": 90, "v2": 10}, "m"), rule({"a": None, "b": None}))))
    rng = random.Random(7)
    draws = 10_000
    split = store.rule_for("m")
    assert split is not None
    counts = Counter(split.choose(rng) for _ in range(draws))
    assert set(counts) == {"v1", "v2"}
    assert abs(counts["v2"] / draws - 0.10) < 0.02
    even = store.rule_for("other")
    assert even is not None
    counts = Counter(even.choose(rng) for _ in range(draws))
    assert abs(counts["a"] / draws - 0.5) < 0.02
    mixed = parse_rewrite(rewrite("mixed", rule({"weighted": 1, "unweighted": None}))).rules[0]
    assert {mixed.choose(rng) for _ in range(200)} == {"weighted"}


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"rules": [{"matches": []}]}, r"rules\[0\]\.targets: at least one target"),
        ({"rules": [rule({"t": 0})]}, r"weight must be an integer from 1 to 1000000"),
        ({"rules": [rule({"t": True})]}, r"weight must be an integer"),
        ({"rules": [{"targets": [{"weight": 1}]}]}, r"modelRewrite must be a non-empty string"),
        (
            {"rules": [{"matches": [{"model": {"type": "Prefix", "value": "m"}}], **TO_T}]},
            r"type must be Exact",
        ),
        ({"rules": [{"matches": [{"model": {"value": ""}}], **TO_T}]}, r"value must be"),
        ({"rules": [{"matches": [{}], **TO_T}]}, r"model is required"),
        ({"poolRef": {"name": "p"}}, r"spec\.rules is required"),
        ({"rules": "everything"}, r"spec\.rules must be a list"),
        ({"rules": [rule({f"t{i}": None for i in range(MAX_TARGETS + 1)})]}, rf"at most {MAX_TARGETS}"),
    ],
)
def test_invalid_rewrites_say_what_is_wrong(spec: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_rewrite({"metadata": {"name": "bad"}, "spec": spec})


def test_rewrites_file(tmp_path: Path) -> None:
    path = tmp_path / "rewrites.yaml"
    path.write_text(
        "apiVersion: llm-d.ai/v1alpha2\nkind: InferenceModelRewrite\n"
        "metadata: {name: first, creationTimestamp: '2021-01-01T00:00:00Z'}\n"
        "spec:\n  poolRef: {name: p}\n  rules:\n  - targets: [{modelRewrite: a}]\n---\n"
        # Upstream's docs still show the older group; an unquoted timestamp is a YAML datetime.
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModelRewrite\n"
        "metadata: {name: second, creationTimestamp: 2020-01-01T00:00:00Z}\n"
        "spec:\n  rules:\n  - targets: [{modelRewrite: b}]\n"
    )
    store = RewriteStore()
    store.replace(load_rewrites_file(str(path)))
    assert target(store, "x") == "b"  # the older object wins (without timestamps: the first)
    path.write_text("kind: InferenceModelRewrite\nmetadata: {name: a}\nspec: {rules: [{matches: []}]}\n")
    with pytest.raises(ConfigError, match=r"document 1: InferenceModelRewrite a: spec\.rules\[0\]\.targets"):
        load_rewrites_file(str(path))
    path.write_text("kind: InferenceObjective\nmetadata: {name: a}\n")
    with pytest.raises(ConfigError, match="expected kind InferenceModelRewrite"):
        load_rewrites_file(str(path))
    path.write_text("apiVersion: v1\nkind: InferenceModelRewrite\nmetadata: {name: a}\n")
    with pytest.raises(ConfigError, match=r"apiVersion 'v1' is not one of llm-d\.ai/v1alpha2"):
        load_rewrites_file(str(path))
    path.write_text("kind: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_rewrites_file(str(path))
    many = "".join(
        f"---\nkind: InferenceModelRewrite\nmetadata: {{name: r{i}}}\nspec: {{rules: []}}\n"
        for i in range(MAX_REWRITES + 1)
    )
    path.write_text(many)
    with pytest.raises(ConfigError, match=f"more than {MAX_REWRITES} InferenceModelRewrites"):
        load_rewrites_file(str(path))
    with pytest.raises(ConfigError, match="no-such-file"):
        load_rewrites_file(str(tmp_path / "no-such-file"))


def test_without_timestamps_the_first_in_the_file_wins(tmp_path: Path) -> None:
    path = tmp_path / "rewrites.yaml"
    path.write_text(
        "".join(
            f"---\nkind: InferenceModelRewrite\nmetadata: {{name: {name}}}\n"
            f"spec: {{rules: [{{targets: [{{modelRewrite: {name}}}]}}]}}\n"
            for name in ("zeta", "alpha")
        )
    )
    store = RewriteStore()
    store.replace(load_rewrites_file(str(path)))
    assert target(store, "x") == "zeta"


async def test_watch_follows_the_pools_rewrites(tmp_path: Path) -> None:
    api = await KubeApiServer(resources=[REWRITES]).start()
    client = KubeClient(resolve_config_source(api.write_kubeconfig(tmp_path / "kubeconfig")))
    store = RewriteStore()
    api.put(REWRITES, rewrite("alias", rule({"m-v1": None}, "m")))
    api.put(REWRITES, rewrite("other-pool", rule({"x": None}), pool="elsewhere"))
    api.put(REWRITES, rewrite("broken", {"matches": []}))  # no target: skipped, the watch goes on
    watcher = RewriteWatcher(client, "default", "pool", "inference.networking.k8s.io", store)
    task = asyncio.get_running_loop().create_task(watcher.reflector.run())
    try:
        await wait_until(lambda: len(store) == 1, what="the listed rewrite")
        assert target(store, "m") == "m-v1"
        assert target(store, "unknown") is None  # the other pool's generic rule is not ours
        api.put(REWRITES, rewrite("fallback", rule({"base": None})))
        await wait_until(lambda: target(store, "unknown") == "base", what="the added generic rule")
        api.put(REWRITES, rewrite("alias", rule({"m-v2": None}, "m")))
        await wait_until(lambda: target(store, "m") == "m-v2", what="the updated rule")
        api.put(REWRITES, rewrite("alias", {"matches": []}))  # updated to something invalid: dropped
        await wait_until(lambda: target(store, "m") == "base", what="the invalid update dropped")
        api.put(REWRITES, rewrite("alias", rule({"m-v3": None}, "m")))
        await wait_until(lambda: target(store, "m") == "m-v3", what="the valid again")
        api.put(REWRITES, rewrite("alias", rule({"m-v3": None}, "m"), pool="elsewhere"))  # moved away
        await wait_until(lambda: target(store, "m") == "base", what="the moved rewrite gone")
        api.delete(REWRITES, "fallback")
        await wait_until(lambda: len(store) == 0, what="the deleted rewrite gone")
        assert target(store, "m") is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
        await api.stop()


def test_a_bad_rewrites_file_stops_epp_and_check_config(tmp_path: Path) -> None:
    bad = tmp_path / "rewrites.yaml"
    bad.write_text("kind: InferenceModelRewrite\nmetadata: {name: a}\nspec: {rules: [{targets: []}]}\n")
    flags = ["--inference-model-rewrites-file", str(bad)]
    serve = ["--endpoints", "127.0.0.1:9", "--secure-serving=false", "--grpc-port", "0"]
    serve += ["--grpc-health-port", "0", "--metrics-port", "0"]
    for argv in (["--check-config", *flags], [*serve, *flags]):
        result = subprocess.run(
            [sys.executable, "-m", "epp", *argv], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 1, argv
        assert "spec.rules[0].targets: at least one target is required" in result.stderr


async def test_epp_in_kubernetes_rewrites_by_the_watched_objects(tmp_path: Path) -> None:
    """The whole app with --pool-name: the rewrites it watches decide the model it forwards."""
    api = await KubeApiServer(resources=[PODS, POOLS_V1, REWRITES]).start()
    api.put(POOLS_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    api.put(PODS, pod("a", "127.0.1.1", {"app": "vllm"}))
    api.put(REWRITES, rewrite("alias", rule({"m-v1": None}, "m")))
    body = orjson.dumps({"model": "m", "prompt": "hello"})

    async def forwarded_model(epp: RunningEpp) -> str:
        replies = await one_request(epp.stub, request_headers(), body)
        return str(
            orjson.loads(replies[-1].request_body.response.body_mutation.streamed_response.body)["model"]
        )

    try:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        async with running_k8s_epp(kubeconfig, "--pool-name", "pool") as epp:
            await wait_until(lambda: len(epp.app.rewrites) == 1 and bool(epp.app.datastore.endpoints()))
            assert await forwarded_model(epp) == "m-v1"
            api.put(REWRITES, rewrite("alias", rule({"m-v2": None}, "m")))
            await wait_until(lambda: target(epp.app.rewrites, "m") == "m-v2", what="the update")
            assert await forwarded_model(epp) == "m-v2"
    finally:
        await api.stop()
