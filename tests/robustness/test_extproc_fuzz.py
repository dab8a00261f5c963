"""A Hypothesis stateful fuzzer of ext_proc message sequences against a real epp over gRPC.

Each example opens a few streams and sends them any messages in any order (headers twice, bodies
before headers, garbage and deeply nested JSON, bodies too large for the limits, responses before
requests, empty messages, spoofed headers and subset hints), half-closes or cancels them. Then
every stream must end (an immediate response, EOF, or a gRPC status, never a hang), no reply may
be a 500, and once all are closed the running gauge, every endpoint's in-flight counts, the open
streams and the body memory charged are back to 0. Bounded: 200 examples of at most 12 steps
(about 15 s).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import orjson
import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, rule, run_state_machine_as_test

from tests.plugins.test_pd import pd_config
from tests.support.epp_app import RunningEpp, running_epp
from tests.support.extproc_client import ExtProcClient, headers_msg

T = TypeVar("T")
ADDRESSES = {"127.0.0.2": "decode", "127.0.0.3": "decode", "127.0.0.4": "prefill"}
KEYS = [f"{a}:8000" for a in ADDRESSES]


class LoopThread:
    """An asyncio loop in a thread: epp and the gRPC clients live there, Hypothesis drives them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoopThread, RunningEpp]]:
    """One epp for every example: P/D with a decider that always disaggregates (two charges per
    request), small limits so that examples reach them, stream metrics on."""
    path = Path(tmp_path_factory.mktemp("fuzz")) / "endpoints.yaml"
    entries = [
        {"address": a, "port": 8000, "name": a, "labels": {"llm-d.ai/role": r}} for a, r in ADDRESSES.items()
    ]
    path.write_text(yaml.safe_dump(entries))
    flags = (
        "--endpoints-file", str(path),
        "--config-text", pd_config(decider="always-disagg-pd-decider"),
        "--enable-grpc-stream-metrics",
        "--max-request-body-size", "16KiB",
        "--request-body-memory-budget", "160KiB",
        "--max-extproc-streams", "6",
        "--extproc-stream-idle-timeout", "2s",
        "--refresh-metrics-interval", "1s",
    )  # fmt: skip
    thread = LoopThread()
    context = running_epp(*flags)
    epp = thread.run(context.__aenter__())
    try:
        yield thread, epp
    finally:
        thread.run(context.__aexit__(None, None, None))
        thread.stop()


# --- the messages -----------------------------------------------------------------------------------

PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/embeddings", "/other", ""]


def nested(depth: int) -> bytes:
    return b'{"model":"m","prompt":' + b"[" * depth + b"1" + b"]" * depth + b"}"


valid_bodies = st.one_of(
    st.builds(
        lambda p: ("/v1/completions", orjson.dumps({"model": "m", "prompt": p})), st.text(max_size=300)
    ),
    st.builds(
        lambda c, stream: (
            "/v1/chat/completions",
            orjson.dumps({"model": "m", "messages": [{"role": "user", "content": c}], "stream": stream}),
        ),
        st.text(max_size=300),
        st.booleans(),
    ),
)
GARBAGE = [b"", b"{", b"[]", b"null", b'{"model": 7}', b'{"model":"m"}', b"\xff\xfe", b"x" * 20_000]
bodies = st.one_of(
    valid_bodies.map(lambda v: v[1]),
    st.builds(nested, st.sampled_from([10, 254, 255, 600, 1023, 1024, 3000])),
    st.sampled_from(GARBAGE),
    st.binary(max_size=300),
)


