"""Graceful shutdown (--drain-timeout): at SIGTERM (or App.stop) epp reports NOT_SERVING, releases
its Lease, refuses new ext_proc streams, and lets those in flight finish within the timeout."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import ClassVar

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

import epp.app as app_module
from epp.framework import BackgroundService, CycleState, Endpoint, InferenceRequest, Scorer, ServiceContext
from epp.framework.registry import installed_registry
from tests.serving.support import EppCommand, epp_command, health_status
from tests.support.epp_app import RunningEpp, metrics_page_with, running_epp, wait_until
from tests.support.extproc_client import ExtProcClient, body_msgs, headers_msg, one_request, request_headers
from tests.support.fake_vllm import FakeVllm
from tests.support.kube_api import LEASES, PODS, POOLS_V1, KubeApiServer, inference_pool, pod, running_k8s_epp

BODY = orjson.dumps({"model": "m", "prompt": "hello"})
LEASE = "epp-default-pool.llm-d.ai"


@pytest.fixture
async def fake() -> AsyncIterator[FakeVllm]:
    server = await FakeVllm("s0").start()
    yield server
    await server.stop()


def open_stream(stub: pb_grpc.ExternalProcessorStub) -> ExtProcClient:
    """A request in flight: its headers sent, epp waiting for the body (as Envoy streams it)."""
    client = ExtProcClient(stub)
    client.send([headers_msg(request_headers())])
    return client


async def finish(client: ExtProcClient) -> list[str]:
    """Send the body and end the stream: what epp answered."""
    client.send(body_msgs(BODY, 1000))
    replies = await client.read(2)
    await client.close()
    return [r.WhichOneof("response") for r in replies]


STREAMS_OPEN = "llm_d_epp_extproc_streams_open"


async def streams_reached(epp: RunningEpp, n: int) -> None:
    """Until `n` streams are open in epp: a client's channel connects lazily, so a stream is
    not epp's (and a drain does not wait for it) until then."""
    await wait_until(
        lambda: epp.app.metrics.registry.get_sample_value(STREAMS_OPEN) == n, what=f"{n} streams open"
    )


async def command_streams_reached(epp: EppCommand, n: int) -> None:
    """`streams_reached` for epp as a subprocess: read off its /metrics page."""
    await metrics_page_with(epp.metrics_port, f"{STREAMS_OPEN} {float(n)}")


async def assert_refused(stub: pb_grpc.ExternalProcessorStub) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await one_request(stub, request_headers(), BODY)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 2.0  # refused, not left waiting


async def drain_status(epp: RunningEpp) -> dict[str, str]:
    return {
        n: await health_status(epp.health_port, n) for n in ("inference-extension", "readiness", "liveness")
    }


async def test_in_flight_streams_finish_and_new_ones_are_refused(fake: FakeVllm) -> None:
    async with running_epp("--endpoints", fake.address, "--drain-timeout", "10s") as epp:
        in_flight = [open_stream(epp.stub) for _ in range(3)]
        await streams_reached(epp, 3)
        started = time.monotonic()
        stopping = asyncio.create_task(epp.app.stop())  # --drain-timeout's 10 s
        await wait_until(lambda: epp.app.health.draining, what="draining")
        assert await drain_status(epp) == {
            "inference-extension": "NOT_SERVING",
            "readiness": "NOT_SERVING",
            "liveness": "SERVING",
        }
        await assert_refused(epp.stub)  # on the channel that was already connected
        async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.grpc_port}") as fresh:
            await assert_refused(pb_grpc.ExternalProcessorStub(fresh))
        assert not stopping.done()  # waiting for the streams in flight
        # Scraping, and the pool gauges built from it, keep up through the drain.
        fake.waiting = 7
        queue = "llm_d_epp_average_queue_size"
        await wait_until(
            lambda: any(
                s.value == 7 for m in epp.app.metrics.registry.collect() for s in m.samples if s.name == queue
            ),
            what="the pool gauge read during the drain",
        )
        for client in in_flight:
            assert await finish(client) == ["request_headers", "request_body"]
        await asyncio.wait_for(stopping, 5)
        assert time.monotonic() - started < 5  # as soon as they were done, not after 10 s


async def test_streams_still_open_at_the_drain_timeout_are_cut(fake: FakeVllm) -> None:
    async with running_epp("--endpoints", fake.address) as epp:
        client = open_stream(epp.stub)
        await streams_reached(epp, 1)
        started = time.monotonic()
        await asyncio.wait_for(epp.app.stop(drain_timeout_s=0.5), 5)
        assert 0.4 < time.monotonic() - started < 3
        with pytest.raises(grpc.aio.AioRpcError):
            await finish(client)


