"""The ext_proc wire contract, driven by a real gRPC client sending Envoy-shaped sequences."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.epp_app import RunningEpp, running_epp, wait_until
from tests.support.extproc_client import ExtProcClient, body_msgs, headers_msg, one_request, request_headers
from tests.support.fake_vllm import FakeVllm

DEST = "x-gateway-destination-endpoint"
# The labels of a request's metrics (llm_d_epp_request_*) for model "m" without a fairness header.
REQUEST_LABELS = {"model_name": "m", "target_model_name": "m", "fairness_id": "default-flow", "priority": "0"}


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeVllm]]:
    servers = [await FakeVllm(f"s{i}").start() for i in range(3)]
    yield servers
    for s in servers:
        await s.stop()


@pytest.fixture
async def epp(fakes: list[FakeVllm]) -> AsyncIterator[RunningEpp]:
    async with running_epp("--endpoints", ",".join(f.address for f in fakes)) as running:
        yield running


def set_headers(reply: pb.ProcessingResponse) -> dict[str, str]:
    mutation = reply.request_headers.response.header_mutation
    return {h.header.key: (h.header.raw_value.decode() or h.header.value) for h in mutation.set_headers}


def completion(prompt: str = "hello world", **extra: object) -> bytes:
    return orjson.dumps({"model": "m", "prompt": prompt, **extra})


async def test_routes_with_header_metadata_and_body_back(epp: RunningEpp, fakes: list[FakeVllm]) -> None:
    body = completion("tell me a story " * 10)
    replies = await one_request(epp.stub, request_headers(), body, chunk=7)
    assert [r.WhichOneof("response") for r in replies] == ["request_headers", "request_body"]
    headers = set_headers(replies[0])
    assert headers[DEST] in {f.address for f in fakes}
    assert headers["content-length"] == str(len(body))
    assert replies[0].request_headers.response.clear_route_cache is True
    lb = replies[0].dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert lb[DEST].string_value == headers[DEST]
    streamed = replies[1].request_body.response.body_mutation.streamed_response
    assert streamed.body == body and streamed.end_of_stream


async def test_large_body_is_chunked_at_62000_bytes(epp: RunningEpp) -> None:
    body = completion("x" * 200_000)
    replies = await one_request(epp.stub, request_headers(), body, chunk=30_000)
    chunks = [r.request_body.response.body_mutation.streamed_response for r in replies[1:]]
    assert [len(c.body) for c in chunks[:-1]] == [62_000] * (len(chunks) - 1)
    assert 0 < len(chunks[-1].body) <= 62_000
    assert b"".join(c.body for c in chunks) == body
    assert [c.end_of_stream for c in chunks] == [False] * (len(chunks) - 1) + [True]


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        ("/v1/completions", b"{not json", "not valid JSON"),
        ("/v1/completions", b'{"prompt": "hi"}', "'model'"),
        ("/v1/completions", b'{"model": "m"}', "'prompt'"),
        ("/v1/chat/completions", b'{"model": "m", "messages": []}', "'messages'"),
        ("/v1/embeddings", b'{"model": "m"}', "'input'"),
        ("/v1/responses", b'{"model": "m", "input": ""}', "'input'"),
        ("/v1/completions", b"[1, 2]", "JSON object"),
    ],
)
async def test_bad_requests_get_400_with_reason(epp: RunningEpp, path: str, body: bytes, reason: str) -> None:
    replies = await one_request(epp.stub, request_headers(path), body)
    assert len(replies) == 1
    immediate = replies[0].immediate_response
    assert immediate.status.code == 400
    assert immediate.body.startswith(b"inference error: BadRequest - ")
    assert reason.encode() in immediate.body


async def test_all_apis_are_routed(epp: RunningEpp) -> None:
    cases = {
        "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        "/v1/embeddings": {"model": "m", "input": ["a", "b"]},
        "/v1/responses": {"model": "m", "input": "hello"},
        "/openai/v1/completions?x=1": {"model": "m", "prompt": ["a", "b"]},
    }
    for path, body in cases.items():
        replies = await one_request(epp.stub, request_headers(path), orjson.dumps(body))
        assert replies[0].HasField("request_headers"), path


MULTI_PORT = "127.0.0.2:8000,127.0.0.3:8000,127.0.0.3:8001"  # the pod at .3 serves on two ports


async def test_subset_hint_is_matched_on_the_ip_like_go() -> None:
    """Every port of a pod the hint names is a candidate (the hint's port is not compared)."""
    async with running_epp("--endpoints", MULTI_PORT) as epp:
        seen = set()
        for _ in range(24):
            replies = await one_request(epp.stub, request_headers(), completion(), subset=["127.0.0.3:9999"])
            seen.add(set_headers(replies[0])[DEST])
        assert seen == {"127.0.0.3:8000", "127.0.0.3:8001"}


async def test_a_malformed_subset_hint_is_ignored_and_the_filter_can_be_disabled() -> None:
    async with running_epp("--endpoints", MULTI_PORT) as epp:
        client = ExtProcClient(epp.stub)
        msg = headers_msg(request_headers())
        hint = struct_pb2.Struct()
        hint.update({"x-gateway-destination-endpoint-subset": "127.0.0.2:8000"})  # a string, not a list
        msg.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
        client.send([msg, *body_msgs(completion(), 100)])
        (reply, _) = await client.read(2)
        assert set_headers(reply)[DEST] in MULTI_PORT.split(",")
        await client.close()
    async with running_epp("--endpoints", MULTI_PORT, "--disable-endpoint-subset-filter") as epp:
        replies = await one_request(epp.stub, request_headers(), completion(), subset=[])
        assert set_headers(replies[0])[DEST] in MULTI_PORT.split(",")


async def test_empty_subset_hint_is_503_with_the_dropped_reason(epp: RunningEpp) -> None:
    replies = await one_request(epp.stub, request_headers(), completion(), subset=[])
    response = replies[0].immediate_response
    assert response.status.code == 503
    assert b"ServiceUnavailable" in response.body
    headers = {h.header.key: h.header.raw_value.decode() for h in response.headers.set_headers}
    assert headers["x-llm-d-request-dropped-reason"] == "rejected-no-endpoints"


async def test_emit_endpoint_scores_puts_every_candidates_score_in_the_lb_metadata() -> None:
    async with running_epp("--endpoints", MULTI_PORT, "--emit-endpoint-scores") as epp:
        replies = await one_request(epp.stub, request_headers(), completion())
        lb = replies[0].dynamic_metadata.fields["envoy.lb"].struct_value.fields
        scores = {
            k: v.number_value
            for k, v in lb["x-gateway-destination-endpoint-scores"].struct_value.fields.items()
        }
        assert set(scores) == set(MULTI_PORT.split(","))
        assert lb[DEST].string_value in scores
        assert scores[lb[DEST].string_value] == max(scores.values())
    async with running_epp("--endpoints", MULTI_PORT) as epp:  # off by default
        replies = await one_request(epp.stub, request_headers(), completion())
        assert (
            "x-gateway-destination-endpoint-scores"
            not in replies[0].dynamic_metadata.fields["envoy.lb"].struct_value.fields
        )


async def test_no_endpoints_is_503(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "endpoints.yaml"
    path.write_text("[]\n")
    async with running_epp("--endpoints-file", str(path)) as epp:
        replies = await one_request(epp.stub, request_headers(), completion())
        assert replies[0].immediate_response.status.code == 503


async def test_headers_only_request_is_answered_at_once(epp: RunningEpp, fakes: list[FakeVllm]) -> None:
    client = ExtProcClient(epp.stub)
    client.send([headers_msg({":method": "GET", ":path": "/v1/models"}, end_of_stream=True)])
    (reply,) = await client.read(1)
    assert set_headers(reply)[DEST] in {f.address for f in fakes}
    assert "content-length" not in set_headers(reply)
    await client.close()


async def test_full_exchange_with_sse_response(epp: RunningEpp) -> None:
    client = ExtProcClient(epp.stub)
    body = completion("stream please", stream=True)
    client.send([headers_msg(request_headers()), *body_msgs(body, 10)])
    first = await client.read(1 + 1)
    endpoint = epp.app.datastore.get(set_headers(first[0])[DEST])
    assert endpoint is not None and endpoint.inflight_requests == 1

    client.send([headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True)])
    (resp_headers,) = await client.read(1)
    assert resp_headers.HasField("response_headers")

    usage = b'data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":5}}\n\n'
    sse = (
        b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[{"text":"b"}]}\n\n'
        + usage
        + b"data: [DONE]\n\n"
    )
    pieces = [sse[i : i + 13] for i in range(0, len(sse), 13)]
    client.send(
        [pb.ProcessingRequest(response_body=pb.HttpBody(body=p, end_of_stream=False)) for p in pieces]
    )
    echoed = await client.read(len(pieces))
    assert b"".join(r.response_body.response.body_mutation.streamed_response.body for r in echoed) == sse
    assert endpoint.inflight_requests == 1  # still streaming

    client.send([pb.ProcessingRequest(response_trailers=pb.HttpTrailers())])
    (trailers,) = await client.read(1)
    assert trailers.HasField("response_trailers")
    assert endpoint.inflight_requests == 0
    metrics = epp.app.metrics.registry
    assert metrics.get_sample_value("llm_d_epp_request_output_tokens_sum", REQUEST_LABELS) == 5
    assert metrics.get_sample_value("llm_d_epp_request_input_tokens_sum", REQUEST_LABELS) == 11
    await client.close()


