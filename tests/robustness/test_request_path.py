"""The ext_proc request path under hostile clients (issue 13): what a client and an operator see.

A repeated phase is refused and frees the first pick; headers-only requests go through the profile
filters and header hygiene; deep JSON is a 400 with a reason; refusals are logged one line each,
rate-limited; the stream limit, the idle timeout, the body size cap and the body memory budget
answer at once; and 20 concurrent 60 MB bodies keep an epp process within its budget.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.extproc import limits
from epp.settings import parse_settings
from epp_bench.gateway import EnvoyGateway, EnvoyNotFoundError, find_envoy_binary
from tests.plugins.test_pd import pd_config
from tests.serving.support import epp_command
from tests.support.epp_app import RunningEpp, metrics_page_with, running_epp, wait_until
from tests.support.extproc_client import ExtProcClient, body_msgs, headers_msg, one_request, request_headers
from tests.support.fake_vllm import FakeVllm

DEST = "x-gateway-destination-endpoint"
TOO_LARGE = rb"inference error: BadRequest - request body of (\d+) bytes exceeds the limit of 8388608 bytes"
PREFILL_HEADER = "x-prefiller-host-port"
DROPPED = "x-llm-d-request-dropped-reason"
ENDPOINTS = "127.0.0.2:8000,127.0.0.3:8000"
MiB = 1024 * 1024


def completion(prompt: object = "hello world", **extra: object) -> bytes:
    return orjson.dumps({"model": "m", "prompt": prompt, **extra})


def set_headers(reply: pb.ProcessingResponse) -> dict[str, str]:
    mutation = reply.request_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def removed_headers(reply: pb.ProcessingResponse) -> list[str]:
    return list(reply.request_headers.response.header_mutation.remove_headers)


def immediate_headers(reply: pb.ProcessingResponse) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in reply.immediate_response.headers.set_headers}


def sample_sum(epp: RunningEpp, name: str) -> float:
    return sum(s.value for m in epp.app.metrics.registry.collect() for s in m.samples if s.name == name)


def running(epp: RunningEpp) -> float:
    return sample_sum(epp, "llm_d_epp_request_running")


def in_flight(epp: RunningEpp) -> int:
    return sum(ep.inflight_requests for ep in epp.app.datastore.endpoints())


def refusals(epp: RunningEpp, reason: str) -> float:
    value = epp.app.metrics.registry.get_sample_value("llm_d_epp_extproc_refusals_total", {"reason": reason})
    return value or 0.0


def gauge(epp: RunningEpp, name: str) -> float:
    return epp.app.metrics.registry.get_sample_value(name) or 0.0


async def all_freed(epp: RunningEpp) -> None:
    """After every stream closed: nothing in flight, nothing charged, no stream open."""
    await wait_until(
        lambda: (
            running(epp) == 0
            and in_flight(epp) == 0
            and gauge(epp, "llm_d_epp_request_body_memory_bytes") == 0
            and gauge(epp, "llm_d_epp_extproc_streams_open") == 0
        ),
        what="every stream's state freed",
    )


async def ended(client: ExtProcClient) -> bool:
    """The server ended the stream (cleanly): EOF is what is left to read."""
    return await asyncio.wait_for(client._call.read(), 5.0) is grpc.aio.EOF


# --- a repeated phase -------------------------------------------------------------------------------


async def test_a_second_request_headers_is_refused_and_frees_the_first_pick() -> None:
    """Decided: refused (a 400 naming the protocol error), not restarted. The stream ends and its
    first pick is released: the running gauge and the endpoint's in-flight count go back to 0."""
    async with running_epp("--endpoints", ENDPOINTS) as epp:
        for first_request, model_running in (
            ([headers_msg(request_headers()), *body_msgs(completion(), 1000)], 1),  # routed on its body
            ([headers_msg({":method": "GET", ":path": "/v1/models"}, end_of_stream=True)], 0),  # no model
        ):
            client = ExtProcClient(epp.stub)
            client.send(first_request)
            routed = (await client.read(len(first_request)))[0]
            endpoint = epp.app.datastore.get(set_headers(routed)[DEST])
            assert endpoint is not None and endpoint.inflight_requests == 1
            assert running(epp) == model_running
            client.send([headers_msg(request_headers())])
            (reply,) = await client.read(1)
            assert reply.immediate_response.status.code == 400
            assert b"ext_proc protocol error: request headers received twice" in reply.immediate_response.body
            assert await ended(client)
            await all_freed(epp)
        assert refusals(epp, "protocol-error") == 2


