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

The limits every stream is held to (body size, body memory, open streams, idle time, message
order) are `epp.extproc.limits`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.errors import EppError, ErrorCode
from epp.extproc import messages
from epp.extproc.limits import (
    BODY_MEMORY_FACTOR,
    BRACKET_MEMORY_BYTES,
    COMMA_MEMORY_BYTES,
    CONTAINER_MEMORY_BYTES,
    DICT_ITEM_MEMORY_BYTES,
    HELD_MEMORY_FACTOR,
    HTTP_PAYLOAD_TOO_LARGE,
    HTTP_REQUEST_TIMEOUT,
    LIST_ITEM_MEMORY_BYTES,
    REFUSED_BUDGET,
    REFUSED_IDLE,
    REFUSED_PROTOCOL,
    REFUSED_STREAMS,
    REFUSED_TOO_LARGE,
    STRUCTURE_SCAN_BYTES,
    WIDE_BODY_MEMORY_FACTOR,
    LimitsCollector,
    Refused,
    StreamLimits,
    StreamShared,
    protocol_error,
    saturated,
)
from epp.framework import Api, InferenceRequest
from epp.observability import DEFAULT_FAIRNESS_ID, DEFAULT_PRIORITY, fairness_id
from epp.requestcontrol.director import Decision, Director
from epp.requestcontrol.model_rewrite import ResponseModelRestorer, forwarded_body
from epp.requestcontrol.parsing import api_for_path, parse_request
from epp.requestcontrol.usage import UsageReader

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger(__name__)


def _header_text(h: Any) -> str:
    """One HeaderValue's value: Envoy sends raw_value (bytes) in current versions, value in older ones."""
    value: str = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return value


def _headers_dict(headers: Any) -> dict[str, str]:
    return {h.key.lower(): _header_text(h) for h in headers.headers}


# A generator of its own, seeded from os.urandom: a request id needs to be unique, not secret, and
# uuid4 pays a urandom system call per request (2.2 us against 0.4).
_random_bits = random.Random().getrandbits


def _new_request_id() -> str:
    """A random version-4 UUID as 32 hex digits, the form of `uuid.uuid4().hex`."""
    n = _random_bits(128)
    n = (n & ~(0xF000 << 64)) | (0x4000 << 64)  # version 4
    n = (n & ~(0xC000 << 48)) | (0x8000 << 48)  # the RFC 4122 variant
    return f"{n:032x}"


def _header_value(headers: Any, name: str) -> str:
    """One header's value ("" when absent), without making a dict of them all."""
    for h in headers.headers:
        if h.key.lower() == name:
            return _header_text(h)
    return ""


def _metadata_value(msg: pb.ProcessingRequest, namespace: str, key: str) -> Any:
    """One field of Envoy's filter metadata (a protobuf Value), or None when it is absent."""
    if not msg.HasField("metadata_context"):
        return None
    namespaces = msg.metadata_context.filter_metadata
    if namespace not in namespaces:
        return None
    fields = namespaces[namespace].fields
    return fields.get(key)


def _subset_hint(msg: pb.ProcessingRequest) -> list[str] | None:
    """Envoy's endpoint subset hint (a list of "ip:port"), or None when there is none. A hint that
    is not a list is ignored, as the Go EPP ignores it."""
    value = _metadata_value(msg, messages.SUBSET_HINT_NAMESPACE, messages.SUBSET_HINT_KEY)
    if value is None:
        return None
    if value.WhichOneof("kind") != "list_value":
        log.debug("ignoring a subset hint that is not a list: %s", value.WhichOneof("kind"))
        return None
    return [v.string_value for v in value.list_value.values if v.WhichOneof("kind") == "string_value"]


def _served_endpoint(msg: pb.ProcessingRequest) -> str | None:
    """The endpoint Envoy reports it sent the request to (`envoy.lb` /
    `x-gateway-destination-endpoint-served`), on the response headers; None when not reported."""
    value = _metadata_value(msg, messages.LB_METADATA_NAMESPACE, messages.DESTINATION_SERVED_KEY)
    return (value.string_value or None) if value is not None else None


