"""P/D end to end: a real Envoy asks epp (a `python -m epp` subprocess with a disagg config), which
routes to routing sidecars in front of decode simulators and names a prefill simulator in
`x-prefiller-host-port`; the sidecar has that simulator prefill. Then the P/D bench, short.

Not skippable: without the Envoy binary the tests fail and say to run `make tools`.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from epp_bench.gateway import EnvoyGateway, EppProcess
from epp_bench.pd import PD_CONFIG, PdBenchConfig, endpoints_yaml, pd_table, run_pd_bench
from epp_bench.sidecar import PREFILL_HEADER, PREFILLED_BY, Sidecar
from epp_bench.sim import SERVED_BY, SimConfig, Simulator, start_simulator
from epp_bench.workloads import make_text
from tests.support.gateway_stack import epp_behind_envoy, require_envoy

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]

MODEL = "sim-model"
DECISIONS = "llm_d_epp_disagg_decision_total"


@dataclass
class PdStack:
    prefills: list[Simulator]
    decodes: list[Simulator]
    sidecars: list[Sidecar]
    outsider: Simulator  # a prefill simulator that is not in the pool
    epp: EppProcess
    gateway: EnvoyGateway
    session: aiohttp.ClientSession

    def diagnostics(self) -> str:
        return f"--- envoy log ---\n{self.gateway.log_tail()}\n--- epp log ---\n{self.epp.log_tail()}"

    def received(self) -> dict[str, int]:
        return {s.name: s.stats.requests_received for s in [*self.prefills, *self.decodes, self.outsider]}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PdStack]:
    require_envoy()
    async with AsyncExitStack() as cleanup:

        async def sim(name: str, role: str) -> Simulator:
            started = await start_simulator(SimConfig(name=name, model=MODEL, role=role, time_factor=0.05))
            cleanup.push_async_callback(started.stop)
            return started

        prefills = [await sim(f"prefill-{i}", "prefill") for i in range(2)]
        decodes = [await sim(f"decode-{i}", "decode") for i in range(2)]
        outsider = await sim("outsider", "prefill")
        sidecars = []
        for decode in decodes:
            sidecar = await Sidecar(decode.address).start()
            cleanup.push_async_callback(sidecar.stop)
            sidecars.append(sidecar)
        path = Path(tmp_path_factory.mktemp("pd")) / "endpoints.yaml"
        path.write_text(endpoints_yaml([p.address for p in prefills], [s.address for s in sidecars]))
        epp = EppProcess([], extra_args=["--endpoints-file", str(path), "--config-text", PD_CONFIG])
        gateway, session = await epp_behind_envoy(cleanup, epp, timeout_s=20)
        yield PdStack(prefills, decodes, sidecars, outsider, epp, gateway, session)


async def complete(
    stack: PdStack, prompt: str, headers: dict[str, str] | None = None, stream: bool = False
) -> tuple[int, dict[str, str], bytes]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "stream": stream}
    async with stack.session.post(f"{stack.gateway.url}/v1/completions", json=body, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def decisions(epp: EppProcess) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(epp.metrics_url) as resp:
        text = await resp.text()
    return {
        s.labels["decision_type"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == DECISIONS
    }


async def test_long_prompt_is_prefilled_on_a_prefill_pod_and_decoded_behind_the_sidecar(
    stack: PdStack,
) -> None:
    before = stack.received()
    status, headers, body = await complete(stack, make_text(random.Random(1), 1500), stream=True)
    assert status == 200, (body[:300], stack.diagnostics())
    assert headers[SERVED_BY] in {d.name for d in stack.decodes}
    assert headers[PREFILLED_BY] in {p.name for p in stack.prefills}
    assert body.rstrip().endswith(b"data: [DONE]")
    after = stack.received()
    assert after[headers[PREFILLED_BY]] == before[headers[PREFILLED_BY]] + 1
    assert after[headers[SERVED_BY]] == before[headers[SERVED_BY]] + 1
    assert sum(after.values()) == sum(before.values()) + 2
    assert sum(s.prefills for s in stack.sidecars) >= 1


async def test_short_prompt_is_decode_only_and_a_spoofed_prefill_host_is_dropped(stack: PdStack) -> None:
    before = stack.received()
    spoof = {PREFILL_HEADER: stack.outsider.address}
    status, headers, body = await complete(stack, "What is 2 + 2?", headers=spoof)
    assert status == 200, (body[:300], stack.diagnostics())
    assert headers[SERVED_BY] in {d.name for d in stack.decodes}
    assert PREFILLED_BY not in headers
    after = stack.received()
    assert after["outsider"] == 0
    assert sum(after.values()) == sum(before.values()) + 1


async def test_epp_counts_its_decisions_and_envoy_saw_no_protocol_errors(stack: PdStack) -> None:
    before = await decisions(stack.epp)
    for prompt in (make_text(random.Random(2), 1500), make_text(random.Random(3), 1500), "Hi there"):
        status, _, _ = await complete(stack, prompt)
        assert status == 200, stack.diagnostics()
    after = await decisions(stack.epp)
    assert after.get("prefill-decode", 0) - before.get("prefill-decode", 0) == 2, (before, after)
    assert after.get("decode-only", 0) - before.get("decode-only", 0) == 1, (before, after)
    stats = await stack.gateway.stats("ext_proc")
    prefix = "http.inference_gateway.ext_proc."
    for name in ("streams_failed", "rejected_header_mutations", "spurious_msgs_received", "message_timeouts"):
        assert stats[prefix + name] == 0, (name, stats, stack.diagnostics())


async def test_pd_bench_short_run() -> None:
    require_envoy()
    cfg = PdBenchConfig(
        simulators=2,
        prefill=1,
        rate=8.0,
        requests=6,
        system_tokens=64,
        groups=2,
        prompt_tokens=600,
        output_tokens=8,
        sim_args=["--time-factor", "0.1"],
        max_seconds=30.0,
    )
    doc = await run_pd_bench(cfg)
    aggregated, pd = doc["policies"]["aggregated"], doc["policies"]["pd"]
    assert (aggregated["errors"], pd["errors"]) == (0, 0)
    assert aggregated["requests"] == pd["requests"] == 6
    assert aggregated["decisions"] == {}  # the default config has no P/D handler
    assert pd["decisions"] == {"prefill-decode": 6}  # 664-token prompts, threshold 512
    for figures in (aggregated, pd):
        assert not math.isnan(figures["ttft_p50_s"]) and figures["output_tokens_per_s"] > 0
    text = pd_table(doc)
    assert "aggregated" in text and "pd" in text and "prefill-decode" in text
