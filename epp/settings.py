"""Command-line flags (the Go EPP's names and defaults) and their validation."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from epp.discovery.pool import (
    POOL_VERSIONS,
    V1_GROUP,
    default_namespace,
    parse_ports_flag,
    parse_selector_flag,
)
from epp.discovery.selector import Selector
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


_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_go_bool(text: str) -> bool:
    """A boolean flag's value as Go's strconv.ParseBool reads it (pflag: `--flag=false`)."""
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r} (use true or false)")


_SIZE_UNITS = {
    "": 1,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}


def parse_size(text: str) -> int:
    """A byte size as the Go EPP reads it (a Kubernetes quantity; a trailing B is dropped):
    `4194304`, `25MB`, `10MiB`, `512Ki`."""
    value = text.strip()
    if len(value) > 1 and value[-1] in "Bb":
        value = value[:-1]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKMGT]i?|)", value)
    if not m or m.group(2) not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use e.g. 4194304, 25MB, 10MiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


# What one byte of request body costs in memory while its stream lasts (measured in
# epp.extproc.limits' terms: the chunks joined once, the parsed JSON, the prompt text and its
# UTF-8 form): --request-body-memory-budget counts this many bytes per body byte.
REQUEST_BODY_MEMORY_FACTOR = 5
# The Go EPP raises a --refresh-metrics-interval below this to it, with a warning.
MIN_REFRESH_METRICS_INTERVAL_S = 0.05


def _port(text: str) -> int:
    try:
        return port_number(text, allow_zero=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass(frozen=True)
class LogSettings:
    """Logging, from the Go EPP's zap flags (and epp's --log-level)."""

    level: str = "info"  # debug, info, warning, error
    encoder: str = "console"  # console (text) or json (zap's field names)
    development: bool = False
    stacktrace_level: str = "error"
    time_encoding: str = "epoch"  # as the Go EPP writes `ts`: seconds since the epoch


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
    endpoint_selector: Selector | None = None  # selector discovery (no CRD) when set
    inference_objectives_file: Path | None = None  # epp's own: InferenceObjectives without Kubernetes
    inference_model_rewrites_file: Path | None = None  # epp's own: InferenceModelRewrites without it
    endpoint_target_ports: tuple[int, ...] = ()
    ha_enable_leader_election: bool = False
    ha_lease_duration_s: float = 15.0
    ha_renew_deadline_s: float = 10.0
    ha_retry_period_s: float = 2.0
    # --- serving ---------------------------------------------------------------------------------
    drain_timeout_s: float = 30.0  # after SIGTERM: not-serving, in-flight streams finish
    grpc_max_recv_msg_size: int | None = None  # bytes; None: epp's default
    grpc_max_send_msg_size: int | None = None
    enable_cert_reload: bool = False
    tls_min_version: str = "1.2"
    tls_cipher_suites: tuple[str, ...] = ()
    health_checking: bool = False
    # --- routing ---------------------------------------------------------------------------------
    disable_endpoint_subset_filter: bool = False
    emit_endpoint_scores: bool = False
    emit_served_endpoint_header: bool = False  # epp's own: the report's which-pod header
    # --- model-server metrics --------------------------------------------------------------------
    # Metric-name overrides in the Go flags' spec form (`name` or `name{label="v"}`); None: the
    # engine's own names.
    total_queued_requests_metric: str | None = None
    total_running_requests_metric: str | None = None
    kv_cache_usage_percentage_metric: str | None = None
    lora_info_metric: str | None = None
    cache_info_metric: str | None = None
    model_server_metrics_path: str = "/metrics"
    model_server_metrics_scheme: str = "http"
    model_server_metrics_port: int | None = None  # None: the endpoint's own port
    model_server_metrics_https_insecure_skip_verify: bool = True
    model_server_metrics_only_read_families: bool = True  # epp's own: `name[]` on every poll
    # --- observability ---------------------------------------------------------------------------
    tracing: bool = True
    metrics_endpoint_auth: bool = True
    metrics_client_ca_file: Path | None = None
    metrics_cert_dir: Path | None = None
    enable_grpc_stream_metrics: bool = False
    logging: LogSettings = field(default_factory=LogSettings)
    # Identity, from the environment as the Go EPP reads it (NAMESPACE, POD_NAME).
    namespace_env: str | None = None
    pod_name_env: str | None = None
    # Go flags accepted with no meaning in epp: (flag, why), warned about once at start.
    ignored_flags: tuple[tuple[str, str], ...] = ()
    # Values the Go EPP corrects (as epp does) with a warning, logged once at start.
    start_warnings: tuple[str, ...] = ()
    # Not flags: the Kubernetes API retry backoff (capped, jittered) and how long one watch
    # request lasts before it is renewed. Tests shorten them.
    kube_backoff_initial_s: float = 0.2
    kube_backoff_max_s: float = 10.0
    kube_watch_timeout_s: float = 300.0
    # --- ext_proc request-path limits (epp.extproc.limits; docs/architecture.md "Reliability") -----
    max_request_body_size: int = 64 * 1024 * 1024  # one request's body, else 413
    request_body_memory_budget: int = 320 * 1024 * 1024  # all streams' bodies' memory, else 429
    max_extproc_streams: int = 10_000  # open ext_proc streams, else 429 at once
    # No message for this long while the request arrives ends the stream with a 408; 0: never.
    extproc_stream_idle_timeout_s: float = 300.0
    # Not flags: gRPC keepalive pings on the ext_proc server's connections, which end the streams
    # of a gateway that vanished without closing its connection (a routed stream has no idle
    # timeout). Tests shorten them.
    grpc_keepalive_time_s: float = 60.0
    grpc_keepalive_timeout_s: float = 20.0
    # --- model-server scrapes (epp.datalayer.scraper) ---------------------------------------------
    model_server_metrics_max_bytes: int = 16 * 1024 * 1024  # a larger /metrics page is an error
    idle_refresh_metrics_interval_s: float = 0.0  # an idle endpoint's polls (0: every interval, as Go)
    refresh_metrics_yield_when_busy: bool = True  # polls stretched while the loop is busy (pacing)
    # --- the process ----------------------------------------------------------------------------
    event_loop: str = "uvloop"  # epp.cli: uvloop (libuv) or asyncio's own loop

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


def _bool_flag(group: argparse._ActionsContainer, name: str, default: bool, help: str) -> None:
    """A pflag boolean: `--name` (true), `--name=true|false`; never consumes the next argument."""
    group.add_argument(
        name, type=parse_go_bool, nargs="?", const=True, default=default, metavar="BOOL", help=help
    )


# Go EPP flags epp accepts and does not act on, and why (a one-line warning each at start).
_NO_MEANING = {
    "--enable-pprof": "no pprof in a Python process (use py-spy)",
    "--refresh-prometheus-metrics-interval": "epp's pool gauges refresh every second and on change",
    "--allow-experimental-plugins": "epp has no experimental-only plugins",
    "--health-checking": "epp always serves gRPC health, on the health port and the ext_proc port",
}
# Their value types, as pflag reads them (a boolean never takes the next argument).
_NO_MEANING_DURATIONS = {"--refresh-prometheus-metrics-interval"}


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
    p.add_argument(  # epp's own: the Go EPP polls every endpoint at --refresh-metrics-interval
        "--idle-refresh-metrics-interval",
        type=parse_duration,
        default=0.0,
        help="how often an idle endpoint's /metrics is polled: one reporting nothing waiting or "
        "running, with nothing of epp's in flight; below --metrics-staleness-threshold; 0 (the "
        "default): every --refresh-metrics-interval, as the Go EPP",
    )
    _bool_flag(  # epp's own: the Go EPP polls on every core it has, epp on its one event loop
        p,
        "--refresh-metrics-yield-when-busy",
        True,
        "while epp's event loop is over 75%% busy, poll model servers less often (up to half "
        "--metrics-staleness-threshold) so the requests keep the CPU; false: every interval regardless",
    )
    p.add_argument(  # epp's own: the event loop epp runs on
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="uvloop (the default: libuv's loop, about 10%% less CPU per ext_proc request) or asyncio "
        "(Python's own loop); uvloop falls back to asyncio where it is not installed",
    )
    p.add_argument("--endpoints", help="standalone mode: host:port,host:port,...")
    p.add_argument(
        "--endpoints-file",
        type=Path,
        help="standalone mode: YAML list of {address, port, name, labels}; edits are picked up live",
    )
    p.add_argument(
        "--inference-objectives-file",
        type=Path,
        help="epp's own: InferenceObjective manifests (YAML) giving request priorities without Kubernetes",
    )
    p.add_argument(
        "--inference-model-rewrites-file",
        type=Path,
        help="epp's own: InferenceModelRewrite manifests (YAML) rewriting request models without Kubernetes",
    )
    k8s = p.add_argument_group("Kubernetes discovery")
    k8s.add_argument("--pool-name", help="InferencePool to take endpoints from (Kubernetes mode)")
    k8s.add_argument(
        "--pool-namespace",
        help="namespace of the pool and its pods (default: $NAMESPACE, epp's own namespace, else 'default')",
    )
    k8s.add_argument(
        "--pool-group",
        default=V1_GROUP,
        help=f"InferencePool API group: {V1_GROUP} (v1, default) or inference.networking.x-k8s.io (v1alpha2)",
    )
    k8s.add_argument(
        "--endpoint-selector",
        help="without the InferencePool CRD: pods matching this Kubernetes label selector are the "
        "endpoints (k=v, k!=v, 'k in (a,b)', 'k notin (a,b)', k, !k; comma = and)",
    )
    k8s.add_argument(
        "--endpoint-target-ports", help="with --endpoint-selector: the pods' serving ports, e.g. 8000,8001"
    )
    k8s.add_argument(
        "--kubeconfig",
        type=Path,
        help="kubeconfig for running outside the cluster (default: $KUBECONFIG, in-cluster, ~/.kube/config)",
    )
    _bool_flag(
        k8s,
        "--ha-enable-leader-election",
        False,
        "active-passive HA: only the holder of a coordination.k8s.io Lease reports ready",
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
    srv = p.add_argument_group("Serving")
    _bool_flag(
        srv,
        "--secure-serving",
        True,
        "serve ext_proc over TLS (default true; self-signed without --cert-path)",
    )
    srv.add_argument("--cert-path", type=Path, help="directory holding tls.crt and tls.key")
    _bool_flag(srv, "--enable-cert-reload", False, "reload --cert-path's certificate when it changes")
    srv.add_argument(  # Go's spelling too; what gRPC can enforce is checked in epp.tls
        "--tls-min-version",
        default="1.2",
        choices=["1.0", "1.1", "1.2", "1.3", *(f"VersionTLS1{n}" for n in range(4))],
        help="TLS minimum version",
    )
    srv.add_argument(
        "--tls-cipher-suites", default="", help="comma-separated TLS 1.2 cipher suites (Go names)"
    )
    srv.add_argument(
        "--drain-timeout",
        type=parse_duration,
        default=30.0,
        help="on SIGTERM: report not serving, take no new streams, let in-flight ones finish (default 30s)",
    )
    srv.add_argument(
        "--grpc-max-recv-msg-size", type=parse_size, help="largest gRPC message received (e.g. 10MiB)"
    )
    srv.add_argument(
        "--grpc-max-send-msg-size", type=parse_size, help="largest gRPC message sent (e.g. 10MiB)"
    )
    route = p.add_argument_group("Routing")
    _bool_flag(route, "--disable-endpoint-subset-filter", False, "ignore Envoy's endpoint subset hint")
    _bool_flag(
        route, "--emit-endpoint-scores", False, "return each candidate's scores in the envoy.lb metadata"
    )
    _bool_flag(
        route,
        "--emit-served-endpoint-header",
        False,
        "name the endpoint that served in the response header x-gateway-destination-endpoint-served "
        "(epp's own; for `epp_bench report`)",
    )
    msm = p.add_argument_group("Model-server metrics")
    for flag, what in (
        ("--total-queued-requests-metric", "queued requests (default vllm:num_requests_waiting)"),
        ("--total-running-requests-metric", "running requests (default vllm:num_requests_running)"),
        ("--kv-cache-usage-percentage-metric", "KV-cache usage 0..1 (default vllm:kv_cache_usage_perc)"),
        ("--lora-info-metric", "LoRA info (default vllm:lora_requests_info)"),
        ("--cache-info-metric", "cache config info (default vllm:cache_config_info)"),
    ):
        msm.add_argument(flag, help=f'metric for {what}; name or name{{label="value"}}')
    msm.add_argument(
        "--model-server-metrics-path", default="/metrics", help="path of /metrics (default /metrics)"
    )
    msm.add_argument("--model-server-metrics-scheme", default="http", choices=["http", "https"])
    msm.add_argument(
        "--model-server-metrics-port", type=_port, help="port of /metrics (default: the endpoint's)"
    )
    _bool_flag(
        msm,
        "--model-server-metrics-https-insecure-skip-verify",
        True,
        "with https: do not verify the model server's certificate (default true)",
    )
    _bool_flag(  # epp's own: the Go EPP reads the whole page
        msm,
        "--model-server-metrics-only-read-families",
        True,
        "ask each model server for only the families epp reads (Prometheus' name[] query, which a "
        "prometheus-client server on its default registry, as vLLM's, honours), checked against the "
        "whole page every 5 minutes; false: the whole page every poll, as the Go EPP",
    )
    obs = p.add_argument_group("Observability")
    _bool_flag(
        obs, "--tracing", True, "OpenTelemetry traces, configured by the OTEL_* environment (default true)"
    )
    _bool_flag(
        obs,
        "--metrics-endpoint-auth",
        True,
        "/metrics needs a bearer token the Kubernetes API authorizes (default true; off outside Kubernetes)",
    )
    obs.add_argument(
        "--metrics-client-ca-file", type=Path, help="PEM CA: /metrics requires verified client certs"
    )
    obs.add_argument("--metrics-cert-dir", type=Path, help="tls.crt and tls.key: serve /metrics over TLS")
    _bool_flag(
        obs, "--enable-grpc-stream-metrics", False, "ext_proc stream metrics (in flight, duration, codes)"
    )
    obs.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    obs.add_argument("--v", type=int, default=None, help="Go-style verbosity; 4 or more means debug")
    obs.add_argument("--zap-encoder", choices=["json", "console"], default="console", help="log format")
    obs.add_argument("--zap-log-level", help="debug, info, error, or a verbosity number (>= 4: debug)")
    _bool_flag(obs, "--zap-devel", False, "zap development mode: console logs at debug level")
    obs.add_argument("--zap-stacktrace-level", default="error", choices=["info", "error", "panic"])
    obs.add_argument(
        "--zap-time-encoding",
        default="epoch",
        choices=["epoch", "millis", "nano", "iso8601", "rfc3339", "rfc3339nano"],
    )
    for flag, why in _NO_MEANING.items():
        if flag in _NO_MEANING_DURATIONS:
            p.add_argument(flag, type=parse_duration, default=None, help=f"accepted, no effect: {why}")
        else:  # a pflag boolean; None = not given
            p.add_argument(
                flag,
                type=parse_go_bool,
                nargs="?",
                const=True,
                default=None,
                metavar="BOOL",
                help=f"accepted, no effect: {why}",
            )
    _bool_flag(  # a boolean as every other: --check-config, --check-config=true|false
        p,
        "--check-config",
        False,
        "validate the config and exit 0 (valid) or 1 (invalid) without serving",
    )
    lim = p.add_argument_group("Request-path limits")
    lim.add_argument(
        "--max-request-body-size",
        type=parse_size,
        default=64 * 1024 * 1024,
        help="largest request body epp buffers; a larger one is refused with a 413 (default 64MiB)",
    )
    lim.add_argument(
        "--request-body-memory-budget",
        type=parse_size,
        default=320 * 1024 * 1024,
        help=f"memory all streams' request bodies may take together ({REQUEST_BODY_MEMORY_FACTOR} "
        "bytes a body byte while it arrives, 14 while a body of non-ASCII text is parsed, then what "
        "the parsed request holds until its response ends); a body that does not fit "
        "now is refused with a 429, one larger than the budget alone with a 413 (default 320MiB)",
    )
    lim.add_argument(
        "--max-extproc-streams",
        type=int,
        default=10_000,
        help="ext_proc streams open at once; one more is answered with a 429 (default 10000)",
    )
    lim.add_argument(
        "--extproc-stream-idle-timeout",
        type=parse_duration,
        default=300.0,
        help="an ext_proc stream whose request stops arriving for this long gets a 408 and is freed "
        "(a routed stream waits for its response as long as the gateway does); 0: never (default 5m)",
    )
    p.add_argument(
        "--model-server-metrics-max-bytes",
        type=parse_size,
        default=16 * 1024 * 1024,
        help="largest model-server /metrics page read; a larger one is a failed poll, and that server "
        "is polled less often until its page fits (default 16MiB)",
    )
    return p


def _bool_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {
        opt
        for a in parser._actions
        if a.type is parse_go_bool
        for opt in a.option_strings
        if opt.startswith("--")
    }


def _normalise_go_flags(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """pflag syntax: Go's single-dash form (-grpc-port=9002) too, and a bare boolean flag never
    takes the next argument as its value (`--tracing false` is not `--tracing=false` in Go)."""
    longs = {opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")}
    booleans = _bool_flags(parser)
    out = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--") and f"-{arg.split('=', 1)[0]}" in longs:
            arg = "-" + arg
        if arg in booleans:
            arg += "=true"
        out.append(arg)
    return out


def _log_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> LogSettings:
    level = args.log_level
    if args.v is not None and args.v >= 4:
        level = "debug"
    zap_level = args.zap_log_level
    if zap_level is not None:
        if zap_level.isdigit():
            level = "debug" if int(zap_level) >= 4 else "info"
        elif zap_level in ("debug", "info", "error"):
            level = zap_level
        elif zap_level in ("panic", "dpanic", "fatal"):
            level = "error"
        else:
            parser.error(f"--zap-log-level {zap_level!r}: use debug, info, error or a number")
    if args.zap_devel and zap_level is None and args.v is None:
        level = "debug"
    return LogSettings(
        level=level,
        encoder=args.zap_encoder,
        development=args.zap_devel,
        stacktrace_level=args.zap_stacktrace_level,
        time_encoding=args.zap_time_encoding,
    )


def parse_settings(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(_normalise_go_flags(list(sys.argv[1:] if argv is None else argv), parser))
    start_warnings: list[str] = []
    if args.refresh_metrics_interval < MIN_REFRESH_METRICS_INTERVAL_S:  # as the Go EPP clamps it
        start_warnings.append(
            f"--refresh-metrics-interval {args.refresh_metrics_interval * 1000:g}ms is below the "
            f"minimum of {MIN_REFRESH_METRICS_INTERVAL_S * 1000:g}ms: "
            f"{MIN_REFRESH_METRICS_INTERVAL_S * 1000:g}ms is used"
        )
        args.refresh_metrics_interval = MIN_REFRESH_METRICS_INTERVAL_S
    if args.metrics_staleness_threshold <= 0:
        parser.error("--metrics-staleness-threshold must be positive")
    if not 0 <= args.idle_refresh_metrics_interval < args.metrics_staleness_threshold:
        parser.error(
            "--idle-refresh-metrics-interval must be 0 (off) or positive and below "
            "--metrics-staleness-threshold (an idle endpoint must never go stale)"
        )
    selector: Selector | None = None
    target_ports: tuple[int, ...] = ()
    try:
        if args.endpoint_selector:  # as in Go, an empty value is no selector
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
    if args.metrics_client_ca_file is not None and args.metrics_cert_dir is None:
        parser.error('"metrics-client-ca-file" requires "metrics-cert-dir"')
    ciphers = tuple(c.strip() for c in args.tls_cipher_suites.split(",") if c.strip())
    if args.max_request_body_size <= 0:
        parser.error("--max-request-body-size must be positive")
    if args.request_body_memory_budget < REQUEST_BODY_MEMORY_FACTOR * args.max_request_body_size:
        parser.error(
            "--request-body-memory-budget must hold one body of --max-request-body-size: at least "
            f"{REQUEST_BODY_MEMORY_FACTOR} x --max-request-body-size (a body byte costs "
            f"{REQUEST_BODY_MEMORY_FACTOR} bytes of memory)"
        )
    if args.max_extproc_streams <= 0:
        parser.error("--max-extproc-streams must be positive")
    if args.model_server_metrics_max_bytes <= 0:
        parser.error("--model-server-metrics-max-bytes must be positive")
    ignored = tuple(
        (flag, why)
        for flag, why in _NO_MEANING.items()
        if getattr(args, flag[2:].replace("-", "_")) is not None
    )
    return Settings(
        grpc_port=args.grpc_port,
        grpc_health_port=args.grpc_health_port,
        metrics_port=args.metrics_port,
        bind_address=args.bind_address,
        config_file=args.config_file,
        config_text=args.config_text,
        refresh_metrics_interval_s=args.refresh_metrics_interval,
        metrics_staleness_threshold_s=args.metrics_staleness_threshold,
        idle_refresh_metrics_interval_s=args.idle_refresh_metrics_interval,
        refresh_metrics_yield_when_busy=args.refresh_metrics_yield_when_busy,
        event_loop=args.event_loop,
        endpoints=args.endpoints,
        endpoints_file=args.endpoints_file,
        inference_objectives_file=args.inference_objectives_file,
        inference_model_rewrites_file=args.inference_model_rewrites_file,
        pool_name=args.pool_name,
        secure_serving=args.secure_serving,
        cert_path=args.cert_path,
        check_config=args.check_config,
        log_level=_log_settings(args, parser).level,
        pool_namespace=args.pool_namespace or env.get("NAMESPACE") or default_namespace(),
        pool_group=args.pool_group,
        kubeconfig=args.kubeconfig,
        endpoint_selector=selector,
        endpoint_target_ports=target_ports,
        ha_enable_leader_election=args.ha_enable_leader_election,
        ha_lease_duration_s=args.ha_lease_duration,
        ha_renew_deadline_s=args.ha_renew_deadline,
        ha_retry_period_s=args.ha_retry_period,
        drain_timeout_s=args.drain_timeout,
        grpc_max_recv_msg_size=args.grpc_max_recv_msg_size,
        grpc_max_send_msg_size=args.grpc_max_send_msg_size,
        enable_cert_reload=args.enable_cert_reload,
        tls_min_version=args.tls_min_version,
        tls_cipher_suites=ciphers,
        health_checking=bool(args.health_checking),
        disable_endpoint_subset_filter=args.disable_endpoint_subset_filter,
        emit_endpoint_scores=args.emit_endpoint_scores,
        emit_served_endpoint_header=args.emit_served_endpoint_header,
        total_queued_requests_metric=args.total_queued_requests_metric,
        total_running_requests_metric=args.total_running_requests_metric,
        kv_cache_usage_percentage_metric=args.kv_cache_usage_percentage_metric,
        lora_info_metric=args.lora_info_metric,
        cache_info_metric=args.cache_info_metric,
        model_server_metrics_path=args.model_server_metrics_path,
        model_server_metrics_scheme=args.model_server_metrics_scheme,
        model_server_metrics_port=args.model_server_metrics_port,
        model_server_metrics_https_insecure_skip_verify=args.model_server_metrics_https_insecure_skip_verify,
        model_server_metrics_only_read_families=args.model_server_metrics_only_read_families,
        tracing=args.tracing,
        metrics_endpoint_auth=args.metrics_endpoint_auth,
        metrics_client_ca_file=args.metrics_client_ca_file,
        metrics_cert_dir=args.metrics_cert_dir,
        enable_grpc_stream_metrics=args.enable_grpc_stream_metrics,
        logging=_log_settings(args, parser),
        namespace_env=env.get("NAMESPACE") or None,
        pod_name_env=env.get("POD_NAME") or None,
        ignored_flags=ignored,
        start_warnings=tuple(start_warnings),
        max_request_body_size=args.max_request_body_size,
        request_body_memory_budget=args.request_body_memory_budget,
        max_extproc_streams=args.max_extproc_streams,
        extproc_stream_idle_timeout_s=args.extproc_stream_idle_timeout,
        model_server_metrics_max_bytes=args.model_server_metrics_max_bytes,
    )
