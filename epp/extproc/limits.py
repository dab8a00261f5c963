"""The limits every ext_proc stream is held to, for clients that do not behave
(docs/architecture.md, "Reliability"), and what the streams of one server share to enforce them:
- a body larger than --max-request-body-size is refused with a 413, as soon as its declared
  content-length or its bytes so far say so;
- every stream's body is charged to one memory budget (--request-body-memory-budget) from its
  first byte, or its declared content-length: for its bytes and the text they parse into, then
  for what the parsed JSON holds, and, once sent back to Envoy, for what its request holds until
  the stream ends; a body the budget cannot hold now is refused with a 429
  (`x-llm-d-request-dropped-reason: rejected-saturated`);
- at most --max-extproc-streams streams are open at once; one more is answered at once with a
  429 (rejected-saturated), as the Go EPP answers when it is saturated;
- a stream whose request stops arriving for --extproc-stream-idle-timeout ends with a 408 and its
  state is freed; once routed, a stream waits for its response as long as the gateway does (gRPC
  keepalive finds a gateway gone without closing its connection);
- the messages must come in the protocol's order: request headers once and first, the response
  only after the request was routed. Anything else is refused with a 400 (the stream's first pick,
  if any, is released);
- every refusal is counted in llm_d_epp_request_error_total and logged in one line, at most
  LOG_BURST lines per LOG_INTERVAL_S seconds, then one line saying how many were suppressed.
The stream (`epp.extproc.handler`) applies them as its messages arrive; this module holds their
defaults, the shared body budget and stream count, the refusals' reasons and errors, the
rate-limited logging, and the gauges and counter that show them on /metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epp.errors import DROPPED_SATURATED, EppError, ErrorCode
from epp.framework import LogLimiter
from epp.observability import PREFIX
from epp.settings import REQUEST_BODY_MEMORY_FACTOR

if TYPE_CHECKING:
    from epp.settings import Settings

MiB = 1024 * 1024
# Defaults of the limits (the flags' defaults; docs/configuration.md).
MAX_REQUEST_BODY = 64 * MiB  # --max-request-body-size: one request's body, else 413
BODY_MEMORY_BUDGET = 320 * MiB  # --request-body-memory-budget: all streams' bodies, else 429
MAX_STREAMS = 10_000  # --max-extproc-streams: open ext_proc streams, else 429
STREAM_IDLE_TIMEOUT_S = 300.0  # --extproc-stream-idle-timeout, before routing (Envoy's default)
# What one byte of request body costs in memory while its stream lasts: the received chunks joined
# once (until sent back to Envoy: one byte a byte), and what the request holds until its response
# ends: the parsed JSON's strings, the prompt text (for chat, the serialized messages) and its UTF-8
# form the prefix index hashes. The budget charges BODY_MEMORY_FACTOR bytes a body byte from the
# first byte, and HELD_MEMORY_FACTOR a byte (plus the structure's cost, below) once the body has
# been sent back. Measured RSS of eight routed 3.8 MB requests held open: 2.3-2.4x a completion's
# size, 3.1-3.5x a chat request's of long messages.
BODY_MEMORY_FACTOR = REQUEST_BODY_MEMORY_FACTOR
HELD_MEMORY_FACTOR = BODY_MEMORY_FACTOR - 1
# Python keeps a text with one character beyond U+FFFF at 4 bytes per character, so a body with
# non-ASCII bytes or \u escapes may parse into strings 4x its size (the parsed JSON, the prompt
# text; 12x the body in all, measured): charged this many bytes per body byte while it is parsed,
# then what it turned out to hold.
WIDE_BODY_MEMORY_FACTOR = 14
# What the per-byte factor does not see: a JSON object or array parses into a Python dict or list
# of 56-232 bytes from as little as 3 bytes of body (`{},`), each of its items into an object of
# its own (an int 28-32 bytes, a string 49 plus its text, a key not seen before too) and a slot
# (a dict entry 24-40 bytes, a list slot 8). Measured per item of a parsed body: 36 in a list of
# token ids, 114 in a dict of distinct keys; per chat message of two short fields, 296.
# Once parsed, a body is charged CONTAINER_MEMORY_BYTES for each dict and list it holds and
# DICT_ITEM_MEMORY_BYTES / LIST_ITEM_MEMORY_BYTES for each of their items. Before it is parsed,
# its bytes say only how many it may hold: each `{` and `[` is charged BRACKET_MEMORY_BYTES (an
# empty dict and its slot) and each `,` COMMA_MEMORY_BYTES, in strings too (a prompt of code is
# full of them), so the rates are the least such a byte costs when it is structure. Structure
# worth up to half the body's size is in the per-byte factor's margin (a completion's request
# holds 2.4x its size, charged 4x). Measured RSS held by routed requests: a prompt of token ids
# 7.9-8.3x its size (charged 10.4x), a chat request of 209-byte messages 4.5x (charged 6.1x).
# The bytes are counted only in a body of this size or more: below it, what one parse at a time
# may allocate beyond its charge is at most a few MB.
STRUCTURE_SCAN_BYTES = 64 * 1024
CONTAINER_MEMORY_BYTES = 240
DICT_ITEM_MEMORY_BYTES = 128
LIST_ITEM_MEMORY_BYTES = 48
BRACKET_MEMORY_BYTES = 72
COMMA_MEMORY_BYTES = 64
# Refusals are logged one line each, at most LOG_BURST lines per LOG_INTERVAL_S seconds (per kind:
# client errors, server errors); then one line says how many were suppressed.
LOG_BURST = 10
LOG_INTERVAL_S = 10.0

HTTP_PAYLOAD_TOO_LARGE = 413
HTTP_REQUEST_TIMEOUT = 408


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


class StreamShared:
    """What every stream of one ext_proc server shares: the limits, the body budget, the count of
    open streams, the refusals by reason and the rate-limited logs of refusals."""

    __slots__ = ("budget", "client_errors", "limits", "open_streams", "refusals", "server_errors")

    def __init__(self, limits: StreamLimits, logger: logging.Logger) -> None:
        self.limits = limits
        self.budget = BodyBudget(limits.body_budget_bytes)
        self.open_streams = 0
        self.refusals = dict.fromkeys(REFUSAL_REASONS, 0)
        self.client_errors = LogLimiter(logger, LOG_BURST, LOG_INTERVAL_S)  # 4xx
        self.server_errors = LogLimiter(logger, LOG_BURST, LOG_INTERVAL_S)  # 5xx


class LimitsCollector(Collector):
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


# Why a stream was refused by a limit (llm_d_epp_extproc_refusals_total{reason}).
REFUSED_PROTOCOL = "protocol-error"
REFUSED_TOO_LARGE = "body-too-large"
REFUSED_BUDGET = "body-memory-budget"
REFUSED_STREAMS = "stream-limit"
REFUSED_IDLE = "idle-timeout"
REFUSAL_REASONS = (REFUSED_PROTOCOL, REFUSED_TOO_LARGE, REFUSED_BUDGET, REFUSED_STREAMS, REFUSED_IDLE)


class Refused(EppError):
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


def protocol_error(message: str) -> EppError:
    return Refused(ErrorCode.BAD_REQUEST, f"ext_proc protocol error: {message}", REFUSED_PROTOCOL)


def saturated(message: str, reason: str) -> EppError:
    return Refused(ErrorCode.RESOURCE_EXHAUSTED, message, reason, dropped_reason=DROPPED_SATURATED)
