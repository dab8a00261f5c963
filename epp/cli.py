"""`epp` command: parse flags, validate config and endpoints up front, then serve."""

from __future__ import annotations

import asyncio
import logging
import sys

from epp.errors import EndpointSpecError
from epp.framework import ConfigError
from epp.settings import parse_settings


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from epp.app import App, load_scheduler_config, serve

    if settings.check_config:
        logging.getLogger("epp.scheduling.loader").setLevel(logging.ERROR)  # warnings are printed below, once
        try:
            loaded = load_scheduler_config(settings)
        except ConfigError as exc:
            print(f"epp: invalid config: {exc}", file=sys.stderr)
            return 1
        for warning in loaded.warnings:
            print(f"epp: warning: {warning}", file=sys.stderr)
        print("config is valid")
        return 0
    try:
        app = App(settings)
        app.discovery.load_initial()  # fail fast, with the reason, before binding ports
    except (ConfigError, EndpointSpecError) as exc:
        print(f"epp: error: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(serve(app))
    except OSError as exc:
        print(f"epp: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
