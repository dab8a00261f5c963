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

Limits, for clients that do not behave (docs/architecture.md, "Reliability"):
- a body larger than --max-request-body-size is refused with a 413, as soon as its declared
  content-length or its bytes so far say so;
- every stream's body is charged to one memory budget (--request-body-memory-budget) from its
  first byte, or its declared content-length, until the stream ends; a body the budget cannot
  hold now is refused with a 429 (`x-llm-d-request-dropped-reason: rejected-saturated`);
- at most --max-extproc-streams streams are open at once; one more is answered at once with a
  429 (rejected-saturated), as the Go EPP answers when it is saturated;
- a stream that sends nothing for --extproc-stream-idle-timeout ends: with a 408 while its request
  is still arriving, else with gRPC DEADLINE_EXCEEDED; its state is freed either way;
- the messages must come in the protocol's order: request headers once and first, the response
  only after the request was routed. Anything else is refused with a 400 (the stream's first pick,
  if any, is released);
- every refusal is counted in llm_d_epp_request_error_total and logged in one line, at most
  LOG_BURST lines per LOG_INTERVAL_S seconds, then one line saying how many were suppressed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epp.errors import DROPPED_SATURATED, EppError, ErrorCode
from epp.extproc import messages
from epp.framework import Api, InferenceRequest
from epp.observability import DEFAULT_FAIRNESS_ID, DEFAULT_PRIORITY, PREFIX, fairness_id
from epp.requestcontrol.director import Decision, Director
from epp.requestcontrol.model_rewrite import ResponseModelRestorer, forwarded_body
from epp.requestcontrol.parsing import api_for_path, parse_request
from epp.requestcontrol.usage import UsageReader
from epp.settings import REQUEST_BODY_MEMORY_FACTOR

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from epp.settings import Settings

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# Defaults of the limits (the flags' defaults; docs/configuration.md).
MAX_REQUEST_BODY = 64 * MiB  # --max-request-body-size: one request's body, else 413
BODY_MEMORY_BUDGET = 320 * MiB  # --request-body-memory-budget: all streams' bodies, else 429
MAX_STREAMS = 10_000  # --max-extproc-streams: open ext_proc streams, else 429
STREAM_IDLE_TIMEOUT_S = 300.0  # --extproc-stream-idle-timeout (Envoy's stream_idle_timeout default)
# What one byte of request body costs in memory while its stream lasts, measured: the received
# chunks joined once (the joined bytes held until sent back to Envoy), the parsed JSON's strings,
# the prompt text (for chat, the serialized messages) and its UTF-8 form the prefix index hashes:
# 3.2x for a 60 MB ASCII completion, 4.1x for a chat request (4.5x with four at once). The
# budget charges this many bytes per body byte from the first byte.
BODY_MEMORY_FACTOR = REQUEST_BODY_MEMORY_FACTOR
# Python keeps a text with one character beyond U+FFFF at 4 bytes per character, so a body with
# non-ASCII bytes or \u escapes may parse into strings 4x its size (the parsed JSON, the prompt
# text; 12x the body in all, measured): charged this many bytes per body byte while it is parsed,
# then what it turned out to hold.
WIDE_BODY_MEMORY_FACTOR = 14
# Refusals are logged one line each, at most LOG_BURST lines per LOG_INTERVAL_S seconds (per kind:
# client errors, server errors); then one line says how many were suppressed.
LOG_BURST = 10
LOG_INTERVAL_S = 10.0

_HTTP_PAYLOAD_TOO_LARGE = 413
_HTTP_REQUEST_TIMEOUT = 408


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """The ext_proc request path's limits (the flags of docs/configuration.md, "Serving")."""

    max_body_bytes: int = MAX_REQUEST_BODY
    body_budget_bytes: int = BODY_MEMORY_BUDGET
    max_streams: int = MAX_STREAMS
    idle_timeout_s: float = STREAM_IDLE_TIMEOUT_S  # 0: no idle timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamLimits:
        return cls(
            max_body_bytes=settings.max_request_body_size,
            body_budget_bytes=settings.request_body_memory_budget,
            max_streams=settings.max_extproc_streams,
            idle_timeout_s=settings.extproc_stream_idle_timeout_s,
        )


