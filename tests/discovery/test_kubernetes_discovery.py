"""Kubernetes discovery against a loopback API server: kubernetes-asyncio, unmodified, on the wire.

Each scenario changes cluster objects the way controllers and the kubelet would, then asserts
what a user of epp sees: the endpoint set (keys and names) and the gRPC health status.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from kubernetes_asyncio.client import CoreV1Api

from epp.discovery.kubeclient import KubeClient, raw_response, resolve_config_source
from epp.discovery.kubernetes import (
    KubernetesDiscovery,
    PodView,
    active_ports,
    desired_endpoints,
    pod_endpoints,
    pod_view,
)
from epp.discovery.pool import PoolSpec, parse_pool
from epp.discovery.reflector import Backoff, Reflector
from epp.errors import PoolSpecError
from tests.support.epp_app import wait_until
from tests.support.extproc_client import one_request, request_headers
from tests.support.fake_vllm import FakeVllm
from tests.support.kube_api import (
    PODS,
    POOLS_V1,
    POOLS_V1ALPHA2,
    KubeApiServer,
    endpoint_keys,
    endpoint_view,
    health,
    inference_pool,
    pod,
    running_k8s_epp,
    wait_for_health,
)

APP = {"app": "vllm"}


@pytest.fixture
async def api() -> AsyncIterator[KubeApiServer]:
    server = await KubeApiServer().start()
    yield server
    await server.stop()


# -- the pure rules ----------------------------------------------------------------------------


def test_pool_shapes_v1_and_v1alpha2() -> None:
    v1 = parse_pool(inference_pool("p", {"app": "x"}, [8000, 8001]))
    assert v1 == PoolSpec({"app": "x"}, (8000, 8001))
    old = parse_pool(inference_pool("p", {"app": "x"}, [9000], resource=POOLS_V1ALPHA2))
    assert old == PoolSpec({"app": "x"}, (9000,))
    assert v1.label_selector() == "app=x"
    for bad_spec, message in [
        ({"selector": {"matchLabels": {}}, "targetPorts": [{"number": 1}]}, "non-empty"),
        ({"selector": {"matchLabels": {"a": "b"}}, "targetPorts": []}, "1-8"),
        ({"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 70000}]}, "1-65535"),
        ({"selector": {"a": "b"}}, "neither"),
    ]:
        with pytest.raises(PoolSpecError, match=message):
            parse_pool({"metadata": {"name": "p"}, "spec": bad_spec})


def test_pod_rules() -> None:
    pool = PoolSpec({"app": "vllm"}, (8000, 8001))
    ready = pod_view(pod("a", "127.0.1.1", {"app": "vllm", "llm-d.ai/role": "decode"}))
    assert [(e.key, e.name, e.role) for e in pod_endpoints(pool, ready)] == [
        ("127.0.1.1:8000", "a:8000", "decode"),
        ("127.0.1.1:8001", "a:8001", "decode"),
    ]
    single = PoolSpec({"app": "vllm"}, (8000,))
    assert [e.name for e in pod_endpoints(single, ready)] == ["a"]
    # The Go EPP's name for each (its session tokens carry it): the port's index in the pool.
    namespace = ready.namespace
    assert [e.go_id for e in pod_endpoints(pool, ready)] == [f"{namespace}/a-rank-0", f"{namespace}/a-rank-1"]
    # The pod's own name, which the Go EPP's scheduling-attempt series carry (the port beside it).
    assert [e.pod_name for e in pod_endpoints(pool, ready)] == ["a", "a"]
    # Not ready, being deleted, no IP, labels not matching: no endpoint.
    for obj in (
        pod("b", "127.0.1.2", APP, ready=False),
        pod("b", "127.0.1.2", APP, deleting=True),
        pod("b", "", APP),
        pod("b", "127.0.1.2", {"app": "other"}),
    ):
        assert pod_endpoints(pool, pod_view(obj)) == []
    no_conditions = pod("c", "127.0.1.3", APP)
    del no_conditions["status"]["conditions"]
    assert pod_endpoints(pool, pod_view(no_conditions)) == []
    # The active-ports annotation narrows the pool's ports; unknown or bad entries are ignored.
    assert active_ports(None, (8000, 8001)) == (8000, 8001)
    assert active_ports("8001", (8000, 8001)) == (8001,)
    assert active_ports(" 8001, 9999, x", (8000, 8001)) == (8001,)
    assert active_ports("", (8000, 8001)) == ()
    legacy = pod("d", "127.0.1.4", APP, annotations={"inference.networking.k8s.io/active-ports": "8000"})
    assert [e.port for e in pod_endpoints(pool, pod_view(legacy))] == [8000]
    # IPv6 pod IPs are bracketed in the key Envoy gets.
    v6 = pod_view(pod("e", "fd00::5", APP))
    assert [e.key for e in pod_endpoints(single, v6)] == ["[fd00::5]:8000"]
    assert desired_endpoints(None, [ready]) == []
    views = [ready, pod_view(pod("f", "127.0.1.6", APP))]
    assert [e.key for e in desired_endpoints(single, views)] == ["127.0.1.1:8000", "127.0.1.6:8000"]
    assert isinstance(views[0], PodView)


# -- scenarios against the API server --------------------------------------------------------


async def test_pods_ready_unready_deleted_relabelled_reipd(api: KubeApiServer, kubeconfig: Path) -> None:
    api.put(POOLS_V1, inference_pool("pool", APP, [8000]))
    api.put(PODS, pod("a", "127.0.1.1", APP))
    api.put(PODS, pod("b", "127.0.1.2", APP, ready=False))
    api.put(PODS, pod("c", "127.0.1.3", {"app": "other"}))
    async with running_k8s_epp(kubeconfig, "--pool-name", "pool") as epp:
        await wait_for_health(epp, "SERVING")
        assert endpoint_view(epp) == {"127.0.1.1:8000": "a"}
        # The selector is applied by the API server.
        assert {r.query.get("labelSelector") for r in api.lists(PODS)} == {"app=vllm"}
        a = epp.app.datastore.get("127.0.1.1:8000")
        assert a is not None

        api.put(PODS, pod("b", "127.0.1.2", APP))  # becomes ready
        await wait_until(lambda: endpoint_keys(epp) == {"127.0.1.1:8000", "127.0.1.2:8000"}, what="b ready")

        # A label change within the selector updates the endpoint in place (same object, metrics kept).
        api.put(PODS, pod("a", "127.0.1.1", {**APP, "llm-d.ai/role": "decode"}))
        await wait_until(lambda: a.role == "decode", what="a relabelled")
        assert epp.app.datastore.get("127.0.1.1:8000") is a

        api.put(PODS, pod("b", "127.0.1.2", APP, ready=False))  # becomes unready
        await wait_until(lambda: endpoint_keys(epp) == {"127.0.1.1:8000"}, what="b unready")

        api.put(PODS, pod("c", "127.0.1.3", APP))  # relabelled into the pool
        api.put(PODS, pod("b", "127.0.1.2", {"app": "retired"}))  # relabelled out, ready again
        await wait_until(lambda: endpoint_keys(epp) == {"127.0.1.1:8000", "127.0.1.3:8000"}, what="relabels")

        api.put(PODS, pod("c", "127.0.1.33", APP))  # same pod, new IP: the endpoint is replaced
        await wait_until(lambda: endpoint_keys(epp) == {"127.0.1.1:8000", "127.0.1.33:8000"}, what="re-IP")
        assert endpoint_view(epp)["127.0.1.33:8000"] == "c"

        api.put(PODS, pod("a", "127.0.1.1", APP, deleting=True))  # terminating
        await wait_until(lambda: endpoint_keys(epp) == {"127.0.1.33:8000"}, what="a terminating")
        api.delete(PODS, "a")
        api.delete(PODS, "c")
        await wait_until(lambda: endpoint_keys(epp) == set(), what="all deleted")
        # An existing pool with no ready pod is still a complete, synced view: ready (requests 503).
        assert await health(epp) == "SERVING"
        assert len(api.lists(PODS)) == 1  # all of it from one list and its watch


async def test_pool_selector_and_ports_changes_resync(api: KubeApiServer, kubeconfig: Path) -> None:
    api.put(POOLS_V1, inference_pool("pool", APP, [8000]))
    api.put(PODS, pod("a", "127.0.1.1", APP))
    api.put(PODS, pod("b", "127.0.1.2", {**APP, "tier": "big"}))
    api.put(PODS, pod("c", "127.0.1.3", {"app": "other", "tier": "big"}))
    async with running_k8s_epp(kubeconfig, "--pool-name", "pool") as epp:
        await wait_for_health(epp, "SERVING")
        assert endpoint_keys(epp) == {"127.0.1.1:8000", "127.0.1.2:8000"}
        b = epp.app.datastore.get("127.0.1.2:8000")

        api.put(POOLS_V1, inference_pool("pool", {"tier": "big"}, [8000]))  # selector change
        await wait_until(
            lambda: endpoint_keys(epp) == {"127.0.1.2:8000", "127.0.1.3:8000"}, what="new selector"
        )
        assert epp.app.datastore.get("127.0.1.2:8000") is b  # kept across the resync
        assert [r.query.get("labelSelector") for r in api.lists(PODS)] == ["app=vllm", "tier=big"]
        await wait_until(lambda: api.open_watches(PODS) == 1, what="old pod watch closed")

        api.put(POOLS_V1, inference_pool("pool", {"tier": "big"}, [8000, 8001]))  # ports change
        await wait_until(lambda: len(endpoint_keys(epp)) == 4, what="second port")
        assert endpoint_view(epp) == {
            "127.0.1.2:8000": "b:8000",
            "127.0.1.2:8001": "b:8001",
            "127.0.1.3:8000": "c:8000",
            "127.0.1.3:8001": "c:8001",
        }
        # A pod can narrow the pool's ports to those it actually serves.
        api.put(PODS, pod("b", "127.0.1.2", {"tier": "big"}, annotations={"llm-d.ai/active-ports": "8001"}))
        await wait_until(lambda: "127.0.1.2:8000" not in endpoint_keys(epp), what="active-ports")
        assert endpoint_keys(epp) == {"127.0.1.2:8001", "127.0.1.3:8000", "127.0.1.3:8001"}

        api.put(POOLS_V1, inference_pool("pool", {"tier": "big"}, [8002]))
        await wait_until(lambda: endpoint_view(epp) == {"127.0.1.3:8002": "c"}, what="port moved")
        assert await health(epp) == "SERVING"


async def test_pool_deleted_and_recreated(api: KubeApiServer, kubeconfig: Path) -> None:
    api.put(PODS, pod("a", "127.0.1.1", APP))
    async with running_k8s_epp(kubeconfig, "--pool-name", "pool") as epp:
        # No pool yet: nothing is known, so not ready.
        await wait_until(lambda: len(api.lists(POOLS_V1)) >= 1, what="pool listed")
        assert await health(epp) == "NOT_SERVING"
        assert await health(epp, "liveness") == "SERVING"

        api.put(POOLS_V1, inference_pool("pool", APP, [8000]))
        await wait_for_health(epp, "SERVING")
        assert endpoint_keys(epp) == {"127.0.1.1:8000"}

        api.delete(POOLS_V1, "pool")
        await wait_for_health(epp, "NOT_SERVING")
        assert endpoint_keys(epp) == set()
        await wait_until(lambda: api.open_watches(PODS) == 0, what="pod watch stopped")

        api.put(PODS, pod("b", "127.0.1.2", APP))  # changed while there was no pool
        api.put(POOLS_V1, inference_pool("pool", APP, [8000]))
        await wait_for_health(epp, "SERVING")
        assert endpoint_keys(epp) == {"127.0.1.1:8000", "127.0.1.2:8000"}


async def test_older_v1alpha2_pool_group(api: KubeApiServer, kubeconfig: Path) -> None:
    api.put(POOLS_V1ALPHA2, inference_pool("old", APP, [8000], namespace="llm", resource=POOLS_V1ALPHA2))
    api.put(PODS, pod("a", "127.0.1.1", APP, namespace="llm"))
    api.put(PODS, pod("z", "127.0.1.9", APP))  # same labels, other namespace
    flags = ("--pool-name", "old", "--pool-namespace", "llm", "--pool-group", "inference.networking.x-k8s.io")
    async with running_k8s_epp(kubeconfig, *flags) as epp:
        await wait_for_health(epp, "SERVING")
        assert endpoint_view(epp) == {"127.0.1.1:8000": "a"}
        assert api.lists(POOLS_V1ALPHA2)[0].query["fieldSelector"] == "metadata.name=old"


async def test_endpoint_selector_without_the_crd(tmp_path: Path) -> None:
    api = await KubeApiServer(resources=[PODS]).start()  # no InferencePool CRD installed
    try:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        api.put(PODS, pod("a", "127.0.1.1", {**APP, "llm-d.ai/role": "prefill"}))
        api.put(PODS, pod("b", "127.0.1.2", {"app": "other"}))
        flags = ("--endpoint-selector", "app=vllm", "--endpoint-target-ports", "8000,8001")
        async with running_k8s_epp(kubeconfig, *flags) as epp:
            await wait_for_health(epp, "SERVING")
            assert endpoint_view(epp) == {"127.0.1.1:8000": "a:8000", "127.0.1.1:8001": "a:8001"}
            assert {ep.role for ep in epp.app.datastore.endpoints()} == {"prefill"}
            api.put(PODS, pod("b", "127.0.1.2", APP))
            await wait_until(lambda: len(endpoint_keys(epp)) == 4, what="b selected")
        # --pool-name against a cluster without the CRD: the list is 404, never ready.
        async with running_k8s_epp(kubeconfig, "--pool-name", "pool") as epp:
            await wait_until(lambda: len(api.lists(POOLS_V1)) >= 2, what="pool list retried")
            assert await health(epp) == "NOT_SERVING"
    finally:
        await api.stop()


async def test_watch_dropped_mid_stream_relists_and_reconciles(api: KubeApiServer, kubeconfig: Path) -> None:
    api.put(POOLS_V1, inference_pool("pool", APP, [8000]))
    for i in range(1, 4):
        api.put(PODS, pod(f"p{i}", f"127.0.1.{i}", APP))
    async with running_k8s_epp(kubeconfig, "--pool-name", "pool") as epp:
        await wait_for_health(epp, "SERVING")
        await wait_until(lambda: api.open_watches(PODS) == 1, what="pod watch open")
        p2 = epp.app.datastore.get("127.0.1.2:8000")
        # Changes the open watch never delivers, then the connection drops.
        api.freeze_watches()
        api.delete(PODS, "p1")
        api.put(PODS, pod("p3", "127.0.1.3", APP, ready=False))
        api.put(PODS, pod("p4", "127.0.1.4", APP))
        await asyncio.sleep(0.1)
        assert endpoint_keys(epp) == {"127.0.1.1:8000", "127.0.1.2:8000", "127.0.1.3:8000"}  # not seen yet
        assert api.drop_watches() == 2  # pool and pods
        await wait_until(lambda: endpoint_keys(epp) == {"127.0.1.2:8000", "127.0.1.4:8000"}, what="relist")
        assert len(api.lists(PODS)) == 2
        assert epp.app.datastore.get("127.0.1.2:8000") is p2  # untouched endpoint kept its object
        assert await health(epp) == "SERVING"
        # And the new watch delivers again.
        api.put(PODS, pod("p5", "127.0.1.5", APP))
        await wait_until(lambda: "127.0.1.5:8000" in endpoint_keys(epp), what="watch after relist")


@pytest.mark.parametrize("as_http_status", [False, True], ids=["error-event", "http-410"])
async def test_410_gone_forces_a_relist(api: KubeApiServer, kubeconfig: Path, as_http_status: bool) -> None:
    api.gone_as_http_status = as_http_status
    api.put(POOLS_V1, inference_pool("pool", APP, [8000]))
    api.put(PODS, pod("p1", "127.0.1.1", APP))
    api.put(PODS, pod("p2", "127.0.1.2", APP))
    # One-second watches: the server ends them normally and epp resumes from its last version.
    async with running_k8s_epp(kubeconfig, "--pool-name", "pool", kube_watch_timeout_s=1.0) as epp:
        await wait_for_health(epp, "SERVING")
        await wait_until(lambda: api.open_watches(PODS) == 1, what="pod watch open")
        api.freeze_watches()
        api.delete(PODS, "p1")
        api.put(PODS, pod("p3", "127.0.1.3", APP))
        api.compact()  # the version epp will resume from is now too old
        await wait_until(lambda: len(api.lists(PODS)) == 2, timeout=5, what="relist after 410")
        assert api.gone_served >= 1
        await wait_until(
            lambda: endpoint_keys(epp) == {"127.0.1.2:8000", "127.0.1.3:8000"}, what="reconciled"
        )
        assert await health(epp) == "SERVING"


async def test_bookmarks_advance_the_resume_version(api: KubeApiServer, kubeconfig: Path) -> None:
    api.put(POOLS_V1, inference_pool("pool", APP, [8000]))
    api.put(PODS, pod("a", "127.0.1.1", APP))
    async with running_k8s_epp(kubeconfig, "--pool-name", "pool", kube_watch_timeout_s=1.0) as epp:
        await wait_for_health(epp, "SERVING")
        listed_at = int(api.rv)
        # Changes this watch does not select: only bookmarks tell epp the version moved on.
        for i in range(3):
            api.put(PODS, pod(f"x{i}", f"127.0.2.{i}", {"app": "other"}))
        newest = api.rv
        await wait_until(lambda: len(api.watches(PODS)) >= 2, timeout=5, what="watch renewed")
        watches = api.watches(PODS)
        assert all(w.query.get("allowWatchBookmarks") == "True" for w in watches)
        assert int(watches[0].query["resourceVersion"]) <= listed_at
        assert int(watches[1].query["resourceVersion"]) == newest  # resumed from the bookmark
        assert len(api.lists(PODS)) == 1  # a normal end is resumed, not relisted
        assert endpoint_keys(epp) == {"127.0.1.1:8000"}


async def test_api_server_down_at_start_and_while_running(api: KubeApiServer, kubeconfig: Path) -> None:
    api.put(POOLS_V1, inference_pool("pool", APP, [8000]))
    api.put(PODS, pod("a", "127.0.1.1", APP))
    await api.down()
    async with running_k8s_epp(kubeconfig, "--pool-name", "pool") as epp:
        await asyncio.sleep(0.5)  # several retries against a closed port
        assert await health(epp) == "NOT_SERVING"
        assert endpoint_keys(epp) == set()
        await api.up()
        await wait_for_health(epp, "SERVING")
        assert endpoint_keys(epp) == {"127.0.1.1:8000"}

        # Down after the first sync: the last known endpoints keep serving.
        await api.down()
        api.put(PODS, pod("b", "127.0.1.2", APP))
        await asyncio.sleep(0.5)
        assert await health(epp) == "SERVING"
        assert endpoint_keys(epp) == {"127.0.1.1:8000"}
        await api.up()
        await wait_until(lambda: endpoint_keys(epp) == {"127.0.1.1:8000", "127.0.1.2:8000"}, what="catch up")
        # The client authenticated with the kubeconfig's token throughout.
        assert {r.authorization for r in api.requests} == {"Bearer test-token"}


async def test_scraper_and_prefix_index_follow_the_pods(api: KubeApiServer, kubeconfig: Path) -> None:
    fake = await FakeVllm("a").start()
    try:
        api.put(POOLS_V1, inference_pool("pool", APP, [fake.port]))
        api.put(PODS, pod("a", "127.0.0.1", APP))
        api.put(PODS, pod("b", "127.0.0.2", APP))  # nothing listens there: scrapes fail, harmlessly
        async with running_k8s_epp(kubeconfig, "--pool-name", "pool") as epp:
            await wait_for_health(epp, "SERVING")
            a = epp.app.datastore.get(fake.address)
            assert a is not None
            await wait_until(lambda: a.metrics.updated_at > 0, what="pod scraped")

            # A request is routed to a discovered pod.
            body = orjson.dumps({"model": "m", "prompt": "hello " * 50})
            replies = await one_request(epp.stub, request_headers(), body)
            dest = next(
                h.header.raw_value.decode()
                for h in replies[0].request_headers.response.header_mutation.set_headers
                if h.header.key == "x-gateway-destination-endpoint"
            )
            assert dest in endpoint_keys(epp)

            prefix = next(p for p in epp.app.config.scheduler.plugins if hasattr(p, "index"))
            prefix.index.add(a.key, [11, 12, 13])
            assert set(prefix.index.match([11])) == {a.key}
            assert a.key in epp.app.scraper.polled()

            api.delete(PODS, "a")
            await wait_until(lambda: a.key not in endpoint_keys(epp), what="pod a gone")
            assert a.key not in epp.app.scraper.polled()  # its scrape stopped
            assert prefix.index.match([11]) == {}  # and its prefix entries were purged
            assert epp.app.scraper.polled() == {f"127.0.0.2:{fake.port}"}
    finally:
        await fake.stop()


# -- the reflector on its own ----------------------------------------------------------------


def test_backoff_is_capped_exponential_with_jitter() -> None:
    backoff = Backoff(initial_s=0.2, max_s=10.0)
    for failures, ceiling in [(1, 0.2), (2, 0.4), (3, 0.8), (6, 6.4), (7, 10.0), (50, 10.0)]:
        delays = [backoff.delay(failures) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), failures
        assert len(set(delays)) > 1  # jittered, so replicas do not retry in step


async def test_reflector_survives_a_handler_bug(api: KubeApiServer, kubeconfig: Path) -> None:
    api.put(PODS, pod("a", "127.0.1.1", APP))
    client = KubeClient(resolve_config_source(kubeconfig))
    listed: list[int] = []
    events: list[str] = []

    def on_list(items: list[dict[str, Any]]) -> None:
        listed.append(len(items))
        if len(listed) == 1:
            raise RuntimeError("bug in a handler")

    async def open_pods(**query: Any) -> aiohttp.ClientResponse:
        api_client = await client.api()
        return await raw_response(
            CoreV1Api(api_client).list_namespaced_pod("default", _preload_content=False, **query)
        )

    reflector = Reflector(
        "pods", open_pods, on_list, lambda kind, obj: events.append(kind), Backoff(0.01, 0.05)
    )
    task = asyncio.get_running_loop().create_task(reflector.run())
    try:
        await wait_until(lambda: listed == [1, 1], what="listed again after the failure")
        api.put(PODS, pod("b", "127.0.1.2", APP))
        await wait_until(lambda: events == ["ADDED"], what="watching")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


async def test_not_ready_until_the_pods_are_listed(tmp_path: Path) -> None:
    # The pool is there but listing pods fails (here: not served): the endpoint set is not
    # known to be complete, so epp must not say it is ready.
    api = await KubeApiServer(resources=[POOLS_V1]).start()
    try:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        api.put(POOLS_V1, inference_pool("pool", APP, [8000]))
        async with running_k8s_epp(kubeconfig, "--pool-name", "pool") as epp:
            await wait_until(lambda: len(api.lists(PODS)) >= 2, what="pod list retried")
            discovery = epp.app.discovery
            assert isinstance(discovery, KubernetesDiscovery) and discovery.pool is not None
            assert await health(epp) == "NOT_SERVING"
    finally:
        await api.stop()
