"""Builders for the ext_proc replies epp sends, shaped exactly as the Go EPP's."""

from __future__ import annotations

from collections.abc import Mapping

from envoy.config.core.v3 import base_pb2 as core_pb
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from epp.errors import DROPPED_REASON_HEADER, EppError

DESTINATION_HEADER = "x-gateway-destination-endpoint"
DESTINATION_SERVED_KEY = "x-gateway-destination-endpoint-served"
DESTINATION_SCORES_KEY = "x-gateway-destination-endpoint-scores"  # with --emit-endpoint-scores
LB_METADATA_NAMESPACE = "envoy.lb"
SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_HINT_KEY = "x-gateway-destination-endpoint-subset"
REQUEST_ID_HEADER = "x-request-id"
# Envoy's gRPC messages stay well under its 64 KiB default per-message buffer when bodies are cut here.
MAX_BODY_CHUNK = 62_000


def _header(key: str, value: str) -> core_pb.HeaderValueOption:
    return core_pb.HeaderValueOption(header=core_pb.HeaderValue(key=key, raw_value=value.encode()))


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
    headers = [_header(DESTINATION_HEADER, destination)]
    if content_length is not None:
        headers.append(_header("content-length", str(content_length)))
    removed: list[str] = []
    if extra_headers:
        for key, value in extra_headers.items():
            if value is None:
                removed.append(key)
            else:
                headers.append(_header(key, value))
    metadata = struct_pb2.Struct()
    lb: dict[str, object] = {DESTINATION_HEADER: destination}
    if scores is not None:
        lb[DESTINATION_SCORES_KEY] = dict(scores)
    metadata.update({LB_METADATA_NAMESPACE: lb})
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(
                clear_route_cache=True,
                header_mutation=pb.HeaderMutation(set_headers=headers, remove_headers=removed),
            )
        ),
        dynamic_metadata=metadata,
    )


def body_replies(body: bytes, *, request: bool, end_of_stream: bool = True) -> list[pb.ProcessingResponse]:
    """The body as streamed_response chunks of at most MAX_BODY_CHUNK bytes; the last carries EoS."""
    field = "request_body" if request else "response_body"
    if len(body) <= MAX_BODY_CHUNK:
        chunks = [body]  # the usual case (every SSE chunk): no copy
    else:
        view = memoryview(body)
        chunks = [bytes(view[i : i + MAX_BODY_CHUNK]) for i in range(0, len(body), MAX_BODY_CHUNK)]
    last = len(chunks) - 1
    return [
        pb.ProcessingResponse(
            **{
                field: pb.BodyResponse(
                    response=pb.CommonResponse(
                        body_mutation=pb.BodyMutation(
                            streamed_response=pb.StreamedBodyResponse(
                                body=chunk, end_of_stream=end_of_stream and i == last
                            )
                        )
                    )
                )
            }
        )
        for i, chunk in enumerate(chunks)
    ]


def response_headers_reply(headers: Mapping[str, str] | None = None) -> pb.ProcessingResponse:
    """Let the response through, adding `headers` (e.g. a session token) for the client."""
    if not headers:
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=pb.CommonResponse()))
    mutation = pb.HeaderMutation(set_headers=[_header(k, v) for k, v in headers.items()])
    return pb.ProcessingResponse(
        response_headers=pb.HeadersResponse(response=pb.CommonResponse(header_mutation=mutation))
    )


def trailers_reply(*, request: bool) -> pb.ProcessingResponse:
    if request:
        return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
    return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


def immediate_reply(error: EppError) -> pb.ProcessingResponse:
    """End the request at Envoy with an HTTP status and a readable body (and, for a request dropped
    before dispatch, `x-llm-d-request-dropped-reason`)."""
    headers = [_header("content-type", "text/plain; charset=utf-8")]
    if error.dropped_reason:
        headers.append(_header(DROPPED_REASON_HEADER, error.dropped_reason))
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=error.code.http_status),
            headers=pb.HeaderMutation(set_headers=headers),
            body=error.body,
            details=error.code.label,
        )
    )
