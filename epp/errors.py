"""Every error type epp raises, in one place. A leaf module: it imports nothing from epp.

- `EppError` ends one request with an HTTP status (an ext_proc ImmediateResponse).
- `ConfigError` is a configuration that cannot be used (plugins raise it from `from_params`).
- The `*SpecError` types are unusable startup input (flags, endpoint files, pool specs); the
  `epp` command reports them in one line and exits 1.
- `KubeApiError` is a non-2xx answer from the Kubernetes API server.
- `MetricsParseError` is a model server's /metrics page that cannot be read.
"""

from __future__ import annotations

import enum
import reprlib
from typing import Any

import orjson


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


# The response header naming why a request was dropped before reaching a model server, and its
# values (the Go EPP's `x-llm-d-request-dropped-reason`).
DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"
DROPPED_NO_ENDPOINTS = "rejected-no-endpoints"
DROPPED_SHUTTING_DOWN = "rejected-shutting-down"
DROPPED_SATURATED = "rejected-saturated"


class EppError(Exception):
    """A request-level failure with the code the client will see, and, for a request dropped
    before dispatch, the reason (sent in `x-llm-d-request-dropped-reason`)."""

    def __init__(self, code: ErrorCode, message: str, dropped_reason: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.dropped_reason = dropped_reason

    @property
    def body(self) -> bytes:
        return f"inference error: {self.code.label} - {self.message}".encode()


class ConfigError(ValueError):
    """A configuration (EndpointPickerConfig, a plugin's parameters) is wrong. The message names
    what and why."""


class EndpointSpecError(ValueError):
    """An endpoint list (--endpoints, --endpoints-file) or client configuration that cannot be used."""


class KubeConfigError(EndpointSpecError):
    """No usable Kubernetes client configuration. An EndpointSpecError so that the `epp` command
    reports it in one line and exits 1, like any other unusable endpoint source."""


class PoolSpecError(ValueError):
    """A pool spec or a selector/ports flag that cannot be used. The message says why."""


class MetricsParseError(ValueError):
    """A model server's /metrics page that cannot be parsed."""


class KubeApiError(Exception):
    """A non-2xx answer (or an ERROR watch event) from the API server, with its Status fields."""

    def __init__(self, status: int, reason: str = "", message: str = "") -> None:
        super().__init__(f"HTTP {status} {reason}: {message}".rstrip(": "))
        self.status = status
        self.reason = reason
        self.message = message

    @classmethod
    def from_status(cls, status: int, body: Any) -> KubeApiError:
        """From a `metav1.Status` object (dict) or raw response bytes."""
        if isinstance(body, bytes | str):
            try:
                body = orjson.loads(body)
            except orjson.JSONDecodeError:
                return cls(status, "", str(body[:200]))
        if isinstance(body, dict):
            return cls(
                int(body.get("code") or status), str(body.get("reason", "")), str(body.get("message", ""))
            )
        return cls(status)


_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 80
_BRIEF.maxlevel = 3


def brief(value: object, width: int = 80) -> str:
    """`value`'s repr for an error message, at most `width` characters, built without writing the
    whole of it first (a YAML file's aliases can make a few hundred bytes a structure of GBs)."""
    text = _BRIEF.repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