async def test_a_request_body_after_routing_is_refused_and_frees_the_pick() -> None:
    """A body after the request ended (with its headers, or its body's end of stream) is a 400,
    not a reply left unsent: the stream ends and its pick is released."""
    async with running_epp("--endpoints", ENDPOINTS) as epp:
        for routed_by in (
            [headers_msg({":method": "GET", ":path": "/v1/models"}, end_of_stream=True)],
            [headers_msg(request_headers()), *body_msgs(completion(), 1000)],
        ):
            client = ExtProcClient(epp.stub)
            client.send(routed_by)
            await client.read(len(routed_by))
            assert in_flight(epp) == 1
            client.send(body_msgs(b"{}", 100))
            (reply,) = await client.read(1)
            assert reply.immediate_response.status.code == 400
            assert b"request body after the request was routed" in reply.immediate_response.body
            assert await ended(client)
            await all_freed(epp)
        assert refusals(epp, "protocol-error") == 2


async def test_messages_out_of_order_are_refused() -> None:
    async with running_epp("--endpoints", ENDPOINTS) as epp:
        for msgs in (
            body_msgs(completion(), 100),  # a body with no headers
            [pb.ProcessingRequest(request_trailers=pb.HttpTrailers())],
            [headers_msg({":status": "200"}, response=True)],  # a response before any request
            [headers_msg(request_headers()), headers_msg({":status": "200"}, response=True)],
            [pb.ProcessingRequest()],  # nothing in it
        ):
            client = ExtProcClient(epp.stub)
            client.send(msgs)
            (reply,) = await client.read(1)
            assert reply.immediate_response.status.code == 400, msgs
            assert b"ext_proc protocol error" in reply.immediate_response.body
            assert await ended(client)
        await all_freed(epp)


# --- headers-only requests --------------------------------------------------------------------------


def endpoints_file(tmp_path: Path, roles: dict[str, str]) -> Path:
    entries = [
        {"address": address, "port": 8000, "name": address, "labels": {"llm-d.ai/role": role}}
        for address, role in roles.items()
    ]
    path = tmp_path / "endpoints.yaml"
    path.write_text(yaml.safe_dump(entries))
    return path


async def test_headers_only_requests_go_through_the_pd_filters_and_lose_a_clients_prefill_header(
    tmp_path: Path,
) -> None:
    """With P/D (and a decider that always disaggregates), a GET never goes to the prefill pod and
    is never disaggregated; a client's x-prefiller-host-port is removed, never passed on."""
    roles = {"127.0.0.2": "decode", "127.0.0.3": "decode", "127.0.0.4": "prefill"}
    config = pd_config(decider="always-disagg-pd-decider")
    path = endpoints_file(tmp_path, roles)
    async with running_epp("--endpoints-file", str(path), "--config-text", config) as epp:
        await wait_until(lambda: len(epp.app.datastore) == 3, what="endpoints")
        spoofed = {":method": "GET", ":path": "/v1/models", PREFILL_HEADER: "10.6.6.6:80"}
        destinations = set()
        for _ in range(40):
            client = ExtProcClient(epp.stub)
            client.send([headers_msg(spoofed, end_of_stream=True)])
            (reply,) = await client.read(1)
            destinations.add(set_headers(reply)[DEST])
            assert PREFILL_HEADER not in set_headers(reply)
            assert removed_headers(reply) == [PREFILL_HEADER]
            await client.close()
        assert destinations == {"127.0.0.2:8000", "127.0.0.3:8000"}
        # A body request is disaggregated as before: epp's own x-prefiller-host-port replaces the client's.
        spoofed_post = request_headers(**{PREFILL_HEADER: "10.6.6.6:80"})
        replies = await one_request(epp.stub, spoofed_post, completion())
        assert set_headers(replies[0])[PREFILL_HEADER] == "127.0.0.4:8000"
        assert removed_headers(replies[0]) == []
        await all_freed(epp)


async def test_headers_only_request_filtered_to_nothing_is_a_429(tmp_path: Path) -> None:
    roles = {"127.0.0.4": "prefill"}  # no decode pod: the decode profile's filter leaves nothing
    config = pd_config()
    path = endpoints_file(tmp_path, roles)
    async with running_epp("--endpoints-file", str(path), "--config-text", config) as epp:
        await wait_until(lambda: len(epp.app.datastore) == 1, what="endpoints")
        client = ExtProcClient(epp.stub)
        client.send([headers_msg({":method": "GET", ":path": "/v1/models"}, end_of_stream=True)])
        (reply,) = await client.read(1)
        assert reply.immediate_response.status.code == 429
        assert b"no endpoint passed the filters of profile decode" in reply.immediate_response.body


