"""epp run as the upstream chart runs the Go EPP: `python -m epp` with the chart's argument vector.

The vector is the code block of ../shared/upstream/README.md ("The EPP container as the upstream
chart runs it"; skipped when ../shared is absent), with its placeholders NAME / NS filled in and
one value replaced: `--config-file` names the chart's default plugins config from
../shared/upstream/configs instead of the pod's /config/default-plugins.yaml. For the HA form the
chart's `--ha-enable-leader-election` goes where the chart puts it (tests/deploy/chart.py).

After the vector come the test's own flags, `--grpc-port`, `--grpc-health-port`,
`--metrics-port` (free loopback ports) and `--bind-address 127.0.0.1`. The vector already holds
`--grpc-health-port 9003`: the later occurrence wins (pflag's rule, and epp's), so the test's
port overrides it (epp has one health listener, and it answers on the test's port).

The environment is the pod's: KUBECONFIG pointing at the loopback API server
(tests/support/kube_api.py) holding the InferencePool and its pods, NAMESPACE and POD_NAME as the
chart sets them through the Downward API. What a user sees is asserted: the gRPC health names the
chart's probes ask (one replica: `inference-extension`; several: `liveness` / `readiness`, the
standby not ready), ext_proc over TLS with epp's self-signed certificate routing a request,
`/metrics` open (the chart's `--metrics-endpoint-auth=false`), exit status 0 on SIGTERM within the
drain timeout, and nothing but JSON lines on stderr (`--zap-encoder json`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import orjson
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.deploy.chart import UPSTREAM_README, chart_args, readme_chart_args
from tests.support.extproc_client import one_request, request_headers
from tests.support.fake_vllm import FakeVllm
from tests.support.kube_api import LEASES, PODS, POOLS_V1, KubeApiServer, inference_pool, pod
from tests.support.kustomize_render import REPO

pytestmark = pytest.mark.skipif(not UPSTREAM_README.is_file(), reason=f"{UPSTREAM_README} is absent")

CHART_CONFIG = UPSTREAM_README.parent / "configs" / "chart_routerlib_default-plugins_vllm-http.yaml"
NAMESPACE = "llm"
POOL = "llm-pool"
POOL_LABELS = {"llm-d.ai/inferenceServing": "true", "app.kubernetes.io/part-of": POOL}
DEST = "x-gateway-destination-endpoint"
STARTUP_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 30.0  # the chart passes no --drain-timeout: epp's default, as Go's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chart_vector(*, ha: bool) -> list[str]:
    """The README's vector for this pool, with the chart's config file available here."""
    args = chart_args(POOL, NAMESPACE, ha=ha, template=readme_chart_args())
    config = args.index("--config-file") + 1
    assert args[config] == "/config/default-plugins.yaml", "the chart mounts its config there"
    args[config] = str(CHART_CONFIG)
    return args


def status_name(status: int) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))


@dataclass
class EppPod:
    """One `python -m epp` replica, as the chart's container runs it."""

    name: str
    args: list[str]
    proc: asyncio.subprocess.Process
    stderr: Path
    stdout: Path
    grpc_port: int
    health_port: int
    metrics_port: int
    exit_seconds: float | None = field(default=None)

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")[-4000:]

    async def check(self, service: str) -> str:
        """The health port's answer for `service`: SERVING, NOT_SERVING or SERVICE_UNKNOWN."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.health_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        return status_name(reply.status)

    async def wait_for(self, service: str, expected: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            if self.proc.returncode is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
            try:
                last = await self.check(service)
            except grpc.aio.AioRpcError as exc:
                last = f"{exc.code().name} ({exc.details()})"
            if last == expected:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: health {service!r} is {last}, expected {expected} within {timeout}s\n"
                    f"{self.log()}"
                )
            await asyncio.sleep(0.05)

    async def terminate(self) -> int:
        """SIGTERM, as the kubelet sends it; the exit status (killed after the drain timeout + 10 s)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), DRAIN_TIMEOUT_S + 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"{self.name} ignored SIGTERM:\n{self.log()}") from None
        self.exit_seconds = time.monotonic() - started
        return code

    def json_log(self) -> list[dict[str, object]]:
        """Every stderr line, parsed; fails on the first line that is not a JSON object."""
        records = []
        for n, line in enumerate(self.stderr.read_text().splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError:
                raise AssertionError(f"{self.name} stderr line {n} is not JSON: {line!r}") from None
            assert isinstance(record, dict), line
            records.append(record)
        return records


async def _listening(proc: asyncio.subprocess.Process, ports: list[int]) -> bool:
    """True once every port accepts a connection; False when the process exits first."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    waiting = list(ports)
    while waiting and proc.returncode is None and time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", waiting[0])
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        waiting.pop(0)
    return not waiting


@contextlib.asynccontextmanager
async def epp_pod(tmp_path: Path, kubeconfig: Path, name: str, *, ha: bool) -> AsyncIterator[EppPod]:
    """Started on free ports; started again on others when another process took one of them
    between the test's choice and epp's bind (it exits saying so), as in any test that picks
    ports before the server binds them."""
    for attempt in range(3):
        running = await _start_pod(tmp_path, kubeconfig, name, ha=ha)
        if await _listening(running.proc, [running.grpc_port, running.health_port, running.metrics_port]):
            break
        await running.proc.wait()
        if "address already in use" not in running.log() or attempt == 2:
            break  # the tests' own checks report why it exited
    try:
        yield running
    finally:
        if running.proc.returncode is None:
            running.proc.kill()
            await running.proc.wait()


async def _start_pod(tmp_path: Path, kubeconfig: Path, name: str, *, ha: bool) -> EppPod:
    ports = [free_port() for _ in range(3)]
    args = [
        *chart_vector(ha=ha),
        "--grpc-port", str(ports[0]),
        "--grpc-health-port", str(ports[1]),  # overrides the vector's 9003: the last one wins
        "--metrics-port", str(ports[2]),
        "--bind-address", "127.0.0.1",
    ]  # fmt: skip
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "KUBECONFIG": str(kubeconfig),
        "NAMESPACE": NAMESPACE,
        "POD_NAME": name,
    }
    stderr, stdout = tmp_path / f"{name}.stderr", tmp_path / f"{name}.stdout"
    with stderr.open("wb") as err, stdout.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "epp", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=REPO,
        )  # fmt: skip
    return EppPod(name, args, proc, stderr, stdout, *ports)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[KubeApiServer, Path, list[FakeVllm]]]:
    """The loopback API server, its kubeconfig, and two vLLM-shaped servers: pod vllm-0
    (127.0.0.1, ready) serves the pool's two target ports; pod vllm-1 is not ready."""
    server = await KubeApiServer().start()
    fakes = [await FakeVllm(f"vllm-0:{i}").start() for i in range(2)]
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
    server.put(PODS, pod("vllm-0", "127.0.0.1", POOL_LABELS, namespace=NAMESPACE))
    server.put(PODS, pod("vllm-1", "127.0.0.2", POOL_LABELS, namespace=NAMESPACE, ready=False))
    try:
        yield server, kubeconfig, fakes
    finally:
        for fake in fakes:
            await fake.stop()
        await server.stop()


def add_pool(server: KubeApiServer, fakes: list[FakeVllm]) -> None:
    server.put(POOLS_V1, inference_pool(POOL, POOL_LABELS, [f.port for f in fakes], namespace=NAMESPACE))


async def route_one_over_tls(epp: EppPod) -> str:
    """One request through ext_proc over TLS, trusting the certificate the server presents (it is
    self-signed) for the name epp put in it, its pod's; returns the endpoint picked."""
    pem = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", epp.grpc_port), timeout=5)
    cert = x509.load_pem_x509_certificate(pem.encode())
    assert cert.issuer == cert.subject, "self-signed"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Inference Ext"
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert epp.name in names.get_values_for_type(x509.DNSName)
    credentials = grpc.ssl_channel_credentials(root_certificates=pem.encode())
    options = [("grpc.ssl_target_name_override", epp.name)]
    async with grpc.aio.secure_channel(f"127.0.0.1:{epp.grpc_port}", credentials, options) as channel:
        stub = ext_proc_grpc.ExternalProcessorStub(channel)
        body = orjson.dumps({"model": "m", "prompt": "hello from the chart's vector", "max_tokens": 4})
        replies = await one_request(stub, request_headers(), body)
    assert replies and replies[0].HasField("request_headers"), replies
    mutation = replies[0].request_headers.response.header_mutation
    return next(str(h.header.raw_value.decode()) for h in mutation.set_headers if h.header.key == DEST)


async def ready_endpoints(epp: EppPod, until: float, timeout: float = 10.0) -> float:
    """`llm_d_epp_ready_endpoints` from /metrics, fetched without a token, polled until it is
    `until` or the timeout passes (the last value is returned)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"http://127.0.0.1:{epp.metrics_port}/metrics") as resp:
                assert resp.status == 200, await resp.text()
                text = await resp.text()
            lines = [line for line in text.splitlines() if line.startswith("llm_d_epp_ready_endpoints{")]
            value = float(lines[0].split()[-1]) if lines else -1.0
            if value == until or time.monotonic() > deadline:
                return value
            await asyncio.sleep(0.1)


async def plaintext_refused(epp: EppPod) -> bool:
    """A plaintext gRPC client gets nowhere on the ext_proc port (it is TLS)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.grpc_port}") as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError as exc:
            return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return False


