"""`epp` command: parse flags, validate config and endpoints up front, then serve."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from epp.errors import EndpointSpecError
from epp.framework import ConfigError
from epp.logsetup import configure, warn_ignored_flags
from epp.settings import parse_settings

DEFAULT_GRPC_EXPERIMENTS = "-event_engine_listener"

log = logging.getLogger("epp")


class _Report:
    """What the command tells its user on stderr: `epp: ...` lines, or with `--zap-encoder json`
    log records, so that every stderr line is JSON."""

    def __init__(self, as_log: bool) -> None:
        self.as_log = as_log

    def warning(self, text: str) -> None:
        if self.as_log:
            log.warning(text, stacklevel=2)
        else:
            print(f"epp: warning: {text}", file=sys.stderr)

    def error(self, what: str, exc: BaseException) -> None:
        if self.as_log:
            log.error(what, extra={"error": str(exc)}, stacklevel=2)
        else:
            print(f"epp: {what}: {exc}", file=sys.stderr)


def _event_loop_runner(name: str, report: _Report) -> Callable[[Coroutine[Any, Any, None]], None]:
    """`asyncio.run` or uvloop's: libuv's loop takes about 10 % less CPU per ext_proc request
    (docs/performance.md); grpc.aio, aiohttp and kubernetes-asyncio run on either."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            report.warning("--event-loop=uvloop: uvloop is not installed; running on asyncio's loop")
        else:
            return uvloop.run
    return asyncio.run


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure(settings.logging)
    report = _Report(settings.logging.encoder == "json")
    warn_ignored_flags(settings.ignored_flags)
    for warning in settings.start_warnings:
        logging.getLogger("epp").warning(warning)
    # gRPC's C core logs in its own text format, past Python logging (e.g. an INFO line per failed
    # TLS handshake): keep it to errors unless the operator asks otherwise. Read at grpc's import.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # grpcio's EventEngine server listener cost about 13 % more CPU per ext_proc request than its
    # older iomgr one (docs/performance.md): off unless the operator sets GRPC_EXPERIMENTS (an
    # empty value keeps grpcio's defaults). Read when gRPC's core starts.
    os.environ.setdefault("GRPC_EXPERIMENTS", DEFAULT_GRPC_EXPERIMENTS)
    from epp.tls import export_cipher_suites  # gRPC reads its cipher list once, when first imported:

    export_cipher_suites(settings.tls_cipher_suites, enabled=settings.secure_serving)  # before epp.app
    from epp.app import App, check_startup, load_scheduler_config, serve

    if settings.check_config:
        logging.getLogger("epp.scheduling.loader").setLevel(logging.ERROR)  # warnings are printed below, once
        try:
            loaded = load_scheduler_config(settings)
            startup_warnings = check_startup(settings, loaded)
        except ConfigError as exc:
            report.error("invalid config", exc)
            return 1
        for warning in [*loaded.warnings, *startup_warnings]:
            report.warning(warning)
        print("config is valid")
        return 0
    try:
        app = App(settings)
        app.discovery.load_initial()  # fail fast, with the reason, before binding ports
    except (ConfigError, EndpointSpecError) as exc:
        report.error("error", exc)
        return 1
    try:
        _event_loop_runner(settings.event_loop, report)(serve(app))
    except OSError as exc:
        report.error("error", exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