async def test_json_response_usage_and_end_of_stream_release(epp: RunningEpp) -> None:
    client = ExtProcClient(epp.stub)
    client.send([headers_msg(request_headers()), *body_msgs(completion(), 1000)])
    first = await client.read(2)
    endpoint = epp.app.datastore.get(set_headers(first[0])[DEST])
    assert endpoint is not None
    client.send([headers_msg({":status": "200", "content-type": "application/json"}, response=True)])
    await client.read(1)
    payload = orjson.dumps(
        {"choices": [{"text": "abc"}], "usage": {"prompt_tokens": 4, "completion_tokens": 9}}
    )
    client.send(body_msgs(payload, 20, response=True))
    replies = await client.read(len(body_msgs(payload, 20)))
    assert replies[-1].response_body.response.body_mutation.streamed_response.end_of_stream
    assert endpoint.inflight_requests == 0
    assert (
        epp.app.metrics.registry.get_sample_value("llm_d_epp_request_output_tokens_sum", REQUEST_LABELS) == 9
    )
    await client.close()


async def test_abandoned_stream_frees_its_request(epp: RunningEpp) -> None:
    client = ExtProcClient(epp.stub)
    client.send([headers_msg(request_headers()), *body_msgs(completion(), 1000)])
    first = await client.read(2)
    endpoint = epp.app.datastore.get(set_headers(first[0])[DEST])
    assert endpoint is not None and endpoint.inflight_requests == 1
    client.cancel()  # the client (Envoy) goes away mid-request
    await wait_until(lambda: endpoint.inflight_requests == 0, what="in-flight count released")
    assert epp.app.metrics.registry.get_sample_value("llm_d_epp_request_running", REQUEST_LABELS) == 0


