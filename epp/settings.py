"""Command-line flags (the Go EPP's names and defaults) and their validation."""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go-style duration ("50ms", "2s", "1.5m", or a bare number of seconds) in seconds."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if value < 0:
            raise argparse.ArgumentTypeError(f"duration must not be negative: {text!r}")
        return value
    total, rest = 0.0, text
    while rest:  # compound durations like "1m30s"
        m = re.match(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", rest)
        if not m:
            raise argparse.ArgumentTypeError(f"invalid duration {text!r} (use e.g. 50ms, 2s, 1m)")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        rest = rest[m.end() :]
    if not text:
        raise argparse.ArgumentTypeError("empty duration")
    return total


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {port}")
    return port


@dataclass(frozen=True)
class Settings:
    grpc_port: int
    grpc_health_port: int
    metrics_port: int
    bind_address: str
    config_file: Path | None
    config_text: str | None
    refresh_metrics_interval_s: float
    metrics_staleness_threshold_s: float
    endpoints: str | None
    endpoints_file: Path | None
    pool_name: str
    secure_serving: bool
    cert_path: Path | None
    check_config: bool
    log_level: str


class _OneLineParser(argparse.ArgumentParser):
    """A bad flag exits 2 with a one-line reason, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"epp: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="epp", description="Endpoint picker for LLM inference (Envoy ext_proc server).")
    p.add_argument("--grpc-port", type=_port, default=9002, help="ext_proc gRPC port (default 9002)")
    p.add_argument("--grpc-health-port", type=_port, default=9003, help="gRPC health port (default 9003)")
    p.add_argument("--metrics-port", type=_port, default=9090, help="Prometheus metrics port (default 9090)")
    p.add_argument(
        "--bind-address", default="0.0.0.0", help="address the servers listen on (default 0.0.0.0)"
    )
    cfg = p.add_mutually_exclusive_group()
    cfg.add_argument("--config-file", type=Path, help="EndpointPickerConfig YAML file")
    cfg.add_argument("--config-text", help="EndpointPickerConfig YAML, inline")
    p.add_argument(
        "--refresh-metrics-interval",
        type=parse_duration,
        default=0.05,
        help="how often each endpoint's /metrics is polled (default 50ms)",
    )
    p.add_argument(
        "--metrics-staleness-threshold",
        type=parse_duration,
        default=2.0,
        help="metrics older than this mark an endpoint stale (default 2s)",
    )
    p.add_argument("--endpoints", help="standalone mode: host:port,host:port,...")
    p.add_argument(
        "--endpoints-file",
        type=Path,
        help="standalone mode: YAML list of {address, port, name, labels}; edits are picked up live",
    )
    p.add_argument("--pool-name", default="standalone", help="pool name used in metric labels")
    p.add_argument(
        "--secure-serving",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="serve ext_proc over TLS (needs --cert-path)",
    )
    p.add_argument("--cert-path", type=Path, help="directory holding tls.crt and tls.key")
    p.add_argument(
        "--check-config",
        action="store_true",
        help="validate the config and exit 0 (valid) or 1 (invalid) without serving",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--v", type=int, default=None, help="Go-style verbosity; 4 or more means debug")
    return p


def _normalise_go_flags(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Accept Go's single-dash form (-grpc-port=9002) too, as Go EPP manifests may use it."""
    longs = {opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")}
    out = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--") and f"-{arg.split('=', 1)[0]}" in longs:
            arg = "-" + arg
        out.append(arg)
    return out


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = build_parser()
    args = parser.parse_args(_normalise_go_flags(list(sys.argv[1:] if argv is None else argv), parser))
    if args.refresh_metrics_interval <= 0:
        parser.error("--refresh-metrics-interval must be positive")
    if args.metrics_staleness_threshold <= 0:
        parser.error("--metrics-staleness-threshold must be positive")
    if not args.check_config and not args.endpoints and not args.endpoints_file:
        parser.error("no endpoints: give --endpoints host:port,... or --endpoints-file PATH")
    if args.secure_serving and args.cert_path is None:
        parser.error("--secure-serving needs --cert-path (a directory with tls.crt and tls.key)")
    log_level = "debug" if args.v is not None and args.v >= 4 else args.log_level
    return Settings(
        grpc_port=args.grpc_port,
        grpc_health_port=args.grpc_health_port,
        metrics_port=args.metrics_port,
        bind_address=args.bind_address,
        config_file=args.config_file,
        config_text=args.config_text,
        refresh_metrics_interval_s=args.refresh_metrics_interval,
        metrics_staleness_threshold_s=args.metrics_staleness_threshold,
        endpoints=args.endpoints,
        endpoints_file=args.endpoints_file,
        pool_name=args.pool_name,
        secure_serving=args.secure_serving,
        cert_path=args.cert_path,
        check_config=args.check_config,
        log_level=log_level,
    )
