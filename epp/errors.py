"""Errors that end a request with an HTTP status (sent to Envoy as an ImmediateResponse)."""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    """The Go EPP's error codes and the HTTP status each maps to."""

    BAD_REQUEST = ("BadRequest", 400)
    NOT_FOUND = ("NotFound", 404)
    RESOURCE_EXHAUSTED = ("ResourceExhausted", 429)  # no endpoint passed the filters, or saturated
    INTERNAL = ("Internal", 500)
    SERVICE_UNAVAILABLE = ("ServiceUnavailable", 503)  # no endpoint is ready

    @property
    def label(self) -> str:
        return self.value[0]

    @property
    def http_status(self) -> int:
        return self.value[1]


class EppError(Exception):
    """A request-level failure with the code the client will see."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def body(self) -> bytes:
        return f"inference error: {self.code.label} - {self.message}".encode()
