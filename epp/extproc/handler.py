"""The ext_proc stream: Envoy's messages for one HTTP request in, epp's replies out.

FULL_DUPLEX_STREAMED protocol, as the Go EPP speaks it:
  request headers   -> nothing yet (unless end_of_stream: no body, route at once)
  request body      -> buffered until end_of_stream; then parse, schedule, and reply with
                       a headers response (destination) followed by the body in chunks
  response headers  -> headers response
  response body     -> each chunk echoed at once; usage read on the way
  trailers          -> trailers response
The stream owns only protocol state; what a request means is the director's business. It times
the request and response phases for epp's metrics, holds the request's trace span
(`gateway.request`), and, with --enable-grpc-stream-metrics, counts the stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.errors import EppError, ErrorCode
from epp.extproc import messages
from epp.framework import Api, InferenceRequest
from epp.observability import DEFAULT_FAIRNESS_ID, DEFAULT_PRIORITY, fairness_id
from epp.requestcontrol.director import Decision, Director
from epp.requestcontrol.parsing import api_for_path, parse_request
from epp.requestcontrol.usage import UsageReader

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger(__name__)

# A request body larger than this is refused (413-like 400) rather than buffered without bound.
MAX_REQUEST_BODY = 64 * 1024 * 1024


def _headers_dict(headers: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in headers.headers:
        # Envoy sends raw_value (bytes) in current versions, value in older ones.
        out[h.key.lower()] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def _subset_hint(msg: pb.ProcessingRequest) -> list[str] | None:
    """Envoy's endpoint subset hint (a list of "ip:port"), or None when there is none. A hint that
    is not a list is ignored, as the Go EPP ignores it."""
    if not msg.HasField("metadata_context"):
        return None
    namespaces = msg.metadata_context.filter_metadata
    if messages.SUBSET_HINT_NAMESPACE not in namespaces:
        return None
    fields = namespaces[messages.SUBSET_HINT_NAMESPACE].fields
    if messages.SUBSET_HINT_KEY not in fields:
        return None
    value = fields[messages.SUBSET_HINT_KEY]
    if value.WhichOneof("kind") != "list_value":
        log.debug("ignoring a subset hint that is not a list: %s", value.WhichOneof("kind"))
        return None
    return [v.string_value for v in value.list_value.values if v.WhichOneof("kind") == "string_value"]


def _served_endpoint(msg: pb.ProcessingRequest) -> str | None:
    """The endpoint Envoy reports it sent the request to (`envoy.lb` /
    `x-gateway-destination-endpoint-served`), on the response headers; None when not reported."""
    if not msg.HasField("metadata_context"):
        return None
    namespaces = msg.metadata_context.filter_metadata
    if messages.LB_METADATA_NAMESPACE not in namespaces:
        return None
    fields = namespaces[messages.LB_METADATA_NAMESPACE].fields
    if messages.DESTINATION_SERVED_KEY not in fields:
        return None
    value = fields[messages.DESTINATION_SERVED_KEY].string_value
    return value or None


class RequestStream:
    """Protocol state of one ext_proc stream."""

    __slots__ = (
        "_body",
        "_body_size",
        "_director",
        "_generated_request_id",
        "_received",
        "_request",
        "_request_timed",
        "_response_time",
        "_span",
        "_usage",
        "decision",
        "done",
        "headers",
        "request_id",
        "subset",
    )

    def __init__(self, director: Director) -> None:
        self._director = director
        self._received = 0.0  # perf_counter() at the request headers
        self._request_timed = False  # request processing time observed (once per request)
        self._response_time = 0.0  # time spent handling the response's messages
        self._span: Span | None = None  # the stream's trace span (gateway.request)
        self.headers: dict[str, str] = {}
        self.request_id = ""
        self._generated_request_id = False
        self.subset: list[str] | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._request: InferenceRequest | None = None  # once parsed: labels its error metrics
        self.decision: Decision | None = None
        self._usage: UsageReader | None = None
        self.done = False  # an immediate response was sent: Envoy ends the request

    def handle(self, msg: pb.ProcessingRequest) -> Sequence[pb.ProcessingResponse]:
        kind = msg.WhichOneof("request")
        try:
            if kind == "request_headers":
                return self._on_request_headers(msg)
            if kind == "request_body":
                return self._on_request_body(msg.request_body.body, msg.request_body.end_of_stream)
            if kind == "request_trailers":
                return self._on_request_trailers()
            if kind == "response_headers":
                return self._on_response_headers(msg.response_headers, _served_endpoint(msg))
            if kind == "response_body":
                return self._on_response_body(msg.response_body.body, msg.response_body.end_of_stream)
            if kind == "response_trailers":
                self._finish(completed=True)
                return [messages.trailers_reply(request=False)]
            return []
        except EppError as exc:
            return self._fail(exc)
        except Exception as exc:  # a bug must give the client a 500, never a hung request
            log.exception("request %s: internal error", self.request_id)
            return self._fail(EppError(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}"))

    def _fail(self, exc: EppError) -> list[pb.ProcessingResponse]:
        """Every error ends here, so each is counted once, whichever layer raised it."""
        self.done = True
        request = self._request
        if request is not None:
            model, target, fairness = request.model, request.target_model, fairness_id(request.headers)
        else:
            model, target, fairness = "", "", DEFAULT_FAIRNESS_ID
        director = self._director
        director.metrics.count_error(model, target, exc.code.label, fairness, DEFAULT_PRIORITY)
        self._request_processed()
        if self._span is not None and director.tracer is not None:
            director.tracer.fail(self._span, exc, exc.message)
        log.debug("request %s rejected: %s", self.request_id, exc.message)
        return [messages.immediate_reply(exc)]

    def _request_processed(self) -> None:
        """The request phase is over (routed, or failed): its processing time, once."""
        if not self._request_timed and self._received:
            self._request_timed = True
            self._director.metrics.request_processing.observe(time.perf_counter() - self._received)

    def _on_request_headers(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        self._received = time.perf_counter()
        self.headers = _headers_dict(msg.request_headers.headers)
        self.subset = _subset_hint(msg)
        self.request_id = self.headers.get(messages.REQUEST_ID_HEADER, "")
        if not self.request_id:
            self.request_id = uuid.uuid4().hex
            self._generated_request_id = True
        tracer = self._director.tracer
        if tracer is not None and self._span is None:
            self._span = tracer.start_request(self.headers, self.request_id)
        if not msg.request_headers.end_of_stream:
            return []  # wait for the body
        # No body: nothing to schedule on, route on load alone.
        request = self._request = InferenceRequest(
            request_id=self.request_id,
            model="",
            api=api_for_path(self.headers.get(":path", "")),
            prompt_text="",
            headers=self.headers,
            body={},
        )
        self.decision = self._director.pick_any(request, self.subset, received=self._received)
        self._request_processed()
        return [messages.request_headers_reply(self.decision.destination, None, self._extra_headers())]

    def _extra_headers(self) -> dict[str, str] | None:
        return {messages.REQUEST_ID_HEADER: self.request_id} if self._generated_request_id else None

    def _on_request_body(self, chunk: bytes, end_of_stream: bool) -> list[pb.ProcessingResponse]:
        if self.decision is not None:
            return []  # body after routing (headers-only request): nothing to do
        self._body_size += len(chunk)
        if self._body_size > MAX_REQUEST_BODY:
            raise EppError(ErrorCode.BAD_REQUEST, f"request body exceeds {MAX_REQUEST_BODY} bytes")
        if chunk:
            self._body.append(chunk)
        if not end_of_stream:
            return []
        return self._route_buffered_body(body_end_of_stream=True)

    def _on_request_trailers(self) -> list[pb.ProcessingResponse]:
        if self.decision is not None:
            return [messages.trailers_reply(request=True)]
        # The body ended with trailers instead of an end_of_stream body chunk.
        replies = self._route_buffered_body(body_end_of_stream=False)
        replies.append(messages.trailers_reply(request=True))
        return replies

    def _route_buffered_body(self, body_end_of_stream: bool) -> list[pb.ProcessingResponse]:
        raw = b"".join(self._body)
        self._body = []
        request = self._request = parse_request(
            self.request_id, self.headers.get(":path", ""), self.headers, raw
        )
        self.decision = self._director.schedule(
            request, self.subset, received=self._received, request_size=len(raw), span=self._span
        )
        self._usage = UsageReader(streaming=request.streaming or request.api is Api.OTHER)
        extra: Mapping[str, str | None] | None = self._extra_headers()
        routing = self.decision.result.headers if self.decision.result is not None else None
        if routing:  # P/D: x-prefiller-host-port for the decode pod's sidecar
            extra = {**routing, **extra} if extra else routing
        scores = (
            self.decision.result.primary.scores
            if self._director.emit_scores and self.decision.result
            else None
        )
        replies = [messages.request_headers_reply(self.decision.destination, len(raw), extra, scores)]
        replies.extend(messages.body_replies(raw, request=True, end_of_stream=body_end_of_stream))
        self._request_processed()
        return replies

    def _on_response_headers(self, headers: Any, served: str | None) -> list[pb.ProcessingResponse]:
        started = time.perf_counter()
        response_headers = _headers_dict(headers.headers)
        decision = self.decision
        if "text/event-stream" in response_headers.get("content-type", ""):
            if self._usage is not None:
                self._usage.streaming = True
            if decision is not None:
                decision.streaming = True
        added = self._director.response_headers(decision, served) if decision is not None else None
        if headers.end_of_stream:
            self._finish(completed=True)
        self._response_time += time.perf_counter() - started
        return [messages.response_headers_reply(added)]

    def _on_response_body(self, chunk: bytes, end_of_stream: bool) -> list[pb.ProcessingResponse]:
        started = time.perf_counter()
        if chunk and self.decision is not None:
            self.decision.response_chunk(len(chunk), started)
        if self._usage is not None:
            self._usage.feed(chunk)
        if end_of_stream:
            self._finish(completed=True)
        replies = messages.body_replies(chunk, request=False, end_of_stream=end_of_stream)
        self._response_time += time.perf_counter() - started
        return replies

    def _finish(self, completed: bool) -> None:
        decision = self.decision
        if decision is None or decision.released:
            return
        if completed and self._usage is not None:
            usage = self._usage.finish()
            if usage is not None:
                decision.usage = usage
        self._director.release(decision, completed)

    def close(self) -> bool:
        """The stream ended, normally or because Envoy or the client went away: free its state.
        True when it went away with its request in flight (the response not finished)."""
        abandoned = self.decision is not None and not self.decision.released and not self.done
        self._finish(completed=False)
        self._body = []
        if self._response_time:  # the request reached its response phase
            self._director.metrics.response_processing.observe(self._response_time)
            self._response_time = 0.0
        if self._span is not None:
            self._span.end()
            self._span = None
        return abandoned


class ExtProcService(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, director: Director) -> None:
        self._director = director

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        stream = RequestStream(self._director)
        streams = self._director.metrics.streams  # --enable-grpc-stream-metrics
        if streams is not None:
            streams.started()
        started = time.perf_counter()
        code = "OK"
        try:
            async for msg in request_iterator:
                for reply in stream.handle(msg):
                    yield reply
                if stream.done:
                    return
        except BaseException as exc:
            code = _code_of(exc, context)
            raise
        finally:
            abandoned = stream.close()
            if streams is not None:
                # gRPC in Python ends the request stream of a cancelled call as if half-closed:
                # a stream that ends with its request in flight was cancelled.
                if code == "OK" and (abandoned or context.cancelled()):
                    code = "Canceled"
                streams.finished(code, time.perf_counter() - started)


# gRPC status codes as Go's codes.Code.String() spells them (the extproc_streams_total label).
_GO_CODE_NAMES = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}


def _code_of(exc: BaseException, context: grpc.aio.ServicerContext) -> str:
    """The gRPC code a stream ended with, from what ended the handler."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "Canceled"  # Envoy or the client went away
    if isinstance(exc, grpc.aio.AbortError):  # context.abort(code, ...)
        return _GO_CODE_NAMES.get(context.code(), "Unknown")
    if isinstance(exc, grpc.aio.AioRpcError):
        return _GO_CODE_NAMES.get(exc.code(), "Unknown")
    return "Unknown"