async def test_body_ended_by_trailers(epp: RunningEpp) -> None:
    client = ExtProcClient(epp.stub)
    body = completion()
    client.send([headers_msg(request_headers()), *body_msgs(body, 1000, end=False)])
    client.send([pb.ProcessingRequest(request_trailers=pb.HttpTrailers())])
    replies = await client.read(3)
    assert [r.WhichOneof("response") for r in replies] == [
        "request_headers",
        "request_body",
        "request_trailers",
    ]
    assert replies[1].request_body.response.body_mutation.streamed_response.body == body
    await client.close()


async def test_health_reports_serving_for_every_service_name(epp: RunningEpp) -> None:
    assert epp.app.ports is not None
    for port in (epp.app.ports.health, epp.app.ports.grpc):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_request_id_is_generated_when_absent(epp: RunningEpp) -> None:
    generated = []
    for _ in range(2):
        replies = await one_request(epp.stub, request_headers(), completion())
        generated.append(set_headers(replies[0]).get("x-request-id", ""))
    # A random UUID (version 4, RFC 4122 variant) as 32 hex digits, as uuid4().hex writes it.
    assert all(len(value) == 32 and uuid.UUID(hex=value).hex == value for value in generated)
    assert all(uuid.UUID(hex=value).version == 4 for value in generated)
    assert all(uuid.UUID(hex=value).variant == uuid.RFC_4122 for value in generated)
    assert generated[0] != generated[1]
    replies = await one_request(epp.stub, request_headers(**{"x-request-id": "abc"}), completion())
    assert "x-request-id" not in set_headers(replies[0])


