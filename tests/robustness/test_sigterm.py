"""SIGTERM under load, through a real Envoy: epp drains (issue 13 #1).

Simulated vLLM servers stream slow answers (about 3 s each); Envoy asks epp (ext_proc, bodies
FULL_DUPLEX_STREAMED, so every response chunk passes through epp and its stream stays open
until the response ends; no fail-open); a client opens N streaming requests, and once every
one is streaming, epp gets SIGTERM. What a user and an operator see:

- every SSE response arrives whole: each token, the finish reason, the usage chunk, `[DONE]`;
- epp reports NOT_SERVING at once, and exits with status 0 as soon as the last stream ended,
  within its --drain-timeout;
- a request arriving during the drain is refused at once (Envoy's 5xx), not held.

The control: with a --drain-timeout shorter than the streams, the same run sees responses cut,
so the check above can tell a cut stream from a whole one (the defect the issue found: a
hard-coded 1 s grace cut all 200 streams in flight).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp_bench.gateway import EnvoyGateway, EppProcess
from epp_bench.sim.config import SimConfig
from epp_bench.sim.server import Simulator, start_simulators
from epp_bench.soak import MODEL, Outcome, process_of, stream_completion
from tests.support.gateway_stack import epp_behind_envoy, require_envoy

pytestmark = pytest.mark.timeout(60)

STREAMS = 48
MAX_TOKENS = 40
INTER_TOKEN_S = 0.075  # 40 tokens: about 3 s a stream
PROMPT = "Tell me a long story about a lighthouse keeper. " * 8


@dataclass
class Stack:
    sims: list[Simulator]
    epp: EppProcess
    gateway: EnvoyGateway
    session: aiohttp.ClientSession


@asynccontextmanager
async def stack(drain_timeout: str) -> AsyncIterator[Stack]:
    require_envoy()
    async with AsyncExitStack() as cleanup:
        configs = [
            SimConfig(name=f"sim-{i}", model=MODEL, inter_token_latency_s=INTER_TOKEN_S) for i in range(3)
        ]
        sims = await start_simulators(configs)
        for sim in sims:
            cleanup.push_async_callback(sim.stop)
        epp = EppProcess([s.address for s in sims], extra_args=["--drain-timeout", drain_timeout])
        gateway, session = await epp_behind_envoy(
            cleanup, epp, timeout_s=30, connector=aiohttp.TCPConnector(limit=0)
        )
        yield Stack(sims, epp, gateway, session)


async def health(port: int, service: str) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=3
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def streams_in_flight(
    s: Stack, max_tokens: int = MAX_TOKENS
) -> tuple[list[asyncio.Task[tuple[Outcome, float]]], float]:
    """STREAMS requests, all streaming tokens when this returns (and the monotonic time then)."""

    async def one() -> tuple[Outcome, float]:
        outcome = await stream_completion(s.session, s.gateway.url, PROMPT, max_tokens)
        return outcome, time.monotonic()

    tasks = [asyncio.create_task(one()) for _ in range(STREAMS)]
    deadline = time.monotonic() + 10
    while sum(sim.stats.requests_received for sim in s.sims) < STREAMS:
        assert time.monotonic() < deadline, "the requests did not all reach the model servers"
        assert not any(t.done() for t in tasks), [t.result()[0] for t in tasks if t.done()]
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # the first tokens are out: every response is mid-stream
    assert not any(t.done() for t in tasks)
    return tasks, time.monotonic()


def diagnostics(s: Stack) -> str:
    return f"--- epp log ---\n{s.epp.log_tail(3000)}\n--- envoy log ---\n{s.gateway.log_tail(2000)}"


async def test_sigterm_cuts_no_stream_in_flight() -> None:
    async with stack(drain_timeout="20s") as s:
        proc = process_of(s.epp)
        tasks, _ = await streams_in_flight(s)
        sigterm_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)

        # The drain is visible at once, and a new request is refused rather than held.
        deadline = time.monotonic() + 5
        while await health(s.epp.health_port, "inference-extension") != "NOT_SERVING":
            assert time.monotonic() < deadline, diagnostics(s)
            await asyncio.sleep(0.02)
        started = time.monotonic()
        late = await stream_completion(s.session, s.gateway.url, PROMPT, 4)
        assert not late.ok and late.reason.startswith("http-5"), late
        assert time.monotonic() - started < 2

        results = await asyncio.wait_for(asyncio.gather(*tasks), 25)
        cut = [outcome for outcome, _ in results if not outcome.ok]
        assert not cut, f"{len(cut)} of {STREAMS} responses cut: {cut[:3]}\n{diagnostics(s)}"
        code = await asyncio.wait_for(proc.wait(), 20)
        exited_at = time.monotonic()
        last_done = max(done for _, done in results)
        assert code == 0, diagnostics(s)
        # epp waited for the last stream (Envoy closes its ext_proc stream just after), then left
        # at once, well inside the 20 s drain timeout.
        assert exited_at >= last_done - 0.2
        assert exited_at - last_done < 5 and exited_at - sigterm_at < 20
        aborted = sum(sim.stats.requests_aborted for sim in s.sims)
        assert aborted == 0 and sum(sim.stats.requests_succeeded for sim in s.sims) == STREAMS


async def test_control_a_drain_shorter_than_the_streams_cuts_them() -> None:
    """The harness sees a cut: with --drain-timeout 1s, streams still running at the deadline are
    cut, and the client sees it (a short SSE body or a broken connection)."""
    async with stack(drain_timeout="1s") as s:
        proc = process_of(s.epp)
        # About 9 s a stream: every one is still running at the cut, however long the 48 took to
        # reach the model servers on a loaded machine.
        tasks, _ = await streams_in_flight(s, max_tokens=3 * MAX_TOKENS)
        proc.send_signal(signal.SIGTERM)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 25)
        cut = [outcome for outcome, _ in results if not outcome.ok]
        assert len(cut) == STREAMS, [o for o, _ in results if o.ok][:3]
        assert {o.reason for o in cut} <= {"cut", "ClientPayloadError", "ServerDisconnectedError"}, cut[:3]
        assert await asyncio.wait_for(proc.wait(), 10) == 0
