"""The epp command's gRPC servers: it turns off grpcio's EventEngine server listener, which cost
about 13 % more CPU per ext_proc request (docs/performance.md), unless the operator sets
GRPC_EXPERIMENTS, and the serving line says which experiments are in effect; a port in use is
one line of error."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from tests.serving.support import epp_command
from tests.support.extproc_client import one_request, request_headers
from tests.support.fake_vllm import FakeVllm


@pytest.fixture
async def fake() -> AsyncIterator[FakeVllm]:
    server = await FakeVllm("s0").start()
    yield server
    await server.stop()


@pytest.mark.parametrize(
    ("operator_setting", "in_effect"),
    [
        (None, "-event_engine_listener"),  # epp's default
        ("", "grpcio's defaults"),  # set, empty: grpcio's own defaults
        ("-event_engine_fork", "-event_engine_fork"),  # the operator's own choice wins
    ],
)
async def test_the_epp_command_serves_with_the_grpc_experiments_in_effect(
    fake: FakeVllm,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    operator_setting: str | None,
    in_effect: str,
) -> None:
    monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    env = {} if operator_setting is None else {"GRPC_EXPERIMENTS": operator_setting}
    async with epp_command(tmp_path, "--endpoints", fake.address, "--secure-serving=false", env=env) as epp:
        await epp.wait_serving()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.grpc_port}") as channel:
            body = orjson.dumps({"model": "m", "prompt": "hello"})
            replies = await one_request(pb_grpc.ExternalProcessorStub(channel), request_headers(), body)
        assert replies[0].HasField("request_headers")  # routed
        assert f"gRPC experiments: {in_effect}" in epp.log
        assert "Unknown experiment" not in epp.log  # grpcio knows the experiment epp names


@pytest.mark.parametrize("flag", ["--grpc-port", "--grpc-health-port"])
def test_a_grpc_port_in_use_is_one_line_and_status_1(flag: str) -> None:
    """Whichever gRPC listener serves it, a port another process holds ends the epp command with
    one line naming the address (grpcio raises where it used to return 0), not a traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = {"--grpc-port": "0", "--grpc-health-port": "0", "--metrics-port": "0", flag: str(taken)}
        flags = [item for pair in ports.items() for item in pair]
        run = subprocess.run(
            [sys.executable, "-m", "epp", "--endpoints", "127.0.0.2:8000", "--secure-serving=false", *flags,
             "--bind-address", "127.0.0.1"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert run.returncode == 1, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"epp: error: cannot listen on 127.0.0.1:{taken} (in use, or not an address of this host)"
    )