def error_count(epp: RunningEpp, code: str, model: str = "") -> float:
    labels = {**REQUEST_LABELS, "model_name": model, "target_model_name": model, "error_code": code}
    return epp.app.metrics.registry.get_sample_value("llm_d_epp_request_error_total", labels) or 0.0


async def test_every_error_is_counted_once_with_its_code(epp: RunningEpp) -> None:
    await one_request(epp.stub, request_headers(), b"{not json")
    await one_request(epp.stub, request_headers(), completion(), subset=[])
    assert error_count(epp, "BadRequest") == 1
    assert error_count(epp, "ServiceUnavailable", model="m") == 1
    # A plugin that raises is a 500 for the client and counted too, under the request's model.
    profile = next(iter(epp.app.config.scheduler.profiles.values()))
    scorer = profile.scorers[0].scorer

    def broken(*args: object) -> list[float]:
        raise RuntimeError("scorer bug")

    original = scorer.score
    scorer.score = broken  # type: ignore[method-assign]
    try:
        replies = await one_request(epp.stub, request_headers(), completion())
    finally:
        scorer.score = original  # type: ignore[method-assign]
    assert replies[0].immediate_response.status.code == 500
    assert error_count(epp, "Internal", model="m") == 1


def served_counter(epp: RunningEpp) -> float:
    value = epp.app.metrics.registry.get_sample_value("epp_fallback_endpoint_served_total")
    return value or 0.0


async def test_fallback_served_moves_the_charge_and_the_prefix_entry(
    epp: RunningEpp, fakes: list[FakeVllm]
) -> None:
    """Envoy reports (envoy.lb / x-gateway-destination-endpoint-served) that a fallback served:
    the in-flight charge moves to it, and so does what the prefix index learned from the prompt,
    so the next request with that prefix goes where the KV cache really is."""
    await wait_until(
        lambda: all(ep.metrics.updated_at for ep in epp.app.datastore.endpoints()), what="scrape"
    )
    prompt = "a long shared system prompt that fills several prefix blocks. " * 40
    client = ExtProcClient(epp.stub)
    client.send([headers_msg(request_headers()), *body_msgs(completion(prompt), 4096)])
    first = await client.read(2)
    primary = epp.app.datastore.get(set_headers(first[0])[DEST])
    assert primary is not None
    fallback = next(ep for ep in epp.app.datastore.endpoints() if ep is not primary)
    await wait_until(lambda: primary.inflight_requests == 1, what="charge on the primary")

    client.send([headers_msg({":status": "200"}, response=True, served=fallback.key)])
    await client.read(1)
    assert (primary.inflight_requests, fallback.inflight_requests) == (0, 1)
    assert served_counter(epp) == 1.0

    client.send(body_msgs(b'{"usage": {"prompt_tokens": 3}}', 100, response=True))
    await client.read(1)
    await client.close()
    assert (primary.inflight_requests, fallback.inflight_requests) == (0, 0)

    # The same prompt again: the prefix index now says the fallback holds it.
    replies = await one_request(epp.stub, request_headers(), completion(prompt), chunk=4096)
    assert set_headers(replies[0])[DEST] == fallback.key


async def test_served_by_the_primary_changes_nothing(epp: RunningEpp) -> None:
    client = ExtProcClient(epp.stub)
    client.send([headers_msg(request_headers()), *body_msgs(completion("hi there"), 100)])
    first = await client.read(2)
    primary = epp.app.datastore.get(set_headers(first[0])[DEST])
    assert primary is not None
    client.send([headers_msg({":status": "200"}, response=True, served=primary.key)])
    await client.read(1)
    assert primary.inflight_requests == 1 and served_counter(epp) == 0.0
    client.send([headers_msg({":status": "200"}, response=True, served="10.9.9.9:1")])  # unknown: ignored
    await client.close()
    await wait_until(lambda: primary.inflight_requests == 0, what="release")