async def test_the_default_config_never_passes_a_clients_prefill_header_on() -> None:
    async with running_epp("--endpoints", ENDPOINTS) as epp:
        spoofed = request_headers(**{PREFILL_HEADER: "10.6.6.6:80"})
        replies = await one_request(epp.stub, spoofed, completion())
        assert removed_headers(replies[0]) == [PREFILL_HEADER]
        client = ExtProcClient(epp.stub)
        client.send([headers_msg({**spoofed, ":method": "GET", ":path": "/v1/models"}, end_of_stream=True)])
        (reply,) = await client.read(1)
        assert removed_headers(reply) == [PREFILL_HEADER]
        await client.close()
        # Without the header nothing is removed.
        replies = await one_request(epp.stub, request_headers(), completion())
        assert removed_headers(replies[0]) == []


SESSION_AFFINITY = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins: [{type: session-affinity-scorer}, {type: queue-scorer}]
schedulingProfiles:
- name: default
  plugins: [{pluginRef: session-affinity-scorer, weight: 10}, {pluginRef: queue-scorer}]
"""


@pytest.mark.parametrize(
    "odd",
    [
        {"content-length": "\u00b2"},  # a digit to str.isdigit, not to int()
        {"x-session-token": "caf\u00e9"},  # not base64: no session, not an error
        {"x-session-token": "\ufffd\ufffd"},  # what a header's non-UTF-8 bytes decode to
    ],
)
async def test_odd_header_values_are_routed_not_internal_errors(odd: dict[str, str]) -> None:
    async with running_epp("--endpoints", ENDPOINTS, "--config-text", SESSION_AFFINITY) as epp:
        body = completion()
        headers = request_headers(**odd)
        if "content-length" not in odd:
            headers["content-length"] = str(len(body))
        replies = await one_request(epp.stub, headers, body)
        assert not replies[0].HasField("immediate_response"), replies[0]
        assert set_headers(replies[0])[DEST] in ENDPOINTS.split(",")
        await all_freed(epp)


# --- deep JSON and the log of refusals --------------------------------------------------------------


def nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


def deep(depth: int, chat: bool = False) -> bytes:
    inner = b"[" * depth + b"1" + b"]" * depth
    if chat:
        return b'{"model":"m","messages":[{"role":"user","content":' + inner + b"}]}"
    return b'{"model":"m","prompt":' + inner + b"}"


async def test_deeply_nested_json_is_a_400_with_a_reason_and_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="epp")
    async with running_epp("--endpoints", ENDPOINTS) as epp:
        replies = await one_request(epp.stub, request_headers(), deep(200))
        assert replies[0].HasField("request_headers")  # deep but within limits: routed
        cases = [(deep(300), "/v1/completions"), (deep(1000, chat=True), "/v1/chat/completions")]
        cases += [(deep(1100), "/v1/completions"), (deep(100_000), "/v1/completions")]
        caplog.clear()
        for body, path in cases:
            replies = await one_request(epp.stub, request_headers(path), body, chunk=65_536)
            immediate = replies[0].immediate_response
            assert immediate.status.code == 400, body[:40]
            assert immediate.body.startswith(b"inference error: BadRequest - request JSON is nested too")
        records = [r for r in caplog.records if r.name == "epp.extproc.handler"]
        assert len(records) == len(cases)
        assert all(r.levelno == logging.INFO and not r.exc_info for r in records)
        assert all("rejected: 400 request JSON is nested too deeply" in r.getMessage() for r in records)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_flood_of_bad_requests_is_logged_in_a_few_lines_and_a_summary(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "LOG_BURST", 5)
    monkeypatch.setattr(limits, "LOG_INTERVAL_S", 1.0)
    caplog.set_level(logging.INFO, logger="epp.extproc.handler")
    async with running_epp("--endpoints", ENDPOINTS) as epp:
        started = time.monotonic()
        for _ in range(10):
            await asyncio.gather(*(one_request(epp.stub, request_headers(), b"{not json") for _ in range(20)))
        intervals = int((time.monotonic() - started) / 1.0) + 1

        def lines() -> tuple[list[str], list[str]]:
            """The lines saying a request was rejected, and the summaries."""
            messages = [r.getMessage() for r in caplog.records if r.name == "epp.extproc.handler"]
            rejected = [m for m in messages if "rejected: 400 request body is not valid JSON" in m]
            return rejected, [m for m in messages if m.startswith("suppressed ")]

        def accounted() -> int:
            rejected, summaries = lines()
            return len(rejected) + sum(int(line.split()[1]) for line in summaries)

        # Every rejection is either a line or counted in a summary (the last one at its interval's end).
        await wait_until(lambda: accounted() == 200, timeout=3, what="every rejection accounted for")
        rejected, summaries = lines()
        assert 5 <= len(rejected) <= 5 * intervals
        assert summaries and all(line.endswith("similar log lines in the last 1s") for line in summaries)


# --- the stream limit and the idle timeout ----------------------------------------------------------


async def test_beyond_the_stream_limit_a_new_stream_gets_an_immediate_counted_429() -> None:
    async with running_epp("--endpoints", ENDPOINTS, "--max-extproc-streams", "3") as epp:
        held = []
        for _ in range(3):  # three requests routed, waiting for their responses
            client = ExtProcClient(epp.stub)
            client.send([headers_msg({":method": "GET", ":path": "/v1/models"}, end_of_stream=True)])
            await client.read(1)
            held.append(client)
        assert gauge(epp, "llm_d_epp_extproc_streams_open") == 3
        replies = await one_request(epp.stub, request_headers(), completion())
        immediate = replies[0].immediate_response
        assert immediate.status.code == 429
        assert b"too many ext_proc streams open (--max-extproc-streams=3)" in immediate.body
        assert immediate_headers(replies[0])[DROPPED] == "rejected-saturated"
        assert refusals(epp, "stream-limit") == 1
        labels = {
            "model_name": "",
            "target_model_name": "",
            "fairness_id": "default-flow",
            "priority": "0",
            "error_code": "ResourceExhausted",
        }
        assert epp.app.metrics.registry.get_sample_value("llm_d_epp_request_error_total", labels) == 1
        held.pop().cancel()  # one ends: there is room again
        await wait_until(lambda: gauge(epp, "llm_d_epp_extproc_streams_open") == 2, what="room")
        replies = await one_request(epp.stub, request_headers(), completion())
        assert replies[0].HasField("request_headers")
        for client in held:
            await client.close()
        await all_freed(epp)


async def test_an_idle_stream_ends_and_its_state_is_freed() -> None:
    async with running_epp("--endpoints", ENDPOINTS, "--extproc-stream-idle-timeout", "1s") as epp:
        # The request stalls while its body arrives: a 408, and its budget charge is given back.
        client = ExtProcClient(epp.stub)
        client.send([headers_msg(request_headers(**{"content-length": "1000"}))])
        await wait_until(lambda: gauge(epp, "llm_d_epp_request_body_memory_bytes") > 0, what="charge")
        (reply,) = await client.read(1, timeout=3)
        assert reply.immediate_response.status.code == 408
        assert b"no request data for 1s" in reply.immediate_response.body
        assert await ended(client)
        await all_freed(epp)

        # A routed request whose response is slow to start (a long non-streamed generation): the
        # stream waits past the timeout, as long as the gateway does, and the response goes through.
        client = ExtProcClient(epp.stub)
        client.send([headers_msg(request_headers()), *body_msgs(completion(), 100)])
        await client.read(2)
        assert in_flight(epp) == 1 and running(epp) == 1
        await asyncio.sleep(2.5)
        assert in_flight(epp) == 1 and gauge(epp, "llm_d_epp_extproc_streams_open") == 1
        client.send(
            [
                headers_msg({":status": "200", "content-type": "application/json"}, response=True),
                *body_msgs(b'{"choices": []}', 100, response=True),
            ]
        )
        replies = await client.read(2)
        assert replies[0].HasField("response_headers") and replies[1].HasField("response_body")
        await client.close()
        assert await ended(client)
        await all_freed(epp)
        assert refusals(epp, "idle-timeout") == 1

        # A stream that keeps sending lives as long as it needs.
        client = ExtProcClient(epp.stub)
        client.send([headers_msg(request_headers())])
        body = completion("slow " * 100)
        for part in body_msgs(body, len(body) // 6 + 1):  # 1.2 s in all, a message every 0.2 s
            await asyncio.sleep(0.2)
            client.send([part])
        replies = await client.read(2)
        assert replies[0].HasField("request_headers")
        await client.close()
        await all_freed(epp)


class FreezableRelay:
    """A TCP relay between a gRPC client and epp that can go silent with both connections left
    open: a gateway (or the network path to it) gone without a FIN or a reset."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._pipes: list[asyncio.Task[None]] = []
        self._writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        self._writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            self._pipes.append(asyncio.create_task(self._pipe(source, sink)))

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()

    def freeze(self) -> None:
        for pipe in self._pipes:
            pipe.cancel()

    async def close(self) -> None:
        self.freeze()
        for writer in self._writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_a_gateway_gone_silent_has_its_routed_streams_ended_by_keepalive() -> None:
    """A routed stream has no idle timeout: what ends it when the gateway vanishes without closing
    its connection is gRPC keepalive. Shortened here (epp pings every 60 s, waits 20 s for the
    answer): while the gateway answers pings its routed stream lives on; once it is silent the
    stream ends and its pick is released."""
    async with running_epp(
        "--endpoints", ENDPOINTS, "--extproc-stream-idle-timeout", "1s",
        grpc_keepalive_time_s=0.5, grpc_keepalive_timeout_s=0.5,
    ) as epp:  # fmt: skip
        relay = FreezableRelay(epp.grpc_port)
        await relay.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}")
        try:
            client = ExtProcClient(pb_grpc.ExternalProcessorStub(channel))
            client.send([headers_msg(request_headers()), *body_msgs(completion(), 100)])
            await client.read(2)
            await asyncio.sleep(2.5)  # pings answered: the routed stream lives on
            assert in_flight(epp) == 1 and running(epp) == 1
            relay.freeze()
            await all_freed(epp)
        finally:
            await channel.close()
            await relay.close()