@st.composite
def request_headers_msgs(draw: st.DrawFn) -> pb.ProcessingRequest:
    headers = {":method": draw(st.sampled_from(["POST", "GET"])), ":path": draw(st.sampled_from(PATHS))}
    if draw(st.booleans()):
        headers["content-length"] = draw(st.sampled_from(["0", "10", "5000", "17000", "99999999", "-1", "x"]))
    if draw(st.booleans()):
        headers["x-prefiller-host-port"] = "10.6.6.6:80"
    if draw(st.booleans()):
        headers["x-request-id"] = draw(st.text(max_size=10))
    subset = draw(
        st.none() | st.lists(st.sampled_from([*KEYS, "10.9.9.9:1", "127.0.0.3", "junk"]), max_size=3)
    )
    return headers_msg(headers, end_of_stream=draw(st.booleans()), subset=subset)


@st.composite
def response_headers_msgs(draw: st.DrawFn) -> pb.ProcessingRequest:
    content_type = draw(st.sampled_from(["application/json", "text/event-stream", ""]))
    served = draw(st.none() | st.sampled_from([*KEYS, "10.9.9.9:1"]))
    headers = {":status": "200", "content-type": content_type}
    return headers_msg(headers, end_of_stream=draw(st.booleans()), response=True, served=served)


response_chunks = st.one_of(
    st.sampled_from(
        [
            b'data: {"choices":[{"text":"a"}]}\n\n',
            b'data: {"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n',
            b"data: [DONE]\n\n",
            b'{"usage": {"prompt_tokens": 4, "completion_tokens": 9}}',
        ]
    ),
    st.binary(max_size=200),
)

any_message = st.one_of(
    request_headers_msgs(),
    st.builds(
        lambda b, eos: pb.ProcessingRequest(request_body=pb.HttpBody(body=b, end_of_stream=eos)),
        bodies,
        st.booleans(),
    ),
    st.just(pb.ProcessingRequest(request_trailers=pb.HttpTrailers())),
    response_headers_msgs(),
    st.builds(
        lambda b, eos: pb.ProcessingRequest(response_body=pb.HttpBody(body=b, end_of_stream=eos)),
        response_chunks,
        st.booleans(),
    ),
    st.just(pb.ProcessingRequest(response_trailers=pb.HttpTrailers())),
    st.just(pb.ProcessingRequest()),
)


# --- the machine ------------------------------------------------------------------------------------


class Stream:
    def __init__(self, client: ExtProcClient) -> None:
        self.client = client
        self.cancelled = False


async def open_stream(epp: RunningEpp) -> Stream:
    return Stream(ExtProcClient(epp.stub))


async def send(stream: Stream, *msgs: pb.ProcessingRequest) -> None:
    stream.client.send(msgs)


async def cancel(stream: Stream) -> None:
    stream.client.cancel()
    stream.cancelled = True


async def finish(stream: Stream) -> list[int]:
    """Half-close the stream and read until the server ends it; the HTTP statuses it answered."""
    await stream.client.close()
    statuses: list[int] = []
    while True:
        try:
            reply = await asyncio.wait_for(stream.client._call.read(), 5.0)
        except grpc.aio.AioRpcError:
            return statuses  # ended with a gRPC status
        if reply is grpc.aio.EOF:
            return statuses
        if reply.HasField("immediate_response"):
            statuses.append(reply.immediate_response.status.code)


# The gauges that must be back to 0 once every stream has ended.
GAUGES = (
    "llm_d_epp_request_running",
    "llm_d_epp_extproc_streams_inflight",
    "llm_d_epp_extproc_streams_open",
    "llm_d_epp_request_body_memory_bytes",
)


def leftovers(epp: RunningEpp) -> dict[str, float]:
    """What should be 0 once every stream has ended, and is not."""
    out: dict[str, float] = dict.fromkeys(GAUGES, 0.0)
    for metric in epp.app.metrics.registry.collect():
        for s in metric.samples:
            if s.name in out:
                out[s.name] += s.value
    for ep in epp.app.datastore.endpoints():
        out[f"{ep.key} in flight"] = ep.inflight_requests
        out[f"{ep.key} tokens"] = ep.inflight_tokens
    return {k: v for k, v in out.items() if v}


