"""gRPC health as the upstream chart and Envoy probe it, with the Go EPP's answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp import health as health_module
from epp.health import EXT_PROC_SERVICE
from tests.serving.support import health_status
from tests.support.epp_app import RunningEpp, running_epp, wait_until
from tests.support.fake_vllm import FakeVllm
from tests.support.kube_api import (
    LEASES,
    PODS,
    POOLS_V1,
    KubeApiServer,
    inference_pool,
    pod,
    running_k8s_epp,
)

READINESS_NAMES = ("inference-extension", "", "readiness", EXT_PROC_SERVICE)
# The upstream chart's container arguments (shared/upstream/README.md), less the ports and the
# config file, which the test harness sets.
CHART_ARGS = (
    "--pool-name",
    "pool",
    "--pool-namespace",
    "default",
    "--pool-group",
    "inference.networking.k8s.io",
    "--zap-encoder",
    "json",
    "--tracing=false",
    "--metrics-endpoint-auth=false",
)
FAST_HA = (
    "--ha-enable-leader-election",
    "--ha-retry-period",
    "100ms",
    "--ha-lease-duration",
    "1s",
    "--ha-renew-deadline",
    "600ms",
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeVllm]:
    server = await FakeVllm("s0").start()
    yield server
    await server.stop()


@pytest.fixture
async def api() -> AsyncIterator[KubeApiServer]:
    server = await KubeApiServer().start()
    server.put(POOLS_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
    server.put(PODS, pod("a", "127.0.1.1", {"app": "vllm"}))
    yield server
    await server.stop()


async def statuses(epp: RunningEpp, names: tuple[str, ...], port: int | None = None) -> dict[str, str]:
    return {name: await health_status(port or epp.health_port, name) for name in names}


async def test_without_leader_election_every_name_follows_readiness(fake: FakeVllm) -> None:
    async with running_epp("--endpoints", fake.address) as epp:
        for port in (epp.health_port, epp.grpc_port):  # Envoy's health checks ask on the ext_proc port
            got = await statuses(epp, (*READINESS_NAMES, "liveness", "anything-else"), port)
            assert set(got.values()) == {"SERVING"}, got


async def test_not_ready_reports_not_serving_but_stays_live(tmp_path: Path) -> None:
    empty = tmp_path / "endpoints.yaml"
    empty.write_text("[]\n")
    async with running_epp("--endpoints-file", str(empty)) as epp:
        got = await statuses(epp, (*READINESS_NAMES, "liveness"))
        assert got == {**dict.fromkeys(READINESS_NAMES, "NOT_SERVING"), "liveness": "SERVING"}


async def test_the_charts_single_replica_probe(api: KubeApiServer, kubeconfig: Path) -> None:
    async with running_k8s_epp(kubeconfig, *CHART_ARGS) as epp:
        await wait_until(lambda: epp.app.is_ready(), what="pool synced")
        await wait_until_status(epp, "inference-extension", "SERVING")
        api.delete(POOLS_V1, "pool")  # no pool: not ready, but alive
        await wait_until_status(epp, "inference-extension", "NOT_SERVING")
        assert await health_status(epp.health_port, "liveness") == "SERVING"


async def test_the_charts_ha_probes_and_the_go_answer_for_inference_extension(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    async with (
        running_k8s_epp(kubeconfig, *CHART_ARGS, *FAST_HA) as first,
        running_k8s_epp(kubeconfig, *CHART_ARGS, *FAST_HA) as second,
    ):
        await wait_until(lambda: first.app.is_ready() or second.app.is_ready(), what="a leader")
        leader, standby = (first, second) if first.app.is_ready() else (second, first)
        await wait_until_status(leader, "readiness", "SERVING")
        for name in ("", "readiness", EXT_PROC_SERVICE):
            assert await health_status(leader.health_port, name) == "SERVING"
            assert await health_status(standby.health_port, name) == "NOT_SERVING"
        for epp in (leader, standby):
            assert await health_status(epp.health_port, "liveness") == "SERVING"
            # With leader election the Go EPP knows only those names: anything else, the
            # single-replica probe's name included, is SERVICE_UNKNOWN.
            assert await health_status(epp.health_port, "inference-extension") == "SERVICE_UNKNOWN"
        lease = api.get(LEASES, "epp-default-pool.llm-d.ai")
        assert lease is not None and lease["spec"]["holderIdentity"]


async def wait_until_status(epp: RunningEpp, name: str, expected: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (current := await health_status(epp.health_port, name)) != expected:
        if loop.time() > deadline:
            raise AssertionError(f"{name!r} stayed {current}, expected {expected}")
        await asyncio.sleep(0.02)


async def test_list_reports_the_names(fake: FakeVllm) -> None:
    async with running_epp("--endpoints", fake.address) as epp:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.health_port}") as channel:
            listed = await health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=2)
        names = {
            name: health_pb2.HealthCheckResponse.ServingStatus.Name(s.status)
            for name, s in listed.statuses.items()
        }
        assert names == dict.fromkeys((*READINESS_NAMES, "liveness"), "SERVING")


async def test_watch_follows_readiness_and_ends_when_draining(tmp_path: Path, fake: FakeVllm) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("[]\n")
    async with running_epp("--endpoints-file", str(endpoints)) as epp:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.health_port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="inference-extension"), timeout=10
            )
            seen = [(await watch.read()).status]
            endpoints.write_text(f"- address: 127.0.0.1\n  port: {fake.port}\n")  # picked up live
            seen.append((await watch.read()).status)
            stopping = asyncio.create_task(epp.app.stop(drain_timeout_s=1))
            seen.append((await watch.read()).status)
            assert await watch.read() is grpc.aio.EOF  # the stream ends: it holds no drain open
            await stopping
        s = health_pb2.HealthCheckResponse
        assert seen == [s.NOT_SERVING, s.SERVING, s.NOT_SERVING]


async def test_a_drain_while_a_watch_message_is_being_sent_still_reaches_the_watcher() -> None:
    """The stream pauses at each message until it is sent; a drain that lands in that pause
    (its wake-up already spent) must still be sent before the stream ends."""
    from epp.health import NOT_SERVING, SERVING, Health

    health = Health()
    health.set_ready(True)
    watch = health.watch("")
    assert await anext(watch) == SERVING
    health.drain()  # while the generator is suspended at its yield
    assert await asyncio.wait_for(anext(watch), 1) == NOT_SERVING
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(watch), 1)


async def test_watch_streams_are_bounded_and_probes_still_answer(
    fake: FakeVllm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each Watch stream holds a call until epp drains: past MAX_HEALTH_WATCHERS open at once one
    more is refused, while Check (what kubelet and Envoy ask) goes on answering."""
    monkeypatch.setattr(health_module, "MAX_HEALTH_WATCHERS", 3)
    async with (
        running_epp("--endpoints", fake.address) as epp,
        grpc.aio.insecure_channel(f"127.0.0.1:{epp.health_port}") as channel,
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="liveness")
        watches = [stub.Watch(request, timeout=10) for _ in range(3)]
        for watch in watches:
            await watch.read()  # open
        extra = stub.Watch(request, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await extra.read()
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        checked = await stub.Check(request, timeout=2)
        assert checked.status == health_pb2.HealthCheckResponse.SERVING
        watches[0].cancel()
        await wait_until(lambda: epp.app.health.servicer.watchers == 2, what="a watcher gone")
        again = stub.Watch(request, timeout=10)
        assert (await again.read()).status == health_pb2.HealthCheckResponse.SERVING
        for watch in (*watches[1:], again):
            watch.cancel()
