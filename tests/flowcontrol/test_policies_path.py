"""Flow-control policies through epp's ext_proc server (real gRPC on loopback).
program-aware-fairness: the tokens a response reports become its program's attained service, and
when a slot frees the waiting program that has used less goes first, even if the other's request
has waited longer (the upstream sample config's shape: the policy on the default band).
slo-deadline-ordering-policy: the request's SLO header reaches the queue and orders it."""

from __future__ import annotations

import orjson

from epp_scorers.flow_policies.program_aware import ProgramAwareFairness
from tests.support.epp_app import running_epp, wait_until
from tests.support.extproc_client import ExtProcClient, body_msgs, headers_msg, request_headers

CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: program-aware-fairness
- type: queue-scorer
- type: concurrency-detector
  parameters: {maxConcurrency: 1}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
flowControl:
  defaultRequestTTL: 10s
  saturationDetector: {pluginRef: concurrency-detector}
  defaultPriorityBand:
    fairnessPolicyRef: program-aware-fairness
"""
BODY = b'{"model": "m", "prompt": "hello"}'


def start(client: ExtProcClient, program: str, **extra: str) -> None:
    headers = request_headers(**{"x-llm-d-inference-fairness-id": program, **extra})
    client.send([headers_msg(headers), *body_msgs(BODY, 1024)])


async def routed(client: ExtProcClient) -> bool:
    """Whether the request was routed (its headers reply, then its body's)."""
    (reply,) = await client.read(1)
    if not reply.HasField("request_headers"):
        return False
    await client.read(1)
    return True


async def respond(client: ExtProcClient, prompt_tokens: int, completion_tokens: int) -> None:
    """The model server's answer, with its usage, as Envoy passes it through."""
    status = {":status": "200", "content-type": "application/json"}
    client.send([headers_msg(status, response=True)])
    await client.read(1)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    client.send(body_msgs(orjson.dumps({"choices": [], "usage": usage}), 4096, response=True))
    await client.read(1)
    await client.close()


def metric(epp_app: object, name: str, program: str) -> float | None:
    registry = epp_app.metrics.registry  # type: ignore[attr-defined]
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and sample.labels.get("program_id") == program:
                return float(sample.value)
    return None


async def test_the_program_that_used_less_goes_first() -> None:
    async with running_epp("--endpoints", "127.0.0.1:9", "--config-text", CONFIG) as epp:
        fc = epp.app.flow_controller
        assert fc is not None
        policy = next(p for p in epp.app.config.scheduler.plugins if isinstance(p, ProgramAwareFairness))
        # The heavy program has used 1,000 + 2 x 500 tokens.
        first = ExtProcClient(epp.stub)
        start(first, "heavy")
        assert await routed(first)
        await respond(first, 1000, 500)
        await wait_until(lambda: policy.programs["heavy"].service > 0, what="heavy's usage counted")
        # A second heavy request takes the only slot; a heavy and then a light one queue behind it.
        holder, heavy, light = (ExtProcClient(epp.stub) for _ in range(3))
        start(holder, "heavy")
        assert await routed(holder)
        start(heavy, "heavy")
        await wait_until(lambda: fc.queued == 1, what="the heavy request queued")
        start(light, "light")
        await wait_until(lambda: fc.queued == 2, what="the light request queued")
        await respond(holder, 10, 10)  # the slot frees: the light program goes, not the older heavy head
        assert await routed(light)
        assert fc.queued == 1
        await respond(light, 10, 10)
        assert await routed(heavy)  # and the heavy one next
        await respond(heavy, 10, 10)
        await wait_until(lambda: policy.programs["heavy"].in_flight == 0, what="every request ended")
        service = metric(epp.app, "llm_d_epp_program_aware_attained_service_tokens", "heavy")
        # 2,000 + 2 x 30 tokens, barely decayed (half-life 60 s).
        assert service is not None and 2000 < service <= 2060
        wait = metric(epp.app, "llm_d_epp_program_aware_avg_wait_time_milliseconds", "heavy")
        assert wait is not None and wait > 0
        assert policy.programs["light"].dispatched == 1


async def test_the_request_with_the_earliest_slo_deadline_goes_first() -> None:
    config = CONFIG.replace("type: program-aware-fairness", "type: slo-deadline-ordering-policy").replace(
        "fairnessPolicyRef: program-aware-fairness", "orderingPolicyRef: slo-deadline-ordering-policy"
    )
    async with running_epp("--endpoints", "127.0.0.1:9", "--config-text", config) as epp:
        fc = epp.app.flow_controller
        assert fc is not None
        holder, relaxed, urgent = (ExtProcClient(epp.stub) for _ in range(3))
        start(holder, "f")
        assert await routed(holder)
        start(relaxed, "f")  # no SLO: after every request that has one
        await wait_until(lambda: fc.queued == 1, what="the first request queued")
        start(urgent, "f", **{"x-llm-d-slo-ttft-ms": "200"})
        await wait_until(lambda: fc.queued == 2, what="the second request queued")
        await respond(holder, 1, 1)
        assert await routed(urgent)
        assert fc.queued == 1
        await respond(urgent, 1, 1)
        assert await routed(relaxed)
        await respond(relaxed, 1, 1)
