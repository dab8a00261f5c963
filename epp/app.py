"""The composition root: builds every component from Settings and runs the servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from grpc_health.v1 import health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from epp.datalayer.datastore import Datastore
from epp.datalayer.scraper import ScrapeConfig, Scraper
from epp.discovery.static import StaticDiscovery, parse_endpoints_flag
from epp.extproc.handler import ExtProcService
from epp.framework import ConfigError, InFlightLedger, PluginHandle
from epp.framework.registry import installed_registry
from epp.health import Health
from epp.observability import EppMetrics
from epp.requestcontrol.director import Director
from epp.scheduling.loader import DEFAULT_CONFIG, LoadedConfig, load_config
from epp.settings import Settings

if TYPE_CHECKING:
    from epp.discovery.kubernetes import KubernetesDiscovery
    from epp.discovery.leader import LeaderElector

log = logging.getLogger(__name__)

_GRPC_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a port already taken must fail loudly, not be shared
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
]


def load_scheduler_config(
    settings: Settings, metrics: EppMetrics | None = None, ledger: InFlightLedger | None = None
) -> LoadedConfig:
    """Raises epp.framework.ConfigError (a ValueError) with a message naming the problem. Plugins
    register their metrics in `metrics`' registry and charge tokens to `ledger`."""
    if settings.config_file is not None:
        try:
            text, source = settings.config_file.read_text(), str(settings.config_file)
        except OSError as exc:
            raise ConfigError(f"{settings.config_file}: cannot read: {exc.strerror or exc}") from None
    elif settings.config_text is not None:
        text, source = settings.config_text, "--config-text"
    else:
        text, source = DEFAULT_CONFIG, "default config"
    handle = PluginHandle(metrics.registry if metrics else None, ledger)
    timer = metrics.observe_plugin if metrics else None
    return load_config(text, installed_registry(), source, timer=timer, handle=handle)


@dataclass
class BoundPorts:
    grpc: int
    health: int
    metrics: int