# The body modes epp speaks (as the Go EPP): the request body streamed both ways, the response
# body the same or not sent (epp then reads no usage, TTFT or ITL of its own).
_FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED
_REQUEST_BODY_MODES = (_FULL_DUPLEX,)
_RESPONSE_BODY_MODES = (_FULL_DUPLEX, ProcessingMode.NONE)


def _unsupported_body_mode(msg: pb.ProcessingRequest) -> EppError | None:
    """The error for a gateway whose ext_proc filter sends bodies in a mode epp does not speak, from
    the modes Envoy reports in a stream's first message (`protocol_config`, Envoy 1.34 and later);
    None when they are fine or not reported. Without it such a request waits for a body that never
    comes (NONE) or Envoy for a reply epp does not send (BUFFERED, STREAMED)."""
    if not msg.HasField("protocol_config"):
        return None
    config = msg.protocol_config
    for what, mode, allowed in (
        ("request_body_mode", config.request_body_mode, _REQUEST_BODY_MODES),
        ("response_body_mode", config.response_body_mode, _RESPONSE_BODY_MODES),
    ):
        if mode not in allowed:
            wanted = " or ".join(ProcessingMode.BodySendMode.Name(m) for m in allowed)
            known = mode in ProcessingMode.BodySendMode.values()
            name = ProcessingMode.BodySendMode.Name(mode) if known else str(mode)
            return Refused(
                ErrorCode.INTERNAL,
                f"the gateway's ext_proc filter is set to processing_mode.{what} {name}; epp needs "
                f'{wanted} (docs/architecture.md, "The request path")',
                REFUSED_PROTOCOL,
            )
    return None


def _content_length(headers: Mapping[str, str]) -> int | None:
    """The declared body size, when the request declares a usable one."""
    value = headers.get("content-length", "").strip()
    # isascii: "²".isdigit() is true, and int() refuses it.
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 18 else None


def _structure(raw: bytes) -> tuple[int, int]:
    """At most how many JSON objects and arrays, and values after a comma, a body parses into: its
    `{` and `[`, and its `,` (in strings too), counted with numpy on a view of the body (40 us at
    100 kB, against 52 us for its parse). `{` and `[` differ only in bit 0x20: one compare finds
    both."""
    data = np.frombuffer(raw, np.uint8)
    return int(np.count_nonzero((data | 0x20) == 0x7B)), int(np.count_nonzero(data == 0x2C))


def _parsed_structure(root: Mapping[str, Any], most: int) -> int:
    """The memory a parsed body's dicts and lists hold beyond their text (the rates in
    `epp.extproc.limits`), for a body whose bytes hold `most` `{` and `[`. Items are counted by
    len(); only containers are searched for more containers, and only until `most` were found:
    a prompt of a million token ids costs two steps, a chat request one a message."""
    found, total = 1, 0
    stack: list[Any] = [root]
    while stack:
        value = stack.pop()
        if type(value) is dict:
            children = value.values()
            total += CONTAINER_MEMORY_BYTES + len(value) * DICT_ITEM_MEMORY_BYTES
        else:
            children = value
            total += CONTAINER_MEMORY_BYTES + len(value) * LIST_ITEM_MEMORY_BYTES
        if found < most:
            for child in children:
                if type(child) is dict or type(child) is list:  # all orjson makes of `{` and `[`
                    found += 1
                    stack.append(child)
    return total


# A JSON \u escape: text that may parse into strings of up to 4 bytes a character. Searched only in
# a body holding a backslash (memchr's speed); the regex finds it 2-3x faster than `b"\\u" in raw`,
# which ran at about 1 GB/s here (75 us of a 100 kB body's CPU).
_UNICODE_ESCAPE = re.compile(rb"\\u")


# The stream's protocol phase.
_START = 0  # nothing received yet: only request headers may come
_REQUEST = 1  # request headers received, the body is arriving
_ROUTED = 2  # the request was routed (or failed): the response may come
_RESPONSE = 3  # response headers received


