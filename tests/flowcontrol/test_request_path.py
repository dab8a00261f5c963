"""Flow control and admission through epp's ext_proc server (real gRPC on loopback): a request
waits while the pool is saturated and goes when a response completes; a full queue, a TTL and a
shutdown each answer at once with upstream's status and dropped reason; a sheddable request is
refused at once on a saturated pool with flow control off."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from tests.support.epp_app import running_epp, wait_until
from tests.support.extproc_client import ExtProcClient, body_msgs, headers_msg, request_headers

BODY = b'{"model": "m", "prompt": "hello"}'
CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: concurrency-detector
  parameters: {{maxConcurrency: 1}}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
flowControl:
  defaultRequestTTL: {ttl}
  saturationDetector: {{pluginRef: concurrency-detector}}
  priorityBands:
  - priority: 0
    maxRequests: 2
"""


def start(client: ExtProcClient, **headers: str) -> None:
    client.send([headers_msg(request_headers(**headers)), *body_msgs(BODY, 1024)])


async def first_reply(client: ExtProcClient, timeout: float = 5.0) -> pb.ProcessingResponse:
    (reply,) = await client.read(1, timeout)
    return reply


def refusal(reply: pb.ProcessingResponse) -> tuple[int, str]:
    immediate = reply.immediate_response
    headers = {h.header.key: h.header.raw_value.decode() for h in immediate.headers.set_headers}
    return immediate.status.code, headers.get("x-llm-d-request-dropped-reason", "")


async def test_queued_request_goes_when_a_response_completes() -> None:
    async with running_epp("--endpoints", "127.0.0.1:9", "--config-text", CONFIG.format(ttl="10s")) as epp:
        first, second, third, fourth = (ExtProcClient(epp.stub) for _ in range(4))
        start(first)
        assert (await first_reply(first)).HasField("request_headers")  # routed at once
        fc = epp.app.flow_controller
        assert fc is not None
        start(second)
        await wait_until(lambda: fc.queued == 1, what="the second request queued")  # first in line
        start(third)
        await wait_until(lambda: fc.queued == 2, what="two requests queued")
        start(fourth)  # the band holds 2: refused at once
        assert refusal(await first_reply(fourth)) == (429, "rejected-saturated")
        await first.read(1)  # the body reply
        first.send([headers_msg({":status": "200"}, end_of_stream=True, response=True)])
        assert (await first_reply(second)).HasField("request_headers")  # the slot went to the next
        third.cancel()  # the client gives up while queued
        await wait_until(lambda: fc.queued == 0, what="the cancelled request gone from the queue")
        for c in (first, second, fourth):
            await c.close()


async def test_a_bad_body_is_refused_at_once_and_never_queued() -> None:
    """The body is checked before the request waits for its turn: on a saturated pool, a body that
    is not a request, or one too large, gets its 400 / 413 at once and takes no place in a queue."""
    config = CONFIG.format(ttl="30s")
    async with running_epp(
        "--endpoints", "127.0.0.1:9", "--config-text", config, "--max-request-body-size", "1000"
    ) as epp:
        holder = ExtProcClient(epp.stub)
        start(holder)
        assert (await first_reply(holder)).HasField("request_headers")  # the pool is now saturated
        fc = epp.app.flow_controller
        assert fc is not None
        for body, status in (
            (b'{"model": 7}', 400),
            (b"{", 400),
            (b'{"model": "m", "prompt": "' + b"x" * 2000 + b'"}', 413),
        ):
            bad = ExtProcClient(epp.stub)
            bad.send([headers_msg(request_headers()), *body_msgs(body, 512)])
            reply = await first_reply(bad, timeout=2.0)
            assert reply.immediate_response.status.code == status, reply
            assert fc.queued == 0
            await bad.close()
        good = ExtProcClient(epp.stub)
        start(good)
        await wait_until(lambda: fc.queued == 1, what="a good request queued")  # as before
        holder.cancel()
        good.cancel()


async def test_ttl_and_shutdown_answer_queued_requests() -> None:
    async with running_epp("--endpoints", "127.0.0.1:9", "--config-text", CONFIG.format(ttl="200ms")) as epp:
        holder, late = ExtProcClient(epp.stub), ExtProcClient(epp.stub)
        start(holder)
        await first_reply(holder)
        loop = asyncio.get_running_loop()
        started = loop.time()
        start(late)
        assert refusal(await first_reply(late)) == (429, "rejected-ttl-expired")
        assert 0.19 < loop.time() - started < 2.0  # the TTL, not the 30 s the next request gets
        epp.app.flow_controller.config.ttl_s = 30.0  # type: ignore[union-attr]
        queued = ExtProcClient(epp.stub)
        start(queued)
        await wait_until(lambda: epp.app.flow_controller.queued == 1, what="one request queued")  # type: ignore[union-attr]
        stopping = asyncio.create_task(epp.app.stop(drain_timeout_s=2.0))
        assert refusal(await first_reply(queued)) == (503, "rejected-shutting-down")
        holder.cancel()
        await stopping


async def test_sheddable_request_is_refused_at_once_on_a_saturated_pool(tmp_path: Path) -> None:
    objectives = tmp_path / "objectives.yaml"
    objectives.write_text(
        "kind: InferenceObjective\nmetadata: {name: batch}\nspec: {priority: -1}\n---\n"
        "kind: InferenceObjective\nmetadata: {name: chat}\nspec: {priority: 10}\n"
    )
    # Flow control off; the endpoint is never scraped, so the default utilization-detector reads
    # it as saturated (fail closed).
    async with running_epp(
        "--endpoints", "127.0.0.1:9", "--inference-objectives-file", str(objectives)
    ) as epp:
        shed, chat = ExtProcClient(epp.stub), ExtProcClient(epp.stub)
        start(shed, **{"x-llm-d-inference-objective": "batch"})
        assert refusal(await first_reply(shed)) == (429, "rejected-saturated")
        start(chat, **{"x-gateway-inference-objective": "chat"})
        assert (await first_reply(chat)).HasField("request_headers")
        await chat.close()
        # The routed request is counted under its objective's priority.
        totals = {
            sample.labels["priority"]: sample.value
            for family in epp.app.metrics.registry.collect()
            if family.name == "llm_d_epp_request"
            for sample in family.samples
            if sample.name == "llm_d_epp_request_total"
        }
        assert totals == {"10": 1.0}


async def test_an_error_while_admitting_is_a_500_not_a_stream_ended_bare(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flow-control plugin that raises while a request is admitted (an ordering key from a bad
    header, a bug) answers that request with a 500, as an error while routing does."""
    async with running_epp("--endpoints", "127.0.0.1:9", "--config-text", CONFIG.format(ttl="10s")) as epp:

        async def broken(*args: object) -> None:
            raise ValueError("a plugin bug")

        monkeypatch.setattr(epp.app.director, "admit", broken)
        client = ExtProcClient(epp.stub)
        start(client)
        reply = await first_reply(client)
        assert reply.immediate_response.status.code == 500
        assert b"internal error: ValueError" in reply.immediate_response.body
        await client.close()
