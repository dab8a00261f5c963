"""Logging as the Go EPP does it: zap (through controller-runtime) on stderr, set by the `--zap-*`
flags (`Settings.logging`).

- `--zap-encoder json`: every line is one JSON object with zap's production field names, in zap's
  order: `level`, `ts`, `logger`, `caller`, `msg`, then the record's own fields (`extra=` of the
  logging call), then `error` (the exception's text, as logr's `Error(err, msg)` writes it) and
  `stacktrace` for records at or above `--zap-stacktrace-level`. Levels are zap's names (`debug`,
  `info`, `warn`, `error`, `fatal` for Python's CRITICAL); `caller` is `dir/file.py:line`.
- `ts` follows `--zap-time-encoding`: `epoch` (seconds, a number), `millis`, `nano`, `iso8601`
  (`2006-01-02T15:04:05.000Z0700`), `rfc3339` (`2006-01-02T15:04:05Z07:00`), `rfc3339nano`;
  local time, `Z` for UTC as Go writes it.
- `--zap-encoder console` (the default): human-readable text lines, the record's fields appended
  as JSON, tracebacks as Python prints them.

Python's `warnings` and uncaught exceptions go through the same handler, so in JSON mode stderr
holds nothing but JSON lines.
"""

from __future__ import annotations

import datetime
import logging
import sys
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import orjson

# Rate-limited logging lives in the plugin API (plugins log through it too).
from epp.framework.logs import LogLimiter as LogLimiter


class LogConfig(Protocol):
    """What `configure` reads (`epp.settings.LogSettings` has these)."""

    @property
    def level(self) -> str: ...
    @property
    def encoder(self) -> str: ...
    @property
    def development(self) -> bool: ...
    @property
    def stacktrace_level(self) -> str: ...
    @property
    def time_encoding(self) -> str: ...


LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# zap's stacktrace levels: info, error, panic (Python has nothing between ERROR and CRITICAL).
STACKTRACE_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
TIME_ENCODINGS = ("epoch", "millis", "nano", "iso8601", "rfc3339", "rfc3339nano")
CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; the others came from `extra=` and are the record's fields.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_ZAP_KEYS = ("level", "ts", "logger", "caller", "msg", "stacktrace")
_LOGGING_DIR = str(Path(logging.__file__).parent)


def zap_level(levelno: int) -> str:
    if levelno >= logging.CRITICAL:
        return "fatal"
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warn"
    if levelno >= logging.INFO:
        return "info"
    return "debug"


def _go_zone(moment: datetime.datetime, colon: bool) -> str:
    """Go's `Z07:00` (colon) or `Z0700`: `Z` at UTC, else the signed offset."""
    offset = moment.utcoffset() or datetime.timedelta(0)
    if not offset:
        return "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    hours, mins = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{mins:02d}" if colon else f"{sign}{hours:02d}{mins:02d}"


def encode_time(created: float, encoding: str) -> float | int | str:
    """`created` (seconds since the epoch) in one of zap's time encodings."""
    if encoding == "epoch":
        return created
    if encoding == "millis":
        return created * 1e3
    if encoding == "nano":
        return int(created * 1e9)
    moment = datetime.datetime.fromtimestamp(created).astimezone()
    base = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if encoding == "iso8601":
        return f"{base}.{moment.microsecond // 1000:03d}{_go_zone(moment, colon=False)}"
    if encoding == "rfc3339nano":
        frac = f"{moment.microsecond:06d}".rstrip("0")
        return f"{base}{'.' + frac if frac else ''}{_go_zone(moment, colon=True)}"
    return f"{base}{_go_zone(moment, colon=True)}"  # rfc3339


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a logging call added with `extra=`."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}


def _jsonable(value: Any) -> Any:
    return str(value)


def _call_stack() -> str:
    """The stack of the logging call, without the logging machinery's frames (innermost last)."""
    frames = traceback.extract_stack()
    while frames and (frames[-1].filename.startswith(_LOGGING_DIR) or frames[-1].filename == __file__):
        frames.pop()
    return "".join(traceback.format_list(frames)).rstrip("\n")


class ZapJsonFormatter(logging.Formatter):
    """One JSON object a line, in zap's production encoder's field names and order."""

    def __init__(self, time_encoding: str = "epoch", stacktrace_level: int = logging.ERROR) -> None:
        super().__init__()
        if time_encoding not in TIME_ENCODINGS:
            raise ValueError(f"time encoding {time_encoding!r}: use one of {', '.join(TIME_ENCODINGS)}")
        self.time_encoding = time_encoding
        self.stacktrace_level = stacktrace_level

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "level": zap_level(record.levelno),
            "ts": encode_time(record.created, self.time_encoding),
            "logger": record.name,
            "caller": f"{Path(record.pathname).parent.name}/{Path(record.pathname).name}:{record.lineno}",
            "msg": record.getMessage(),
        }
        for key, value in record_fields(record).items():
            entry[f"field.{key}" if key in _ZAP_KEYS else key] = value
        exc = record.exc_info
        if exc and exc[1] is not None and "error" not in entry:
            entry["error"] = str(exc[1]) or type(exc[1]).__name__
        if record.levelno >= self.stacktrace_level:
            if exc and exc[1] is not None:
                entry["stacktrace"] = "".join(traceback.format_exception(*exc)).rstrip("\n")
            elif record.stack_info:
                entry["stacktrace"] = record.stack_info
            else:
                entry["stacktrace"] = _call_stack()
        elif record.stack_info:
            entry["stacktrace"] = record.stack_info
        return orjson.dumps(entry, default=_jsonable, option=orjson.OPT_NON_STR_KEYS).decode()


class ConsoleFormatter(logging.Formatter):
    """Human-readable lines; the record's fields appended as JSON."""

    def __init__(self) -> None:
        super().__init__(CONSOLE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = record_fields(record)
        if not fields:
            return text
        head, sep, tail = text.partition("\n")  # fields go on the message line, before a traceback
        extra = orjson.dumps(fields, default=_jsonable, option=orjson.OPT_NON_STR_KEYS).decode()
        return f"{head} {extra}{sep}{tail}"


def formatter_for(config: LogConfig) -> logging.Formatter:
    if config.encoder == "json":
        return ZapJsonFormatter(
            config.time_encoding, STACKTRACE_LEVELS.get(config.stacktrace_level, logging.CRITICAL)
        )
    if config.encoder == "console":
        return ConsoleFormatter()
    raise ValueError(f"log encoder {config.encoder!r}: use json or console")


def configure(config: LogConfig, stream: Any = None) -> logging.Handler:
    """Send every log record (and Python warnings, and uncaught exceptions) to stderr, formatted
    as `config` says. Replaces handlers configured before; returns the handler."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter_for(config))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS.get(config.level, logging.INFO))
    logging.captureWarnings(True)
    if config.encoder == "json":
        sys.excepthook = _log_uncaught
    return handler


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("epp").critical("uncaught exception", exc_info=(kind, exc, tb))


def warn_ignored_flags(ignored: tuple[tuple[str, str], ...], log: logging.Logger | None = None) -> None:
    """One warning per Go flag that epp accepts and ignores."""
    log = log or logging.getLogger("epp")
    for flag, why in ignored:
        log.warning("flag %s is accepted for the Go EPP and has no effect: %s", flag, why, stacklevel=2)