class BodyBudget:
    """Memory charged for request bodies by all streams together (BODY_MEMORY_FACTOR bytes per body
    byte), against --request-body-memory-budget."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, amount: int) -> bool:
        if self.used + amount > self.limit:
            return False
        self.used += amount
        return True

    def give_back(self, amount: int) -> None:
        self.used -= amount


class LogLimiter:
    """At most `burst` lines per `interval_s` seconds through `logger`; past that, lines are only
    counted, and one line at the end of the interval says how many were suppressed."""

    __slots__ = ("_emitted", "_flush", "_level", "_logger", "_started", "_suppressed", "burst", "interval_s")

    def __init__(self, logger: logging.Logger, burst: int, interval_s: float) -> None:
        self._logger = logger
        self.burst = burst
        self.interval_s = interval_s
        self._started = -math.inf
        self._emitted = 0
        self._suppressed = 0
        self._level = logging.DEBUG  # the highest level suppressed in this interval
        self._flush: asyncio.TimerHandle | None = None

    def log(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        if not self._logger.isEnabledFor(level):
            return
        now = time.monotonic()
        if now - self._started >= self.interval_s:
            self._summarise()
            self._started, self._emitted = now, 0
        if self._emitted < self.burst:
            self._emitted += 1
            self._logger.log(level, msg, *args, exc_info=exc_info)
            return
        self._suppressed += 1
        self._level = max(self._level, level)
        if self._flush is None:
            with contextlib.suppress(RuntimeError):  # no running loop: the next line summarises
                delay = self._started + self.interval_s - now
                self._flush = asyncio.get_running_loop().call_later(delay, self._summarise)

    def _summarise(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._suppressed:
            self._logger.log(
                self._level,
                "suppressed %d similar log lines in the last %gs",
                self._suppressed,
                self.interval_s,
            )
            self._suppressed, self._level = 0, logging.DEBUG


class StreamShared:
    """What every stream of one ext_proc server shares: the limits, the body budget, the count of
    open streams, the refusals by reason and the rate-limited logs of refusals."""

    __slots__ = ("budget", "client_errors", "limits", "open_streams", "refusals", "server_errors")

    def __init__(self, limits: StreamLimits) -> None:
        self.limits = limits
        self.budget = BodyBudget(limits.body_budget_bytes)
        self.open_streams = 0
        self.refusals = dict.fromkeys(REFUSAL_REASONS, 0)
        self.client_errors = LogLimiter(log, LOG_BURST, LOG_INTERVAL_S)  # 4xx
        self.server_errors = LogLimiter(log, LOG_BURST, LOG_INTERVAL_S)  # 5xx


class _LimitsCollector(Collector):
    """The request path's limits at work, read when /metrics is scraped."""

    def __init__(self, shared: StreamShared) -> None:
        self._shared = shared

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        return iter(self._families())

    def _families(self) -> list[Metric]:
        shared = self._shared
        streams = GaugeMetricFamily(
            PREFIX + "extproc_streams_open",
            "[ALPHA] ext_proc streams open now (at most --max-extproc-streams).",
            value=shared.open_streams,
        )
        memory = GaugeMetricFamily(
            PREFIX + "request_body_memory_bytes",
            "[ALPHA] Memory charged for request bodies now (at most --request-body-memory-budget).",
            value=shared.budget.used,
        )
        refusals = CounterMetricFamily(
            PREFIX + "extproc_refusals",
            "[ALPHA] Streams refused by a request-path limit, by reason.",
            labels=["reason"],
        )
        for reason, count in shared.refusals.items():
            refusals.add_metric([reason], count)
        return [streams, memory, refusals]