class RequestStream:
    """Protocol state of one ext_proc stream."""

    __slots__ = (
        "_body",
        "_body_size",
        "_charged",
        "_declared",
        "_director",
        "_generated_request_id",
        "_held",
        "_phase",
        "_prepared",
        "_received",
        "_request",
        "_request_timed",
        "_response_time",
        "_restorer",
        "_shared",
        "_span",
        "_usage",
        "decision",
        "done",
        "headers",
        "request_id",
        "subset",
    )

    def __init__(self, director: Director, shared: StreamShared | None = None) -> None:
        self._director = director
        self._shared = shared if shared is not None else StreamShared(StreamLimits(), log)
        self._phase = _START
        self._received = 0.0  # perf_counter() at the request headers
        self._request_timed = False  # request processing time observed (once per request)
        self._response_time = 0.0  # time spent handling the response's messages
        self._span: Span | None = None  # the stream's trace span (gateway.request)
        self.headers: dict[str, str] = {}
        self.request_id = ""
        self._generated_request_id = False
        self.subset: list[str] | None = None
        self._body: list[bytes] = []  # the chunks as received, joined once at the end
        self._prepared: tuple[bytes, InferenceRequest] | None = None  # the whole body, parsed
        self._body_size = 0
        self._declared = 0  # the content-length the budget was charged for up front
        self._charged = 0  # bytes charged to the body budget (given back when the stream ends)
        self._held = 0  # what the parsed request holds once its body was sent back (charged then)
        self._request: InferenceRequest | None = None  # once parsed: labels its error metrics
        self.decision: Decision | None = None
        self._usage: UsageReader | None = None
        self._restorer: ResponseModelRestorer | None = None  # the request's model was rewritten
        self.done = False  # an immediate response was sent: Envoy ends the request

    def handle(self, msg: pb.ProcessingRequest) -> Iterable[pb.ProcessingResponse]:
        """The replies to one message. A routed request's body replies are made as they are
        consumed (one chunk at a time); everything else has happened when this returns."""
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
                self._expect_response("response trailers")
                self._finish(completed=True)
                return [messages.trailers_reply(request=False)]
            raise protocol_error("a message with no request or response part")
        except EppError as exc:
            return self._fail(exc)
        except Exception as exc:  # a bug must give the client a 500, never a hung request
            error = EppError(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")
            return self._fail(error, traceback=True)

    async def admission(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse] | None:
        """Admission (flow control, docs/flow-control.md): before the message that completes the
        request body is handled, wait for the request's turn. Returns the refusal to send, or None."""
        if self._phase != _REQUEST:
            return None
        kind = msg.WhichOneof("request")
        if not (kind == "request_body" and msg.request_body.end_of_stream) and kind != "request_trailers":
            return None
        try:
            # The body is checked and parsed before the request waits: a body too large or not a
            # request gets its 413 / 400 at once and never holds a place in a queue.
            if kind == "request_body":
                self._take_body_chunk(msg.request_body.body)
            self._prepare_body()
            await self._director.admit(self.headers, self._body_size, self.request_id)
        except EppError as exc:
            return self._fail(exc)
        except Exception as exc:  # a bug (a plugin's): a 500, never a stream ended bare
            error = EppError(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")
            return self._fail(error, traceback=True)
        return None

    def _fail(self, exc: EppError, traceback: bool = False) -> list[pb.ProcessingResponse]:
        """Every error ends here, so each is counted and logged once (one line; a bug's with its
        traceback), whichever layer raised it."""
        self.done = True
        self._phase = _ROUTED
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
        status = exc.code.http_status
        if isinstance(exc, Refused):
            status = exc.http_status
            self._shared.refusals[exc.reason] += 1
        if status >= 500:
            self._shared.server_errors.log(
                logging.ERROR,
                "request %s failed: %d %s",
                self.request_id or "-",
                status,
                exc.message,
                exc_info=traceback,
            )
        else:
            self._shared.client_errors.log(
                logging.INFO, "request %s rejected: %d %s", self.request_id or "-", status, exc.message
            )
        self._release_body()
        return [messages.immediate_reply(exc, status)]

    def _request_processed(self) -> None:
        """The request phase is over (routed, or failed): its processing time, once."""
        if not self._request_timed and self._received:
            self._request_timed = True
            self._director.metrics.request_processing.observe(time.perf_counter() - self._received)

    # --- the request ------------------------------------------------------------------------------

    def _on_request_headers(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        if self._phase != _START:
            # Envoy sends one request's headers once per stream. Refused, not restarted: the
            # stream's first pick is released when the stream ends.
            raise protocol_error("request headers received twice on one stream")
        self._phase = _REQUEST
        self._received = time.perf_counter()
        self.headers = _headers_dict(msg.request_headers.headers)
        self.subset = _subset_hint(msg)
        self.request_id = self.headers.get(messages.REQUEST_ID_HEADER, "")
        if not self.request_id:
            self.request_id = _new_request_id()
            self._generated_request_id = True
        misconfigured = _unsupported_body_mode(msg)
        if misconfigured is not None:
            raise misconfigured
        tracer = self._director.tracer
        if tracer is not None and self._span is None:
            self._span = tracer.start_request(self.headers, self.request_id)
        if not msg.request_headers.end_of_stream:
            declared = _content_length(self.headers)
            if declared:  # refuse at once what cannot fit, before a byte of body arrives
                self._check_body_size(declared)
                self._charge(declared, "declared")
                self._declared = declared
            return []  # wait for the body
        # No body (GET /v1/models, ...): nothing to schedule on, route on load alone.
        request = self._request = InferenceRequest(
            request_id=self.request_id,
            model="",
            api=api_for_path(self.headers.get(":path", "")),
            prompt_text="",
            headers=self.headers,
            body={},
        )
        decision = self.decision = self._director.pick_any(request, self.subset, received=self._received)
        self._phase = _ROUTED
        self._request_processed()
        extra = self._upstream_headers(decision.headers)
        return [messages.request_headers_reply(decision.destination, None, extra)]

    def _check_body_size(self, size: int) -> None:
        limit = self._shared.limits.max_body_bytes
        if size > limit:
            raise Refused(
                ErrorCode.BAD_REQUEST,
                f"request body of {size} bytes exceeds the limit of {limit} bytes",
                REFUSED_TOO_LARGE,
                HTTP_PAYLOAD_TOO_LARGE,
            )

    def _charge(self, body_bytes: int, what: str) -> None:
        """Charge the memory of `body_bytes` more bytes of body to the shared budget, or refuse."""
        self._take(body_bytes * BODY_MEMORY_FACTOR, f"{what} body: {body_bytes} bytes more")

    def _take(self, amount: int, what: str) -> None:
        budget = self._shared.budget
        if self._charged + amount > budget.limit:
            # Not even an idle epp could hold it (a body of wide text is charged 14x while it is
            # parsed): final, not a 429 to retry.
            raise Refused(
                ErrorCode.BAD_REQUEST,
                f"the request body needs more memory than --request-body-memory-budget allows "
                f"({what}; {self._charged + amount} bytes of {budget.limit}): send a smaller body",
                REFUSED_TOO_LARGE,
                HTTP_PAYLOAD_TOO_LARGE,
            )
        if not budget.take(amount):
            raise saturated(
                f"the request body memory budget is full ({what}; {budget.used} of {budget.limit} "
                "bytes in use): retry later",
                REFUSED_BUDGET,
            )
        self._charged += amount

    def _charge_to(self, amount: int, what: str) -> None:
        """Make the stream's charge `amount`: take the difference, or give it back."""
        if amount > self._charged:
            self._take(amount - self._charged, what)
        elif amount < self._charged:
            self._shared.budget.give_back(self._charged - amount)
            self._charged = amount

    def _parse(self, raw: bytes) -> InferenceRequest:
        """Parse the body, charging the budget for what that takes (docs: "Reliability"), and note
        what the request holds once its body has been sent back (`_held`)."""
        size = len(raw)
        allowance = size // 2  # structure the per-byte factor's margin holds
        containers, commas = sys.maxsize, 0  # at most this many dicts and lists, and commas
        # May hold text of up to 4 bytes a character.
        wide = not raw.isascii() or (b"\\" in raw and _UNICODE_ESCAPE.search(raw) is not None)
        factor = WIDE_BODY_MEMORY_FACTOR if wide else BODY_MEMORY_FACTOR
        parsing = factor * size
        kind = "with wide text" if wide else ""
        if size >= STRUCTURE_SCAN_BYTES:
            # What its bytes say the structure costs at least (a bound on a body of `{},` or `1,`).
            containers, commas = _structure(raw)
            parsing += max(0, containers * BRACKET_MEMORY_BYTES + commas * COMMA_MEMORY_BYTES - allowance)
            kind = kind or f"of {containers} JSON objects and arrays and {commas} more values"
        if parsing > self._charged:  # before parsing: the joined body, and what the parse may allocate
            self._charge_to(parsing, f"a body of {size} bytes {kind}".rstrip())
        request = self._request = parse_request(
            self.request_id, self.headers.get(":path", ""), self.headers, raw
        )
        # Once parsed, what its dicts and lists hold (brackets and commas in text cost nothing),
        # unless its bytes already say that is within the allowance.
        most = (
            containers * (CONTAINER_MEMORY_BYTES + DICT_ITEM_MEMORY_BYTES) + commas * DICT_ITEM_MEMORY_BYTES
        )
        structure = max(0, _parsed_structure(request.body, containers) - allowance) if most > allowance else 0
        held = HELD_MEMORY_FACTOR * size + structure  # what an ASCII body's request holds, measured
        if wide:
            # The prompt's UTF-8 form (the body's size), the prompt text and the parsed strings it
            # came from (the text's size in memory each), and room for what parsing leaves behind:
            # the body's size, and the text's growth beyond it.
            text = sys.getsizeof(request.prompt_text)
            held = max(held, 2 * size + 2 * text + max(0, text - size))
        self._held = held
        # With the joined body; gives back an overstatement (a declared content-length, the parse's).
        self._charge_to(size + held, f"a parsed body holding {size + held} bytes")
        return request

    def _body_sent(self) -> None:
        """The body has gone back to Envoy and its bytes are freed: the stream is charged for what
        its request still holds until the response ends."""
        if self._charged > self._held:
            self._charge_to(self._held, "")

    def _release_body(self) -> None:
        self._body = []
        if self._charged:
            self._shared.budget.give_back(self._charged)
            self._charged = 0

    def _upstream_headers(self, routing: Mapping[str, str | None] | None) -> dict[str, str | None] | None:
        """Headers set on (or, None, removed from) the request sent upstream: the profile
        handler's routing headers, a generated x-request-id, and the removal of any header only
        epp may set that the client sent and epp does not set."""
        extra: dict[str, str | None] = dict(routing) if routing else {}
        if self._generated_request_id:
            extra[messages.REQUEST_ID_HEADER] = self.request_id
        for name in messages.EPP_OWNED_REQUEST_HEADERS:
            if name in self.headers and name not in extra:
                extra[name] = None
        return extra or None

    def _on_request_body(self, chunk: bytes, end_of_stream: bool) -> Iterable[pb.ProcessingResponse]:
        if self._phase != _REQUEST:
            if self._phase == _START:
                raise protocol_error("request body before the request headers")
            # Envoy sends no body after end of stream (the headers', or the body's own).
            raise protocol_error("request body after the request was routed")
        if self._prepared is None:  # (else admission took the chunk and parsed the body)
            self._take_body_chunk(chunk)
            if not end_of_stream:
                return []
        return self._route_buffered_body(body_end_of_stream=True)

    def _take_body_chunk(self, chunk: bytes) -> None:
        size = self._body_size + len(chunk)
        self._check_body_size(size)
        covered = max(self._declared, self._body_size)  # the body bytes charged so far
        if size > covered:
            self._charge(size - covered, "received")
        self._body_size = size
        if chunk:
            self._body.append(chunk)

    def _prepare_body(self) -> None:
        """Join the body's chunks (once; they go as soon as they are joined) and parse it."""
        chunks, self._body = self._body, []
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        del chunks
        self._prepared = (raw, self._parse(raw))

    def _on_request_trailers(self) -> Iterable[pb.ProcessingResponse]:
        if self._phase == _START:
            raise protocol_error("request trailers before the request headers")
        if self._phase != _REQUEST:
            return [messages.trailers_reply(request=True)]
        # The body ended with trailers instead of an end_of_stream body chunk.
        replies = self._route_buffered_body(body_end_of_stream=False)
        return _chain(replies, [messages.trailers_reply(request=True)])

    def _route_buffered_body(self, body_end_of_stream: bool) -> Iterator[pb.ProcessingResponse]:
        if self._prepared is None:
            self._prepare_body()
        assert self._prepared is not None
        raw, request = self._prepared
        self._prepared = None
        if self._director.rewrite_model(request):  # forwarded with the target model, its new size
            raw = forwarded_body(request)
            self._restorer = ResponseModelRestorer(request)
        decision = self.decision = self._director.schedule(
            request, self.subset, received=self._received, request_size=len(raw), span=self._span
        )
        self._phase = _ROUTED
        self._usage = UsageReader(streaming=request.streaming or request.api is Api.OTHER)
        routing = decision.result.headers if decision.result is not None else None
        scores = decision.result.primary.scores if self._director.emit_scores and decision.result else None
        headers_reply = messages.request_headers_reply(
            decision.destination, len(raw), self._upstream_headers(routing), scores
        )
        self._request_processed()
        # The body goes back in chunks made as gRPC sends them: never a second copy of it whole.
        body_replies = messages.iter_body_replies(raw, request=True, end_of_stream=body_end_of_stream)
        del raw
        return self._then_body_sent(_chain([headers_reply], body_replies))

    def _then_body_sent(self, replies: Iterator[pb.ProcessingResponse]) -> Iterator[pb.ProcessingResponse]:
        yield from replies
        del replies  # the last reference to the body's bytes
        self._body_sent()

    # --- the response -----------------------------------------------------------------------------

    def _expect_response(self, what: str) -> None:
        if self._phase < _ROUTED:
            raise protocol_error(f"{what} before the request was routed")

    def _on_response_headers(self, headers: Any, served: str | None) -> list[pb.ProcessingResponse]:
        self._expect_response("response headers")
        self._phase = _RESPONSE
        started = time.perf_counter()
        decision = self.decision
        if "text/event-stream" in _header_value(headers.headers, "content-type"):
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
        self._expect_response("response body")
        started = time.perf_counter()
        if chunk and self.decision is not None:
            self.decision.response_chunk(len(chunk), started)
        if self._usage is not None:
            self._usage.feed(chunk)
        if end_of_stream:
            self._finish(completed=True)
        if self._restorer is not None:  # the client sees the model it asked for, as upstream
            chunk = self._restorer.restore(chunk)
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

    # --- the end of the stream --------------------------------------------------------------------

    @property
    def routed(self) -> bool:
        """The request was routed or refused: an idle stream is now waiting for its response."""
        return self._phase >= _ROUTED

    def idle(self, seconds: float) -> list[pb.ProcessingResponse]:
        """No message for `seconds` while the request was arriving: a 408 ends it."""
        return self._fail(
            Refused(
                ErrorCode.BAD_REQUEST,
                f"no request data for {seconds:g}s (--extproc-stream-idle-timeout)",
                REFUSED_IDLE,
                HTTP_REQUEST_TIMEOUT,
            )
        )

    def refusesaturated(self, message: str) -> list[pb.ProcessingResponse]:
        return self._fail(saturated(message, REFUSED_STREAMS))

    def close(self) -> bool:
        """The stream ended, normally or because Envoy or the client went away: free its state.
        True when it went away with its request in flight (the response not finished)."""
        abandoned = self.decision is not None and not self.decision.released and not self.done
        self._finish(completed=False)
        self._release_body()
        if self._response_time:  # the request reached its response phase
            self._director.metrics.response_processing.observe(self._response_time)
            self._response_time = 0.0
        if self._span is not None:
            self._span.end()
            self._span = None
        return abandoned


class _IdleTimer:
    """--extproc-stream-idle-timeout with one timer per stream rather than one per message
    (`asyncio.timeout` around every read measured about 10 us a message). The timer re-arms
    itself until the stream has waited `seconds` for one message, then cancels the stream's
    task; `read` turns that cancellation into TimeoutError, as `asyncio.timeout` does."""

    __slots__ = ("_cancelling", "_expired", "_handle", "_loop", "_seconds", "_task", "_waiting_since")

    # The loop may run a timer this much early (its clock resolution): counted as on time.
    _SLACK_S = 0.001

    def __init__(self, seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("an idle timer runs in a task")
        self._task = task
        self._seconds = seconds
        self._waiting_since: float | None = None
        self._cancelling = 0
        self._expired = False
        self._handle = self._loop.call_at(self._loop.time() + seconds, self._check)

    def _check(self) -> None:
        now, since = self._loop.time(), self._waiting_since
        if since is not None and since + self._seconds <= now + self._SLACK_S:
            self._expired = True
            self._task.cancel()
            return
        self._handle = self._loop.call_at((now if since is None else since) + self._seconds, self._check)

    async def read(self, messages: AsyncIterator[pb.ProcessingRequest]) -> pb.ProcessingRequest:
        self._cancelling = self._task.cancelling()
        self._waiting_since = self._loop.time()
        try:
            return await anext(messages)
        except asyncio.CancelledError:
            if self._expired and self._task.uncancel() <= self._cancelling:
                raise TimeoutError from None
            raise
        finally:
            self._waiting_since = None

    def close(self) -> None:
        self._handle.cancel()


def _chain(
    first: Iterable[pb.ProcessingResponse], then: Iterable[pb.ProcessingResponse]
) -> Iterator[pb.ProcessingResponse]:
    yield from first
    yield from then


class ExtProcService(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, director: Director, limits: StreamLimits | None = None) -> None:
        self._director = director
        self.shared = StreamShared(limits if limits is not None else StreamLimits(), log)
        # One ext_proc server per metrics registry reports these (a second one would clash).
        with contextlib.suppress(ValueError):
            director.metrics.registry.register(LimitsCollector(self.shared))

    @property
    def open_streams(self) -> int:
        return self.shared.open_streams

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        shared = self.shared
        stream = RequestStream(self._director, shared)
        streams = self._director.metrics.streams  # --enable-grpc-stream-metrics
        if streams is not None:
            streams.started()
        started = time.perf_counter()
        code = "OK"
        limits = shared.limits
        if shared.open_streams >= limits.max_streams:
            # Answered at once, before reading anything: Envoy has sent the request headers.
            try:
                yield stream.refusesaturated(
                    f"too many ext_proc streams open (--max-extproc-streams={limits.max_streams})"
                )[0]
            finally:
                if streams is not None:
                    streams.finished(code, time.perf_counter() - started)
            return
        shared.open_streams += 1
        idle_s = limits.idle_timeout_s
        messages_in = aiter(request_iterator)
        idle = _IdleTimer(idle_s) if idle_s > 0 else None
        try:
            while True:
                if idle is not None and stream.routed:
                    # A routed stream waits for its response as long as the gateway does (a long
                    # non-streamed generation sends nothing for minutes), as the Go EPP's does; a
                    # gateway gone without a word is found by gRPC keepalive (ext_proc_grpc_options).
                    idle.close()
                    idle = None
                try:
                    msg = await (idle.read(messages_in) if idle is not None else anext(messages_in))
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    yield stream.idle(idle_s)[0]
                    return
                if self._director.admits:
                    refused = await stream.admission(msg)
                    if refused is not None:
                        yield refused[0]
                        return
                for reply in stream.handle(msg):
                    yield reply
                if stream.done:
                    return
        except BaseException as exc:
            code = _code_of(exc, context)
            raise
        finally:
            if idle is not None:
                idle.close()
            shared.open_streams -= 1
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
