"""Predicted-latency routing end to end: a real Envoy asks epp (a `python -m epp` subprocess with
the predicted-latency guide's config, plus the tier filter and the latency-SLO admitter) to route
to two vLLM simulators. epp learns TTFT from the responses it routes, then routes by prediction,
and refuses a sheddable request with an SLO no busy endpoint can meet.

Not skippable: without the Envoy binary the tests fail and say to run `make tools`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from epp_bench.gateway import EnvoyGateway, EppProcess
from epp_bench.sim import SERVED_BY, SimConfig, Simulator, start_simulator
from epp_bench.workloads import make_text
from tests.support.gateway_stack import epp_behind_envoy, require_envoy

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]

MODEL = "sim-model"
# The llm-d predicted-latency-routing guide's router config, with the tier filter and the admitter.
CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters:
    maxPrefixTokensToMatch: 262144
- type: predicted-latency-producer
- type: prefix-cache-affinity-filter
  name: loose-affinity-filter
  parameters:
    affinityThreshold: 0.8
    ttftSource: latencyPredictor
    maxTTFTPenaltyMs: 5000
- type: slo-headroom-tier-filter
- type: latency-scorer
- type: weighted-random-picker
- type: latency-slo-admitter
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: loose-affinity-filter
  - pluginRef: slo-headroom-tier-filter
  - pluginRef: latency-scorer
  - pluginRef: weighted-random-picker
"""
OBJECTIVES = """\
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1}
"""
PREDICTED_TTFT = "llm_d_epp_request_predicted_ttft_seconds"
TRAINING_REQUESTS = 48  # the in-process model fits after 32 observations


@dataclass
class Stack:
    sims: list[Simulator]
    epp: EppProcess
    gateway: EnvoyGateway
    session: aiohttp.ClientSession
    trained: bool = False  # `train` ran

    def diagnostics(self) -> str:
        return f"--- envoy log ---\n{self.gateway.log_tail()}\n--- epp log ---\n{self.epp.log_tail()}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    require_envoy()
    async with AsyncExitStack() as cleanup:
        sims = []
        for name in ("sim-a", "sim-b"):
            sim = await start_simulator(SimConfig(name=name, model=MODEL, time_factor=0.25))
            cleanup.push_async_callback(sim.stop)
            sims.append(sim)
        objectives = Path(tmp_path_factory.mktemp("latency")) / "objectives.yaml"
        objectives.write_text(OBJECTIVES)
        epp = EppProcess(
            [s.address for s in sims],
            extra_args=["--config-text", CONFIG, "--inference-objectives-file", str(objectives)],
        )
        gateway, session = await epp_behind_envoy(cleanup, epp, timeout_s=30)
        yield Stack(sims, epp, gateway, session)


async def complete(
    stack: Stack, prompt: str, max_tokens: int, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
    async with stack.session.post(f"{stack.gateway.url}/v1/completions", json=body, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def metric_count(epp: EppProcess, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(epp.metrics_url) as resp:
        text = await resp.text()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name + "_count"
    )


async def train(stack: Stack) -> dict[str, int]:
    """Route TRAINING_REQUESTS requests, 4 at a time (once per module); how many each simulator served."""
    if stack.trained:
        return {}
    stack.trained = True
    rng = random.Random(7)
    slo = {"x-llm-d-slo-ttft-ms": "5000"}
    served: dict[str, int] = {}
    sem = asyncio.Semaphore(4)

    async def one(i: int) -> None:
        async with sem:
            prompt = f"{i} " + make_text(rng, rng.choice((100, 400, 1200)))
            status, headers, body = await complete(stack, prompt, rng.choice((4, 16)), slo)
            assert status == 200, (body[:300], stack.diagnostics())
            served[headers[SERVED_BY]] = served.get(headers[SERVED_BY], 0) + 1

    await asyncio.gather(*(one(i) for i in range(TRAINING_REQUESTS)))
    return served


async def test_epp_learns_latencies_and_routes_by_prediction(stack: Stack) -> None:
    assert await metric_count(stack.epp, PREDICTED_TTFT) == 0  # no model yet: no prediction
    served = await train(stack)
    assert set(served) == {"sim-a", "sim-b"}, served  # both get traffic
    # The model fitted during that run: later picks carried a prediction, observed as the request
    # completed (one per request routed with one).
    predicted = await metric_count(stack.epp, PREDICTED_TTFT)
    assert 0 < predicted < TRAINING_REQUESTS, stack.diagnostics()
    rng, slo = random.Random(8), {"x-llm-d-slo-ttft-ms": "5000"}
    for i in range(4):
        status, _, body = await complete(stack, f"after {i} " + make_text(rng, 200), 4, slo)
        assert status == 200, body[:300]
    assert await metric_count(stack.epp, PREDICTED_TTFT) == predicted + 4


async def direct(stack: Stack, sim: Simulator, prompt: str, max_tokens: int) -> int:
    """A request straight to a simulator (not through epp): load epp sees only in scraped metrics."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
    async with stack.session.post(f"{sim.url}/v1/completions", json=body) as resp:
        await resp.read()
        return resp.status


async def test_a_sheddable_request_no_busy_endpoint_can_serve_in_time_is_refused(stack: Stack) -> None:
    await train(stack)  # predictions exist (without them the admitter admits everything)
    # Both simulators busy with long requests (running > 0, a few % of KV cache in use).
    rng = random.Random(3)
    busy = [
        asyncio.create_task(direct(stack, sim, f"busy {i} " + make_text(rng, 1500), 1000))
        for i in range(2)
        for sim in stack.sims
    ]
    try:
        deadline = time.monotonic() + 10
        while not all(s.engine.num_running for s in stack.sims):
            assert time.monotonic() < deadline, "the simulators never got busy"
            await asyncio.sleep(0.02)
        tight = {"x-llm-d-slo-ttft-ms": "0.001"}
        shed = {**tight, "x-llm-d-inference-objective": "batch"}
        # Until a scrape has shown epp both busy (a request admitted before that is served).
        deadline = time.monotonic() + 5
        while True:
            status, headers, body = await complete(stack, "a sheddable request", 4, shed)
            if status != 200 or time.monotonic() > deadline:
                break
            assert not any(t.done() for t in busy), "the busy requests ended first"
            await asyncio.sleep(0.05)
        assert status == 429, (status, body[:300], stack.diagnostics())
        assert headers.get("x-llm-d-request-dropped-reason") == "rejected-saturated"
        assert b"latency SLO" in body  # the admitter's refusal, not the pool's saturation
        status, _, body = await complete(stack, "a standard request", 4, tight)
        assert status == 200, body[:300]  # priority 0 is never shed
    finally:
        results = await asyncio.gather(*busy)
    assert results == [200] * len(busy)
    # Idle again: the same sheddable request is admitted (an idle endpoint may serve it), once a
    # scrape has shown epp the pool idle.
    deadline = time.monotonic() + 5
    while (result := await complete(stack, "sheddable, idle pool", 4, shed))[0] != 200:
        assert time.monotonic() < deadline, result[2][:300]
        await asyncio.sleep(0.05)