class App:
    """Owns every component. Build with `App(settings)`, then `await app.start()` / `stop()`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = EppMetrics()
        self.ledger = InFlightLedger()
        self.config = load_scheduler_config(settings, self.metrics, self.ledger)
        self.datastore = Datastore()
        self.director = Director(
            self.datastore,
            self.config.scheduler,
            self.metrics,
            self.ledger,
            staleness_threshold_s=settings.metrics_staleness_threshold_s,
            pool_name=settings.metrics_pool_name,
            use_subset_hint=not settings.disable_endpoint_subset_filter,
            emit_scores=settings.emit_endpoint_scores,
        )
        self.scraper = Scraper(
            self.datastore,
            settings.refresh_metrics_interval_s,
            self._scrape_config(),
            on_error=lambda ep: self.metrics.scrape_errors.labels(ep.key).inc(),
        )
        # Pods come and go (a restart is a new IP): drop a departed endpoint's series.
        self.datastore.subscribe(lambda ep: None, self.metrics.forget_endpoint)
        # Set whenever readiness may have changed, so health follows without waiting a tick.
        self._status_changed = asyncio.Event()
        self.discovery: StaticDiscovery | KubernetesDiscovery
        self.kubernetes: KubernetesDiscovery | None = None
        self.leader: LeaderElector | None = None
        if settings.uses_kubernetes:
            self.kubernetes, self.leader = self._build_kubernetes()
            self.discovery = self.kubernetes
        else:
            fixed = parse_endpoints_flag(settings.endpoints) if settings.endpoints else []
            self.discovery = StaticDiscovery(self.datastore, fixed, settings.endpoints_file)
        self.health = Health()
        self._servers: list[grpc.aio.Server] = []
        self._metrics_http: web.AppRunner | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self.ports: BoundPorts | None = None

    def _scrape_config(self) -> ScrapeConfig:
        """Where each model server's metrics are read: the --model-server-metrics-* flags."""
        s = self.settings
        return ScrapeConfig(
            path=s.model_server_metrics_path,
            scheme=s.model_server_metrics_scheme,
            port=s.model_server_metrics_port,
            https_insecure_skip_verify=s.model_server_metrics_https_insecure_skip_verify,
        )

    def _build_kubernetes(self) -> tuple[KubernetesDiscovery, LeaderElector | None]:
        # Imported here: kubernetes-asyncio takes about a second to import, which only
        # Kubernetes mode should pay.
        from epp.discovery.kubeclient import KubeClient, resolve_config_source
        from epp.discovery.kubernetes import KubernetesDiscovery
        from epp.discovery.leader import LeaderElector, LeaseTiming, default_identity, lease_name_for_pool
        from epp.discovery.pool import PoolRef, PoolSpec
        from epp.discovery.reflector import Backoff

        s = self.settings
        identity = default_identity()
        client = KubeClient(resolve_config_source(s.kubeconfig), user_agent=f"epp ({identity})")
        pool: PoolRef | PoolSpec
        if s.pool_name is not None:
            pool = PoolRef(s.pool_group, s.pool_namespace, s.pool_name)
            lease = lease_name_for_pool(s.pool_namespace, s.pool_name)
        else:
            assert s.endpoint_selector is not None
            pool = PoolSpec(s.endpoint_selector, s.endpoint_target_ports)
            lease = lease_name_for_pool(s.pool_namespace, "selector-" + pool.stable_id())
        discovery = KubernetesDiscovery(
            self.datastore,
            client,
            s.pool_namespace,
            pool,
            Backoff(s.kube_backoff_initial_s, s.kube_backoff_max_s),
            s.kube_watch_timeout_s,
            on_change=self._status_changed.set,
        )
        if not s.ha_enable_leader_election:
            return discovery, None
        timing = LeaseTiming(s.ha_lease_duration_s, s.ha_renew_deadline_s, s.ha_retry_period_s)
        leader = LeaderElector(client, s.pool_namespace, lease, identity, timing, self._status_changed.set)
        return discovery, leader

    def _server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.settings.secure_serving:
            return None
        cert_dir = self.settings.cert_path or Path(".")
        return grpc.ssl_server_credentials(
            [((cert_dir / "tls.key").read_bytes(), (cert_dir / "tls.crt").read_bytes())]
        )

    def _bind(self, server: grpc.aio.Server, port: int, creds: grpc.ServerCredentials | None) -> int:
        address = f"{self.settings.bind_address}:{port}"
        bound = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"cannot listen on {address}")
        return int(bound)

    async def start(self) -> BoundPorts:
        if not self.datastore.synced:
            self.discovery.load_initial()
        await self.health.start()
        creds = self._server_credentials()

        ext_proc = grpc.aio.server(options=_GRPC_OPTIONS)
        ext_proc_grpc.add_ExternalProcessorServicer_to_server(ExtProcService(self.director), ext_proc)
        # Health on the ext_proc port too: Envoy's gRPC health checks of the cluster ask there.
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, ext_proc)
        grpc_port = self._bind(ext_proc, self.settings.grpc_port, creds)

        health_server = grpc.aio.server(options=_GRPC_OPTIONS)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, health_server)
        health_port = self._bind(health_server, self.settings.grpc_health_port, None)

        metrics_port = await self._start_metrics_http()

        for server in (ext_proc, health_server):
            await server.start()
            self._servers.append(server)
        await self.scraper.start()
        self.discovery.start()
        if self.leader is not None:
            self.leader.start()
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep())
        await self._refresh_status()
        self.ports = BoundPorts(grpc_port, health_port, metrics_port)
        log.info(
            "epp serving: ext_proc :%d, health :%d, metrics :%d, %d endpoints",
            grpc_port,
            health_port,
            metrics_port,
            len(self.datastore),
        )
        return self.ports

    async def _start_metrics_http(self) -> int:
        registry = self.metrics.registry

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        http = web.Application()
        http.router.add_get("/metrics", metrics)
        runner = web.AppRunner(http, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.bind_address, self.settings.metrics_port)
        await site.start()
        self._metrics_http = runner
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    def is_ready(self) -> bool:
        """Standalone: some endpoints are loaded. Kubernetes: the pool exists and its first full
        sync is done (even with no pods: requests then get 503), and, with HA, this replica leads."""
        if self.kubernetes is not None:
            ready = self.kubernetes.ready
        else:
            ready = self.datastore.synced and len(self.datastore) > 0
        return ready and (self.leader is None or self.leader.is_leader)

    async def _refresh_status(self) -> None:
        await self.health.set_ready(self.is_ready())
        self.director.refresh_pool_metrics()

    async def _housekeep(self) -> None:
        while True:
            # Every second, or at once when discovery or the leader elector signals a change.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_changed.wait(), 1.0)
            self._status_changed.clear()
            try:
                await self._refresh_status()
            except Exception:
                log.exception("housekeeping failed")

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        await self.health.shutdown()
        if self.leader is not None:
            await self.leader.stop()  # releases the Lease: a standby takes over at once
        await self.discovery.stop()
        if self.kubernetes is not None:
            await self.kubernetes.client.close()
        await asyncio.gather(*(s.stop(grace_s) for s in self._servers))
        await self.scraper.close()
        if self._metrics_http is not None:
            await self._metrics_http.cleanup()


async def serve(app: App) -> None:
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await app.stop()