async def test_the_leader_releases_its_lease_at_once_while_streams_finish(tmp_path: Path) -> None:
    api = await KubeApiServer().start()
    try:
        api.put(POOLS_V1, inference_pool("pool", {"app": "vllm"}, [8000]))
        api.put(PODS, pod("a", "127.0.1.1", {"app": "vllm"}))
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        ha = ("--pool-name", "pool", "--ha-enable-leader-election", "--ha-retry-period", "100ms")
        async with running_k8s_epp(kubeconfig, *ha, "--drain-timeout", "10s") as epp:
            await wait_until(lambda: epp.app.is_ready(), what="leader and synced")
            client = open_stream(epp.stub)
            await streams_reached(epp, 1)
            stopping = asyncio.create_task(epp.app.stop())

            def released() -> bool:
                lease = api.get(LEASES, LEASE)
                return lease is not None and not lease["spec"].get("holderIdentity")

            await wait_until(released, timeout=3, what="lease released")
            assert not stopping.done()  # the stream in flight is still being served
            assert await health_status(epp.health_port, "readiness") == "NOT_SERVING"
            assert await finish(client) == ["request_headers", "request_body"]
            # The stream is done, so the drain ends now; 15 s only bounds a machine under load
            # (one full-suite run on a loaded machine hung here once, not reproduced since).
            await asyncio.wait_for(stopping, 15)
    finally:
        await api.stop()


async def test_sigterm_drains_the_epp_command_and_exits_0(fake: FakeVllm, tmp_path: Path) -> None:
    flags = ("--endpoints", fake.address, "--secure-serving=false", "--drain-timeout", "20s")
    async with epp_command(tmp_path, *flags) as epp:
        await epp.wait_serving()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.grpc_port}") as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            in_flight = [open_stream(stub) for _ in range(2)]
            await command_streams_reached(epp, 2)
            started = time.monotonic()
            epp.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while await health_status(epp.health_port, "inference-extension") != "NOT_SERVING":
                assert time.monotonic() < deadline, epp.log
                await asyncio.sleep(0.02)
            assert await health_status(epp.health_port, "liveness") == "SERVING"
            await assert_refused(stub)
            assert epp.proc.returncode is None  # still serving the streams in flight
            for client in in_flight:
                assert await finish(client) == ["request_headers", "request_body"]
            assert await epp.wait_exit(10) == 0, epp.log
            assert time.monotonic() - started < 10
    assert "draining" in epp.log


async def test_a_second_sigterm_ends_the_drain_at_once(fake: FakeVllm, tmp_path: Path) -> None:
    flags = ("--endpoints", fake.address, "--secure-serving=false", "--drain-timeout", "60s")
    async with epp_command(tmp_path, *flags) as epp:
        await epp.wait_serving()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.grpc_port}") as channel:
            client = open_stream(pb_grpc.ExternalProcessorStub(channel))
            await command_streams_reached(epp, 1)
            epp.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert epp.proc.returncode is None  # draining, for up to 60 s
            started = time.monotonic()
            epp.proc.send_signal(signal.SIGTERM)
            assert await epp.wait_exit(10) == 0, epp.log
            assert time.monotonic() - started < 5
            with pytest.raises(grpc.aio.AioRpcError):
                await finish(client)
    assert "second signal" in epp.log


class _Tidy(BackgroundService, Scorer):
    """A plugin with a service that spawns a task of its own, each with cleanup to do."""

    type_name = "tidy-scorer"
    cleaned: ClassVar[list[str]] = []

    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        return [0.0] * len(endpoints)

    async def run(self, context: ServiceContext) -> None:
        async def helper() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                await asyncio.sleep(0.05)  # e.g. closing a client
                _Tidy.cleaned.append("helper")

        context.spawn("plugin-helper", helper, "tidy")
        try:
            await asyncio.Event().wait()
        finally:
            _Tidy.cleaned.append("run")


async def test_stop_waits_for_the_plugins_tasks_and_their_cleanup(
    fake: FakeVllm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping epp cancels a plugin's service and every task it spawned, and returns once their
    cleanup has run, not after (a client left open, a write lost)."""
    registry = installed_registry()
    registry.register(_Tidy)
    monkeypatch.setattr(app_module, "installed_registry", lambda: registry)
    config = (
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- {type: tidy-scorer}\n"
        "schedulingProfiles:\n- {name: default, plugins: [{pluginRef: tidy-scorer}]}\n"
    )
    _Tidy.cleaned.clear()
    async with running_epp("--endpoints", fake.address, "--config-text", config) as epp:
        await wait_until(lambda: len(epp.app._services) == 2, what="the service and its helper")
    assert sorted(_Tidy.cleaned) == ["helper", "run"]
