"""Builders for the ext_proc replies epp sends, shaped exactly as the Go EPP's."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from envoy.config.core.v3 import base_pb2 as core_pb
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

from epp.errors import DROPPED_REASON_HEADER, EppError

DESTINATION_HEADER = "x-gateway-destination-endpoint"
DESTINATION_SERVED_KEY = "x-gateway-destination-endpoint-served"
DESTINATION_SCORES_KEY = "x-gateway-destination-endpoint-scores"  # with --emit-endpoint-scores
LB_METADATA_NAMESPACE = "envoy.lb"
SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_HINT_KEY = "x-gateway-destination-endpoint-subset"
REQUEST_ID_HEADER = "x-request-id"
# Request headers only epp may set: a client's value never reaches the model server (epp removes
# it unless it sets it itself). P/D's sidecar trusts x-prefiller-host-port to name the prefill pod.
EPP_OWNED_REQUEST_HEADERS = ("x-prefiller-host-port",)
# Envoy's gRPC messages stay well under its 64 KiB default per-message buffer when bodies are cut here.
MAX_BODY_CHUNK = 62_000


def _header(key: str, value: str) -> core_pb.HeaderValueOption:
    return core_pb.HeaderValueOption(header=core_pb.HeaderValue(key=key, raw_value=value.encode()))


def _set_header(mutation: pb.HeaderMutation, key: str, value: str) -> None:
    header = mutation.set_headers.add().header
    header.key = key
    header.raw_value = value.encode()


# The replies are built in place, field by field: handing a sub-message to a constructor copies
# it (and the body bytes with it) once per level; measured 4-5x faster for a body reply and a
# routing reply (8.2 -> 1.6 us and 14.7 -> 3.8 us).


def request_headers_reply(
    destination: str,
    content_length: int | None,
    extra_headers: Mapping[str, str | None] | None = None,
    scores: Mapping[str, float] | None = None,
) -> pb.ProcessingResponse:
    """Route the request: destination header + envoy.lb metadata, and clear the route cache so
    Envoy re-evaluates the route with the new header. `extra_headers` are set on the upstream
    request, or removed from it when the value is None (e.g. P/D's x-prefiller-host-port).
    `scores` (endpoint key -> score) go in the envoy.lb metadata too, as the Go EPP's
    --emit-endpoint-scores does."""
    reply = pb.ProcessingResponse()
    common = reply.request_headers.response
    common.clear_route_cache = True
    mutation = common.header_mutation
    _set_header(mutation, DESTINATION_HEADER, destination)
    if content_length is not None:
        _set_header(mutation, "content-length", str(content_length))
    if extra_headers:
        for key, value in extra_headers.items():
            if value is None:
                mutation.remove_headers.append(key)
            else:
                _set_header(mutation, key, value)
    lb = reply.dynamic_metadata.fields[LB_METADATA_NAMESPACE].struct_value
    lb.fields[DESTINATION_HEADER].string_value = destination
    if scores is not None:
        emitted = lb.fields[DESTINATION_SCORES_KEY].struct_value
        emitted.SetInParent()  # present even when empty
        emitted.update(scores)
    return reply


def body_reply(chunk: bytes, *, request: bool, end_of_stream: bool) -> pb.ProcessingResponse:
    """One streamed_response body chunk (at most MAX_BODY_CHUNK bytes)."""
    reply = pb.ProcessingResponse()
    body = reply.request_body if request else reply.response_body
    streamed = body.response.body_mutation.streamed_response
    streamed.body = chunk
    streamed.end_of_stream = end_of_stream
    return reply


def iter_body_replies(
    body: bytes, *, request: bool, end_of_stream: bool = True
) -> Iterator[pb.ProcessingResponse]:
    """The body as streamed_response chunks of at most MAX_BODY_CHUNK bytes; the last carries EoS.
    Made one at a time as they are consumed, so a large body is never copied whole."""
    size = len(body)
    if size <= MAX_BODY_CHUNK:
        yield body_reply(body, request=request, end_of_stream=end_of_stream)  # no copy
        return
    for start in range(0, size, MAX_BODY_CHUNK):
        end = start + MAX_BODY_CHUNK
        yield body_reply(body[start:end], request=request, end_of_stream=end_of_stream and end >= size)


def body_replies(body: bytes, *, request: bool, end_of_stream: bool = True) -> list[pb.ProcessingResponse]:
    """The body as streamed_response chunks of at most MAX_BODY_CHUNK bytes; the last carries EoS."""
    return list(iter_body_replies(body, request=request, end_of_stream=end_of_stream))


def response_headers_reply(headers: Mapping[str, str] | None = None) -> pb.ProcessingResponse:
    """Let the response through, adding `headers` (e.g. a session token) for the client."""
    reply = pb.ProcessingResponse()
    common = reply.response_headers.response
    common.SetInParent()  # an empty CommonResponse, present
    if headers:
        for key, value in headers.items():
            _set_header(common.header_mutation, key, value)
    return reply


def trailers_reply(*, request: bool) -> pb.ProcessingResponse:
    if request:
        return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
    return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


def immediate_reply(error: EppError, http_status: int | None = None) -> pb.ProcessingResponse:
    """End the request at Envoy with an HTTP status (the error code's, or `http_status` where no
    code maps to it, e.g. 413) and a readable body (and, for a request dropped before dispatch,
    `x-llm-d-request-dropped-reason`)."""
    headers = [_header("content-type", "text/plain; charset=utf-8")]
    if error.dropped_reason:
        headers.append(_header(DROPPED_REASON_HEADER, error.dropped_reason))
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=http_status or error.code.http_status),
            headers=pb.HeaderMutation(set_headers=headers),
            body=error.body,
            details=error.code.label,
        )
    )