async def test_one_replica_with_the_charts_vector(
    tmp_path: Path, cluster: tuple[KubeApiServer, Path, list[FakeVllm]]
) -> None:
    from epp.settings import parse_settings

    server, kubeconfig, fakes = cluster
    async with epp_pod(tmp_path, kubeconfig, "epp-7d9f8-abcde", ha=False) as epp:
        # Up, but the pool does not exist yet: the chart's probe name says not ready.
        await epp.wait_for("liveness", "SERVING")
        assert await epp.check("inference-extension") == "NOT_SERVING"
        add_pool(server, fakes)
        await epp.wait_for("inference-extension", "SERVING")  # the chart's readiness and liveness probe
        for name in ("", "readiness", "liveness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            assert await epp.check(name) == "SERVING", name
        settings = parse_settings(epp.args, {})
        assert settings.grpc_health_port == epp.health_port != 9003  # the later occurrence won
        assert settings.drain_timeout_s == DRAIN_TIMEOUT_S

        # ext_proc is TLS by default, with epp's own certificate: a request is routed to the ready pod.
        picked = await route_one_over_tls(epp)
        assert picked in {f.address for f in fakes}, picked

        # /metrics without a token (--metrics-endpoint-auth=false): vllm-0's two ports are ready
        # endpoints once scraped (the gauge is refreshed every second); vllm-1 is not ready.
        assert await ready_endpoints(epp, until=2.0) == 2.0

        assert await epp.terminate() == 0
        assert epp.exit_seconds is not None and epp.exit_seconds < DRAIN_TIMEOUT_S
        records = epp.json_log()
        assert any("epp serving" in str(r.get("msg")) for r in records), records
        assert {"level", "ts", "logger", "caller", "msg"} <= set(records[0])
        assert not any(r.get("level") == "error" for r in records), records
        assert epp.stdout.read_text() == ""


async def test_two_replicas_with_the_charts_ha_vector(
    tmp_path: Path, cluster: tuple[KubeApiServer, Path, list[FakeVllm]]
) -> None:
    from epp.discovery.leader import lease_name_for_pool

    server, kubeconfig, fakes = cluster
    add_pool(server, fakes)
    lease = lease_name_for_pool(NAMESPACE, POOL)
    async with (
        epp_pod(tmp_path, kubeconfig, "epp-7d9f8-aaaaa", ha=True) as leader,
        epp_pod(tmp_path, kubeconfig, "epp-7d9f8-bbbbb", ha=True) as standby,
    ):
        assert "--ha-enable-leader-election" in leader.args
        # The chart's HA probes: liveness for both, readiness only for the Lease holder. Whichever
        # started first holds it; name them after the fact.
        for replica in (leader, standby):
            await replica.wait_for("liveness", "SERVING")
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while (held := server.get(LEASES, lease, NAMESPACE)) is None or not held["spec"].get(
            "holderIdentity"
        ):
            assert time.monotonic() < deadline, "no replica took the Lease"
            await asyncio.sleep(0.05)
        holder = str(held["spec"]["holderIdentity"])
        assert holder.startswith(("epp-7d9f8-aaaaa_", "epp-7d9f8-bbbbb_")), holder  # POD_NAME_<uuid>
        if holder.startswith(standby.name + "_"):
            leader, standby = standby, leader
        await leader.wait_for("readiness", "SERVING")
        await standby.wait_for("readiness", "NOT_SERVING")
        assert await standby.check("liveness") == "SERVING"
        for replica in (leader, standby):
            # With leader election the single-replica name is unknown, as in Go.
            assert await replica.check("inference-extension") == "SERVICE_UNKNOWN"

        # The leader routes over TLS.
        assert await route_one_over_tls(leader) in {f.address for f in fakes}

        # SIGTERM to the leader: it exits 0 within the drain timeout and releases the Lease, and
        # the standby becomes ready (within its retry period, 2 s by default).
        assert await leader.terminate() == 0
        assert leader.exit_seconds is not None and leader.exit_seconds < DRAIN_TIMEOUT_S
        await standby.wait_for("readiness", "SERVING", timeout=10)
        held = server.get(LEASES, lease, NAMESPACE)
        assert held is not None and str(held["spec"]["holderIdentity"]).startswith(standby.name + "_")
        assert await route_one_over_tls(standby) in {f.address for f in fakes}
        assert await standby.terminate() == 0
        for replica in (leader, standby):
            records = replica.json_log()
            assert records and not any(r.get("level") == "error" for r in records), records


async def test_a_plaintext_client_on_the_tls_port(
    tmp_path: Path, cluster: tuple[KubeApiServer, Path, list[FakeVllm]]
) -> None:
    """A gateway that speaks plaintext to the chart's TLS port (say, Istio without the
    DestinationRule) gets nowhere, and epp's stderr should stay JSON."""
    server, kubeconfig, fakes = cluster
    add_pool(server, fakes)
    async with epp_pod(tmp_path, kubeconfig, "epp-7d9f8-plain", ha=False) as epp:
        await epp.wait_for("inference-extension", "SERVING")
        assert await plaintext_refused(epp)
        assert await epp.terminate() == 0
        # gRPC's C core would log the failed handshake in its own text format; epp keeps it at
        # errors (GRPC_VERBOSITY), so stderr stays JSON.
        epp.json_log()