def _headers_dict(headers: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in headers.headers:
        # Envoy sends raw_value (bytes) in current versions, value in older ones.
        out[h.key.lower()] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


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


def _content_length(headers: Mapping[str, str]) -> int | None:
    """The declared body size, when the request declares a usable one."""
    value = headers.get("content-length", "").strip()
    return int(value) if value.isdigit() and len(value) <= 18 else None


# Why a stream was refused by a limit (llm_d_epp_extproc_refusals_total{reason}).
REFUSED_PROTOCOL = "protocol-error"
REFUSED_TOO_LARGE = "body-too-large"
REFUSED_BUDGET = "body-memory-budget"
REFUSED_STREAMS = "stream-limit"
REFUSED_IDLE = "idle-timeout"
REFUSAL_REASONS = (REFUSED_PROTOCOL, REFUSED_TOO_LARGE, REFUSED_BUDGET, REFUSED_STREAMS, REFUSED_IDLE)


class _Refused(EppError):
    """A stream refused by one of the limits: its reason, and the HTTP status when no error code
    maps to it (413, 408)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        reason: str,
        http_status: int | None = None,
        dropped_reason: str | None = None,
    ) -> None:
        super().__init__(code, message, dropped_reason)
        self.reason = reason
        self.http_status = http_status or code.http_status


def _protocol_error(message: str) -> EppError:
    return _Refused(ErrorCode.BAD_REQUEST, f"ext_proc protocol error: {message}", REFUSED_PROTOCOL)


def _saturated(message: str, reason: str) -> EppError:
    return _Refused(ErrorCode.RESOURCE_EXHAUSTED, message, reason, dropped_reason=DROPPED_SATURATED)


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
        "_phase",
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
        self._shared = shared if shared is not None else StreamShared(StreamLimits())
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
        self._body_size = 0
        self._declared = 0  # the content-length the budget was charged for up front
        self._charged = 0  # bytes charged to the body budget (given back when the stream ends)
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
            raise _protocol_error("a message with no request or response part")
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
        if kind == "request_body" and msg.request_body.end_of_stream:
            size = self._body_size + len(msg.request_body.body)
        elif kind == "request_trailers":
            size = self._body_size
        else:
            return None
        try:
            await self._director.admit(self.headers, size, self.request_id)
        except EppError as exc:
            return self._fail(exc)
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
        if isinstance(exc, _Refused):
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
            raise _protocol_error("request headers received twice on one stream")
        self._phase = _REQUEST
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
            raise _Refused(
                ErrorCode.BAD_REQUEST,
                f"request body of {size} bytes exceeds the limit of {limit} bytes",
                REFUSED_TOO_LARGE,
                _HTTP_PAYLOAD_TOO_LARGE,
            )

    def _charge(self, body_bytes: int, what: str) -> None:
        """Charge the memory of `body_bytes` more bytes of body to the shared budget, or refuse."""
        self._take(body_bytes * BODY_MEMORY_FACTOR, f"{what} body: {body_bytes} bytes more")

    def _take(self, amount: int, what: str) -> None:
        budget = self._shared.budget
        if not budget.take(amount):
            raise _saturated(
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
        """Parse the body, charging the budget for what that takes (docs: "Reliability")."""
        size = len(raw)
        wide = not raw.isascii() or b"\\u" in raw  # may hold text of up to 4 bytes a character
        if wide:
            self._charge_to(WIDE_BODY_MEMORY_FACTOR * size, f"a body of {size} bytes with wide text")
        request = self._request = parse_request(
            self.request_id, self.headers.get(":path", ""), self.headers, raw
        )
        held = BODY_MEMORY_FACTOR * size  # what an ASCII body holds, measured
        if wide:
            # The joined body and the prompt's UTF-8 form (its size each), the prompt text and the
            # parsed strings it came from (the text's size in memory each), and room for what
            # parsing leaves behind: the body's size, and the text's growth beyond it.
            text = sys.getsizeof(request.prompt_text)
            held = max(held, 3 * size + 2 * text + max(0, text - size))
        self._charge_to(held, f"a parsed body holding {held} bytes")  # gives back an overstatement
        return request

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
                raise _protocol_error("request body before the request headers")
            return []  # body after routing (headers-only request): nothing to do
        size = self._body_size + len(chunk)
        self._check_body_size(size)
        covered = max(self._declared, self._body_size)  # the body bytes charged so far
        if size > covered:
            self._charge(size - covered, "received")
        self._body_size = size
        if chunk:
            self._body.append(chunk)
        if not end_of_stream:
            return []
        return self._route_buffered_body(body_end_of_stream=True)

    def _on_request_trailers(self) -> Iterable[pb.ProcessingResponse]:
        if self._phase == _START:
            raise _protocol_error("request trailers before the request headers")
        if self._phase != _REQUEST:
            return [messages.trailers_reply(request=True)]
        # The body ended with trailers instead of an end_of_stream body chunk.
        replies = self._route_buffered_body(body_end_of_stream=False)
        return _chain(replies, [messages.trailers_reply(request=True)])

    def _route_buffered_body(self, body_end_of_stream: bool) -> Iterator[pb.ProcessingResponse]:
        chunks, self._body = self._body, []
        # Joined once; the chunks go as soon as they are joined, before the JSON is parsed.
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        del chunks
        request = self._parse(raw)
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
        return _chain(
            [headers_reply], messages.iter_body_replies(raw, request=True, end_of_stream=body_end_of_stream)
        )

    # --- the response -----------------------------------------------------------------------------

    def _expect_response(self, what: str) -> None:
        if self._phase < _ROUTED:
            raise _protocol_error(f"{what} before the request was routed")

    def _on_response_headers(self, headers: Any, served: str | None) -> list[pb.ProcessingResponse]:
        self._expect_response("response headers")
        self._phase = _RESPONSE
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
            _Refused(
                ErrorCode.BAD_REQUEST,
                f"no request data for {seconds:g}s (--extproc-stream-idle-timeout)",
                REFUSED_IDLE,
                _HTTP_REQUEST_TIMEOUT,
            )
        )

    def refuse_saturated(self, message: str) -> list[pb.ProcessingResponse]:
        return self._fail(_saturated(message, REFUSED_STREAMS))

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
        self.shared = StreamShared(limits if limits is not None else StreamLimits())
        # One ext_proc server per metrics registry reports these (a second one would clash).
        with contextlib.suppress(ValueError):
            director.metrics.registry.register(_LimitsCollector(self.shared))

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
                yield stream.refuse_saturated(
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
                try:
                    msg = await (idle.read(messages_in) if idle is not None else anext(messages_in))
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if not stream.routed:
                        yield stream.idle(idle_s)[0]
                        return
                    shared.refusals[REFUSED_IDLE] += 1
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no ext_proc message for {idle_s:g}s (--extproc-stream-idle-timeout)",
                    )
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
