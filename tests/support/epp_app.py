"""Run epp in-process on free loopback ports, with a real gRPC channel to it."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.app import App
from epp.settings import parse_settings


@dataclass
class RunningEpp:
    app: App
    channel: grpc.aio.Channel
    stub: pb_grpc.ExternalProcessorStub

    @property
    def grpc_port(self) -> int:
        assert self.app.ports is not None
        return self.app.ports.grpc

    @property
    def health_port(self) -> int:
        assert self.app.ports is not None
        return self.app.ports.health

    @property
    def metrics_port(self) -> int:
        assert self.app.ports is not None
        return self.app.ports.metrics


@asynccontextmanager
async def running_epp(
    *flags: str, ca_pem: bytes | None = None, **overrides: Any
) -> AsyncIterator[RunningEpp]:
    """epp in-process on free loopback ports; `overrides` replace Settings fields flags don't reach.
    With `--secure-serving` the channel is TLS, trusting `ca_pem` (default: the certificate epp
    serves, which is how a client trusts a self-signed one)."""
    settings = parse_settings(
        [
            "--grpc-port",
            "0",
            "--grpc-health-port",
            "0",
            "--metrics-port",
            "0",
            "--bind-address",
            "127.0.0.1",
            "--secure-serving=false",  # the test channel is plaintext; TLS tests pass --secure-serving
            *flags,
        ]
    )
    app = App(dataclasses.replace(settings, **overrides) if overrides else settings)
    ports = await app.start()
    target = f"127.0.0.1:{ports.grpc}"
    if app.tls is not None:
        root = ca_pem or app.tls.certificate_pem
        channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root))
    else:
        channel = grpc.aio.insecure_channel(target)
    try:
        yield RunningEpp(app, channel, pb_grpc.ExternalProcessorStub(channel))
    finally:
        await channel.close()
        await app.stop(drain_timeout_s=0.1)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def metrics_page_with(port: int, line: str, timeout: float = 10.0) -> str:
    """epp's /metrics page (plain HTTP on `port`, e.g. an epp subprocess's) once it holds `line`."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
            if line in text:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {line!r} on /metrics")
            await asyncio.sleep(0.05)