class ExtProcSequences(RuleBasedStateMachine):
    streams = Bundle("streams")

    def __init__(self, thread: LoopThread, epp: RunningEpp) -> None:
        super().__init__()
        self.thread = thread
        self.epp = epp
        self.opened: list[Stream] = []

    @rule(target=streams)
    def open(self) -> Stream:
        stream = self.thread.run(open_stream(self.epp))
        self.opened.append(stream)
        return stream

    @rule(
        stream=streams,
        body=valid_bodies,
        chunk=st.integers(1, 5000),
        declared=st.booleans(),
        spoofed=st.booleans(),
        ending=st.sampled_from(["end_of_stream", "trailers", "none"]),
    )
    def request(
        self, stream: Stream, body: tuple[str, bytes], chunk: int, declared: bool, spoofed: bool, ending: str
    ) -> None:
        """A well-formed request (as Envoy sends one), perhaps unfinished."""
        path, raw = body
        headers = {":method": "POST", ":path": path}
        if declared:
            headers["content-length"] = str(len(raw))
        if spoofed:
            headers["x-prefiller-host-port"] = "10.6.6.6:80"
        msgs = [headers_msg(headers)]
        parts = [raw[i : i + chunk] for i in range(0, len(raw), chunk)] or [b""]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1 and ending == "end_of_stream"
            msgs.append(pb.ProcessingRequest(request_body=pb.HttpBody(body=part, end_of_stream=last)))
        if ending == "trailers":
            msgs.append(pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))
        self.thread.run(send(stream, *msgs))

    @rule(
        stream=streams,
        headers=response_headers_msgs(),
        chunks=st.lists(response_chunks, max_size=4),
        ending=st.sampled_from(["end_of_stream", "trailers", "none"]),
    )
    def respond(
        self, stream: Stream, headers: pb.ProcessingRequest, chunks: list[bytes], ending: str
    ) -> None:
        """A response (as Envoy passes one on), perhaps unfinished."""
        msgs = [headers]
        for i, part in enumerate(chunks):
            last = i == len(chunks) - 1 and ending == "end_of_stream"
            msgs.append(pb.ProcessingRequest(response_body=pb.HttpBody(body=part, end_of_stream=last)))
        if ending == "trailers":
            msgs.append(pb.ProcessingRequest(response_trailers=pb.HttpTrailers()))
        self.thread.run(send(stream, *msgs))

    @rule(stream=streams, msg=any_message)
    def send(self, stream: Stream, msg: pb.ProcessingRequest) -> None:
        self.thread.run(send(stream, msg))

    @rule(stream=streams, msgs=st.lists(any_message, min_size=2, max_size=4))
    def send_several(self, stream: Stream, msgs: list[pb.ProcessingRequest]) -> None:
        self.thread.run(send(stream, *msgs))

    @rule(stream=streams)
    def cancel(self, stream: Stream) -> None:
        self.thread.run(cancel(stream))

    def teardown(self) -> None:
        for stream in self.opened:
            if not stream.cancelled:
                statuses = self.thread.run(finish(stream), timeout=15)
                assert 500 not in statuses, statuses
        deadline = time.monotonic() + 5
        while leftovers(self.epp):
            assert time.monotonic() < deadline, f"state left after every stream ended: {leftovers(self.epp)}"
            time.sleep(0.01)


def test_any_sequence_of_ext_proc_messages_ends_and_leaves_nothing_behind(
    fuzzed: tuple[LoopThread, RunningEpp],
) -> None:
    thread, epp = fuzzed

    class AgainstThisEpp(ExtProcSequences):
        def __init__(self) -> None:
            super().__init__(thread, epp)

    run_state_machine_as_test(
        AgainstThisEpp,
        settings=settings(
            max_examples=200,
            stateful_step_count=12,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
    errors = [
        s
        for m in epp.app.metrics.registry.collect()
        for s in m.samples
        if s.name == "llm_d_epp_request_error_total" and s.value
    ]
    assert errors, "the fuzzer never reached an error"
    assert not [s for s in errors if s.labels["error_code"] == "Internal"], errors
