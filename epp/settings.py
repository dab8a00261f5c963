"""Command-line flags (the Go EPP's names and defaults) and their validation."""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from epp.discovery.pool import (
    POOL_VERSIONS,
    V1_GROUP,
    default_namespace,
    parse_ports_flag,
    parse_selector_flag,
)
from epp.errors import PoolSpecError
from epp.ports import port_number

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
        return port_number(text, allow_zero=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    pool_name: str | None  # InferencePool discovery when set
    secure_serving: bool
    cert_path: Path | None
    check_config: bool
    log_level: str
    pool_namespace: str = "default"
    pool_group: str = V1_GROUP
    kubeconfig: Path | None = None
    endpoint_selector: dict[str, str] | None = None  # selector discovery (no CRD) when set
    endpoint_target_ports: tuple[int, ...] = ()
    ha_enable_leader_election: bool = False
    ha_lease_duration_s: float = 15.0
    ha_renew_deadline_s: float = 10.0
    ha_retry_period_s: float = 2.0
    # Not flags: the Kubernetes API retry backoff (capped, jittered) and how long one watch
    # request lasts before it is renewed. Tests shorten them.
    kube_backoff_initial_s: float = 0.2
    kube_backoff_max_s: float = 10.0
    kube_watch_timeout_s: float = 300.0

    @property
    def uses_kubernetes(self) -> bool:
        return self.pool_name is not None or self.endpoint_selector is not None

    @property
    def metrics_pool_name(self) -> str:
        """The `name` label of the pool metrics."""
        return self.pool_name or "standalone"


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
    k8s = p.add_argument_group("Kubernetes discovery")
    k8s.add_argument("--pool-name", help="InferencePool to take endpoints from (Kubernetes mode)")
    k8s.add_argument(
        "--pool-namespace",
        help="namespace of the pool and its pods (default: epp's own namespace, else 'default')",
    )
    k8s.add_argument(
        "--pool-group",
        default=V1_GROUP,
        help=f"InferencePool API group: {V1_GROUP} (v1, default) or inference.networking.x-k8s.io (v1alpha2)",
    )
    k8s.add_argument(
        "--endpoint-selector",
        help="without the InferencePool CRD: pods labelled k=v,... are the endpoints",
    )
    k8s.add_argument(
        "--endpoint-target-ports", help="with --endpoint-selector: the pods' serving ports, e.g. 8000,8001"
    )
    k8s.add_argument(
        "--kubeconfig",
        type=Path,
        help="kubeconfig for running outside the cluster (default: $KUBECONFIG, in-cluster, ~/.kube/config)",
    )
    k8s.add_argument(
        "--ha-enable-leader-election",
        action="store_true",
        help="active-passive HA: only the holder of a coordination.k8s.io Lease reports ready",
    )
    k8s.add_argument(
        "--ha-lease-duration",
        type=parse_duration,
        default=15.0,
        help="how long a leader's lease lasts without renewal (default 15s)",
    )
    k8s.add_argument(
        "--ha-renew-deadline",
        type=parse_duration,
        default=10.0,
        help="a leader that cannot renew for this long steps down (default 10s)",
    )
    k8s.add_argument(
        "--ha-retry-period",
        type=parse_duration,
        default=2.0,
        help="lease renew/acquire interval (default 2s)",
    )
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
    selector: dict[str, str] | None = None
    target_ports: tuple[int, ...] = ()
    try:
        if args.endpoint_selector is not None:
            selector = parse_selector_flag(args.endpoint_selector)
            if args.endpoint_target_ports is None:
                parser.error("--endpoint-selector needs --endpoint-target-ports")
            target_ports = parse_ports_flag(args.endpoint_target_ports)
        elif args.endpoint_target_ports is not None:
            parser.error("--endpoint-target-ports goes with --endpoint-selector")
    except PoolSpecError as exc:
        parser.error(str(exc))
    if args.pool_name is not None and not args.pool_name:
        parser.error("--pool-name must not be empty")
    if args.pool_group not in POOL_VERSIONS:
        parser.error(f"--pool-group {args.pool_group!r}: use one of {', '.join(POOL_VERSIONS)}")
    modes = [bool(args.endpoints or args.endpoints_file), args.pool_name is not None, selector is not None]
    if sum(modes) > 1:
        parser.error(
            "give one discovery mode: --endpoints/--endpoints-file, --pool-name, "
            "or --endpoint-selector with --endpoint-target-ports"
        )
    if not args.check_config and not any(modes):
        parser.error(
            "no endpoints: give --pool-name NAME (InferencePool), --endpoint-selector k=v with "
            "--endpoint-target-ports, or --endpoints host:port,... / --endpoints-file PATH"
        )
    if args.ha_enable_leader_election and not (args.pool_name or selector):
        parser.error(
            "--ha-enable-leader-election needs Kubernetes discovery (--pool-name or --endpoint-selector)"
        )
    if not 0 < args.ha_retry_period < args.ha_renew_deadline < args.ha_lease_duration:
        parser.error(
            "leader election needs 0 < --ha-retry-period < --ha-renew-deadline < --ha-lease-duration"
        )
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
        pool_namespace=args.pool_namespace or default_namespace(),
        pool_group=args.pool_group,
        kubeconfig=args.kubeconfig,
        endpoint_selector=selector,
        endpoint_target_ports=target_ports,
        ha_enable_leader_election=args.ha_enable_leader_election,
        ha_lease_duration_s=args.ha_lease_duration,
        ha_renew_deadline_s=args.ha_renew_deadline,
        ha_retry_period_s=args.ha_retry_period,
    )