# --- body size and the body memory budget -----------------------------------------------------------


async def test_a_body_over_the_size_limit_is_a_413_at_once() -> None:
    async with running_epp(
        "--endpoints", ENDPOINTS, "--max-request-body-size", "1MiB", "--request-body-memory-budget", "5MiB"
    ) as epp:
        client = ExtProcClient(epp.stub)  # declared: refused before any body arrives
        client.send([headers_msg(request_headers(**{"content-length": str(2 * MiB)}))])
        (reply,) = await client.read(1)
        assert reply.immediate_response.status.code == 413
        assert f"request body of {2 * MiB} bytes exceeds the limit of {MiB} bytes".encode() in (
            reply.immediate_response.body
        )
        assert await ended(client)
        # Not declared: refused at the chunk that crosses the limit.
        replies = await one_request(epp.stub, request_headers(), completion("x" * 2 * MiB), chunk=256 * 1024)
        assert replies[0].immediate_response.status.code == 413
        assert refusals(epp, "body-too-large") == 2
        await all_freed(epp)


async def test_a_body_that_may_parse_into_wide_text_is_charged_for_it() -> None:
    """Non-ASCII bytes or a \\u escape may parse into strings of up to 4 bytes a character: such a
    body is charged 14 bytes a byte while it is parsed, an ASCII one 5 (other JSON escapes, such as
    \\n, included). A 100 kB body fits a 1 MiB budget as ASCII text, not as wide text: as no
    epp with that budget could ever hold it, it is refused as too large (413), not as a 429 that
    a client would retry for ever."""
    async with running_epp(
        "--endpoints", ENDPOINTS, "--max-request-body-size", "200000", "--request-body-memory-budget", "1MiB"
    ) as epp:

        def body(unit: bytes) -> bytes:  # the prompt's JSON text, as it goes on the wire
            head, tail = b'{"model":"m","prompt":"', b'"}'
            return head + unit * ((100_000 - len(head) - len(tail)) // len(unit)) + tail

        for ascii_text in (body(b"x"), body(b"line\\n"), body(b'say \\"hi\\" '), body(b"a\\\\b ")):
            replies = await one_request(epp.stub, request_headers(), ascii_text)
            assert replies[0].HasField("request_headers"), replies[0].immediate_response.body
        wide_texts = (body(b"caf\\u00e9 "), body(b"x" * 500 + b"\\ud83d\\ude00"), body("é".encode()))
        for wide in wide_texts:
            replies = await one_request(epp.stub, request_headers(), wide)
            assert replies[0].immediate_response.status.code == 413, replies[0]
            text = replies[0].immediate_response.body
            assert b"with wide text" in text and b"--request-body-memory-budget" in text
        assert refusals(epp, "body-too-large") == len(wide_texts)
        assert refusals(epp, "body-memory-budget") == 0
        await all_freed(epp)


async def test_a_body_of_empty_containers_is_charged_for_what_it_parses_into() -> None:
    """`{},` is 3 bytes of body and a 64-byte dict: a body of them is charged by its containers,
    not 5 bytes a byte, and one an epp with this budget could never hold is a 413. A prompt full
    of brackets costs only a little more than plain text."""
    async with running_epp(
        "--endpoints", ENDPOINTS, "--max-request-body-size", "1MiB", "--request-body-memory-budget", "5MiB"
    ) as epp:
        empties = b'{"model":"m","prompt":"hi","user":[' + b"{}," * 100_000 + b"{}]}"  # 300 kB
        replies = await one_request(epp.stub, request_headers(), empties)
        assert replies[0].immediate_response.status.code == 413, replies[0]
        assert b"of 100003 JSON objects and arrays" in replies[0].immediate_response.body
        brackets = completion("[x] {y} " * 10_000)  # 80 kB: 20,000 brackets in a string
        replies = await one_request(epp.stub, request_headers(), brackets)
        assert replies[0].HasField("request_headers"), replies[0].immediate_response.body
        assert refusals(epp, "body-too-large") == 1
        await all_freed(epp)


@pytest.mark.parametrize("size", [100, 4095, 4096, 100_000])
def test_the_structure_count_is_every_brace_bracket_and_comma_whatever_the_size(size: int) -> None:
    from epp.extproc.handler import _structure

    rng = random.Random(size)
    body = bytes(rng.choice(b'{[]}"azZ{|;:,\x7b\x5b\xfb\xdb') for _ in range(size))
    assert _structure(body) == (body.count(b"{") + body.count(b"["), body.count(b","))


async def test_a_body_the_budget_cannot_hold_now_is_a_429_until_there_is_room() -> None:
    async with running_epp(
        "--endpoints", ENDPOINTS, "--max-request-body-size", "1MiB", "--request-body-memory-budget", "5MiB"
    ) as epp:
        body = completion("x" * (MiB - len(completion(""))))
        assert len(body) == MiB
        big = ExtProcClient(epp.stub)  # declares a body that takes the whole budget
        big.send([headers_msg(request_headers(**{"content-length": str(len(body))}))])
        big.send(body_msgs(body[: len(body) // 2], 65_536, end=False))
        charged = 5 * len(body)
        await wait_until(lambda: gauge(epp, "llm_d_epp_request_body_memory_bytes") == charged, what="charge")

        small = completion("hi")
        replies = await one_request(epp.stub, request_headers(**{"content-length": str(len(small))}), small)
        assert replies[0].immediate_response.status.code == 429
        assert b"the request body memory budget is full" in replies[0].immediate_response.body
        assert immediate_headers(replies[0])[DROPPED] == "rejected-saturated"
        replies = await one_request(epp.stub, request_headers(), small)  # undeclared: the same
        assert replies[0].immediate_response.status.code == 429
        assert refusals(epp, "body-memory-budget") == 2

        big.send(body_msgs(body[len(body) // 2 :], 65_536))
        routed = await big.read(2 + len(body) // 62_000)
        assert routed[0].HasField("request_headers")
        echoed = [r.request_body.response.body_mutation.streamed_response.body for r in routed[1:]]
        assert b"".join(echoed) == body
        await big.close()
        await all_freed(epp)
        replies = await one_request(epp.stub, request_headers(), small)
        assert replies[0].HasField("request_headers")


# --- memory under concurrent huge bodies ------------------------------------------------------------


def memory_mib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in MiB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024
    return out


async def send_huge(stub: pb_grpc.ExternalProcessorStub, body: bytes, declare: bool) -> tuple[str, int]:
    """One request with a huge body in 64 KiB chunks, as Envoy streams it: (outcome, bytes echoed)."""
    headers = request_headers(**({"content-length": str(len(body))} if declare else {}))

    async def messages() -> AsyncIterator[pb.ProcessingRequest]:
        yield headers_msg(headers)
        view = memoryview(body)
        for start in range(0, len(body), 65_536):
            chunk = bytes(view[start : start + 65_536])
            yield pb.ProcessingRequest(
                request_body=pb.HttpBody(body=chunk, end_of_stream=start + 65_536 >= len(body))
            )

    call = stub.Process(messages())
    outcome, echoed = "", 0
    async for reply in call:
        if reply.HasField("immediate_response"):
            return str(reply.immediate_response.status.code), 0
        if reply.HasField("request_headers"):
            outcome = "routed"
        streamed = reply.request_body.response.body_mutation.streamed_response
        echoed += len(streamed.body)
        if streamed.end_of_stream:
            call.cancel()  # the request is done with (Envoy would go on with the response)
            break
    return outcome, echoed


async def test_twenty_concurrent_60_mb_bodies_stay_within_the_memory_budget(tmp_path: Path) -> None:
    """The default budget (320 MiB for 5 bytes a body byte): RSS stays under it plus the baseline,
    the bodies that fit are routed whole, the others get a 429 at once. (Before the budget: a
    3.6 GiB peak.)"""
    budget_mib = 320
    async with epp_command(tmp_path, "--secure-serving=false", "--endpoints", ENDPOINTS) as epp:
        await epp.wait_serving()
        options = [("grpc.max_receive_message_length", 64 * MiB)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.grpc_port}", options=options) as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            await send_huge(stub, completion("warm up"), declare=True)
            baseline = memory_mib(epp.proc.pid)["VmRSS"]
            body = completion("x" * 60_000_000)
            results = await asyncio.wait_for(
                asyncio.gather(*(send_huge(stub, body, declare=i % 2 == 0) for i in range(20))), 60
            )
        peak = memory_mib(epp.proc.pid)["VmHWM"]
        assert peak - baseline < budget_mib, (baseline, peak)
        routed = [r for r in results if r[0] == "routed"]
        assert routed and all(echoed == len(body) for _, echoed in routed)
        assert all(outcome == "429" for outcome, _ in results if outcome != "routed")
        text = await metrics_page_with(epp.metrics_port, "llm_d_epp_request_body_memory_bytes 0.0", 5.0)
        assert "llm_d_epp_extproc_streams_open 0.0" in text
        assert f'llm_d_epp_extproc_refusals_total{{reason="body-memory-budget"}} {20 - len(routed)}.0' in text


async def hold_routed(
    stub: pb_grpc.ExternalProcessorStub, path: str, body: bytes
) -> tuple[Any, asyncio.Event]:
    """Route one request and keep its stream open, as a request waiting for its response: the
    call, and the event that ends it."""
    done = asyncio.Event()

    async def messages() -> AsyncIterator[pb.ProcessingRequest]:
        yield headers_msg(request_headers(path))
        for start in range(0, len(body), 65_536):
            end = start + 65_536 >= len(body)
            yield pb.ProcessingRequest(
                request_body=pb.HttpBody(body=body[start : start + 65_536], end_of_stream=end)
            )
        await done.wait()

    call = stub.Process(messages())
    async for reply in call:
        assert not reply.HasField("immediate_response"), reply.immediate_response.body
        if reply.request_body.response.body_mutation.streamed_response.end_of_stream:
            return call, done
    raise AssertionError("the stream ended before its body was sent back")


PHRASE = "The quick brown fox jumps over the lazy dog. "
HELD_SHAPES = {  # about 3.8 MB each: (path, body)
    "completion": ("/v1/completions", {"model": "m", "prompt": PHRASE * 86_000}),
    "chat, 2 kB messages": (
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": PHRASE * 44}] * 1_900},
    ),
    "chat, 30-byte messages": (
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "hi"}] * 120_000},
    ),
    "token ids": ("/v1/completions", {"model": "m", "prompt": list(range(100_000, 670_000))}),
    "distinct keys": (
        "/v1/completions",
        {"model": "m", "prompt": "x", "extra": {f"key{i}": i for i in range(250_000)}},
    ),
}


@pytest.mark.parametrize("shape", HELD_SHAPES)
async def test_routed_requests_are_charged_at_least_the_memory_they_hold(tmp_path: Path, shape: str) -> None:
    """Eight routed requests of one shape held open (waiting for their responses): epp's RSS grows
    by no more than the budget charges them, whatever the body parses into (a prompt of token ids
    holds 7.8x its size, which 5 bytes a byte used to undercharge). Once sent back, a body's own
    bytes are no longer charged: a completion is charged 4 bytes a byte while it waits."""
    path, payload = HELD_SHAPES[shape]
    body = orjson.dumps(payload)
    async with epp_command(
        tmp_path, "--secure-serving=false", "--endpoints", ENDPOINTS, "--request-body-memory-budget", "2GiB"
    ) as epp:
        await epp.wait_serving()
        options = [("grpc.max_receive_message_length", 64 * MiB)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.grpc_port}", options=options) as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            await send_huge(stub, completion("warm up"), declare=True)
            baseline = memory_mib(epp.proc.pid)["VmRSS"]
            held = [await hold_routed(stub, path, body) for _ in range(8)]
            await asyncio.sleep(0.5)
            grown = memory_mib(epp.proc.pid)["VmRSS"] - baseline
            text = await metrics_page_with(epp.metrics_port, "llm_d_epp_request_body_memory_bytes")
            charged = float(re.search(r"^llm_d_epp_request_body_memory_bytes (\S+)$", text, re.M)[1]) / MiB  # type: ignore[index]
            assert grown <= charged, (shape, grown, charged)
            if shape == "completion":
                assert charged == pytest.approx(8 * 4 * len(body) / MiB, rel=0.01)
            for call, done in held:
                done.set()
                call.cancel()
        await metrics_page_with(epp.metrics_port, "llm_d_epp_request_body_memory_bytes 0.0", 5.0)


async def test_through_a_real_envoy_clients_see_413_429_and_no_spoofed_prefill_header(tmp_path: Path) -> None:
    """What an HTTP client sees through the gateway (a real Envoy, failure_mode_allow false)."""
    try:
        find_envoy_binary()
    except EnvoyNotFoundError as exc:
        pytest.fail(f"{exc} (this test needs the real Envoy binary: run `make tools`)")
    limits = ("--max-request-body-size", "8MiB", "--request-body-memory-budget", "40MiB")
    async with AsyncExitStack() as stack:
        fake = await FakeVllm("a").start()
        stack.push_async_callback(fake.stop)
        flags = ("--secure-serving=false", "--endpoints", fake.address, *limits)
        epp = await stack.enter_async_context(epp_command(tmp_path, *flags))
        await epp.wait_serving()
        gateway = await EnvoyGateway("epp", epp_grpc_port=epp.grpc_port).start()
        stack.push_async_callback(gateway.stop)
        session = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        )
        url = gateway.url + "/v1/completions"

        async def post(data: object, **headers: str) -> tuple[int, str | None, bytes]:
            async with session.post(
                url, data=data, headers={"content-type": "application/json", **headers}
            ) as r:
                return r.status, r.headers.get(DROPPED), await r.read()

        too_large = completion("x" * 9_000_000)

        async def chunked() -> AsyncIterator[bytes]:  # no content-length: refused mid-body
            for start in range(0, len(too_large), 100_000):
                yield too_large[start : start + 100_000]

        for data in (too_large, chunked()):
            status, _, body = await post(data)
            assert status == 413
            # Declared, the whole size is refused; chunked, the size received when it passed the
            # limit (how Envoy cuts the chunks varies from run to run).
            refused = re.match(TOO_LARGE, body)
            assert refused is not None, body[:200]
            assert 8_388_608 < int(refused.group(1)) <= len(too_large)
            if data is too_large:
                assert int(refused.group(1)) == len(too_large)
        # Ten 6 MB bodies at once: the budget holds one; the others are refused at once.
        results = await asyncio.gather(*(post(completion("y" * 6_000_000)) for _ in range(10)))
        statuses = sorted(status for status, _, _ in results)
        assert statuses[0] == 200 and statuses[-1] == 429, statuses
        assert {dropped for status, dropped, _ in results if status == 429} == {"rejected-saturated"}
        assert (await post(completion("y" * 6_000_000)))[0] == 200  # room again: it goes through
        # A client's x-prefiller-host-port never reaches the model server, with or without a body.
        async with session.get(gateway.url + "/v1/models", headers={PREFILL_HEADER: "10.6.6.6:80"}) as r:
            assert r.status == 200
        assert (await post(completion(), **{PREFILL_HEADER: "10.6.6.6:80"}))[0] == 200
        assert fake.received[-2]["path"] == "/v1/models"
        for received in fake.received[-2:]:
            assert PREFILL_HEADER not in {k.lower() for k in received["headers"]}


def test_the_limit_flags_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    settings = parse_settings(["--endpoints", "127.0.0.2:8000"])
    assert (settings.max_request_body_size, settings.request_body_memory_budget) == (64 * MiB, 320 * MiB)
    assert (settings.max_extproc_streams, settings.extproc_stream_idle_timeout_s) == (10_000, 300.0)
    with pytest.raises(SystemExit) as exit_:
        parse_settings(["--endpoints", "127.0.0.2:8000", "--request-body-memory-budget", "100MiB"])
    assert exit_.value.code == 2
    assert "at least 5 x --max-request-body-size" in capsys.readouterr().err
