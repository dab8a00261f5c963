"""The composition root: builds every component from Settings and runs the servers.

Serving, as the Go EPP serves (docs/configuration.md, "Serving"):
- ext_proc on --grpc-port, over TLS unless --secure-serving=false (epp.tls), with the gRPC
  message limits of --grpc-max-recv-msg-size / --grpc-max-send-msg-size, and gRPC health on it
  too (Envoy's health checks ask there); gRPC health, plaintext, on --grpc-health-port
  (epp.health); Prometheus on --metrics-port (epp.metrics_server).
- Shutdown (`stop`, and SIGTERM in `serve`) drains: every health name but `liveness` goes
  NOT_SERVING at once, the leader Lease is released, the ext_proc server refuses new streams
  and gives those in flight up to --drain-timeout to finish; then everything stops. A second
  SIGTERM or SIGINT cuts the drain short.

Every background task (the scrapers' pollers, the endpoints-file watcher, the Kubernetes
reflectors, the leader elector, the metrics certificate watcher, housekeeping) runs under one
`epp.supervision.Supervisor`: an exception is logged with the task's name, counted in
`epp_background_task_restarts_total{task}`, and the task restarted after a capped backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from grpc_health.v1 import health_pb2_grpc

from epp.datalayer.datastore import Datastore
from epp.datalayer.scraper import ScrapeConfig, Scraper
from epp.discovery.objectives import ObjectiveStore, load_objectives_file
from epp.discovery.rewrites import RewriteStore, RewriteWatcher, load_rewrites_file
from epp.discovery.static import StaticDiscovery, parse_endpoints_flag
from epp.extproc.handler import ExtProcService
from epp.extproc.limits import StreamLimits
from epp.flowcontrol.admission import Admission
from epp.flowcontrol.controller import FlowController
from epp.flowcontrol.metrics import FlowControlMetrics
from epp.framework import BackgroundService, ConfigError, InFlightLedger, PluginHandle, ServiceContext
from epp.framework.registry import installed_registry
from epp.health import Health
from epp.metrics_server import MetricsAuth, MetricsServer, MetricsTls
from epp.observability import EppMetrics
from epp.requestcontrol.director import Director
from epp.scheduling.loader import DEFAULT_CONFIG, LoadedConfig, load_config
from epp.settings import Settings
from epp.supervision import Supervisor, use_supervisor
from epp.tls import ServingTls, serving_tls
from epp.tracing import build_tracer

if TYPE_CHECKING:
    from epp.discovery.kubernetes import KubernetesDiscovery
    from epp.discovery.leader import LeaderElector

log = logging.getLogger(__name__)
# At most this long for open health Watch streams to deliver their final status at shutdown.
HEALTH_STOP_GRACE_S = 1.0
# How long stop() waits for the plugins' background tasks to end once cancelled.
PLUGIN_STOP_TIMEOUT_S = 5.0
PLUGIN_STOP_CUT_S = 0.5  # the same after a second signal

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # each way, unless --grpc-max-*-msg-size says otherwise

_GRPC_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a port already taken must fail loudly, not be shared
    ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
]


def ext_proc_grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """The ext_proc server's channel options. A message size of None or 0 keeps epp's default
    (Go's EPP also reads 0 as "gRPC's default"). Keepalive pings (gRPC's default: every 2 hours)
    find a gateway that went away without closing its connection: its streams end and their
    picks are released, as a routed stream has no idle timeout of its own."""
    recv = settings.grpc_max_recv_msg_size or DEFAULT_MAX_MESSAGE_BYTES
    send = settings.grpc_max_send_msg_size or DEFAULT_MAX_MESSAGE_BYTES
    limits = {"grpc.max_receive_message_length": recv, "grpc.max_send_message_length": send}
    keepalive = [
        ("grpc.keepalive_time_ms", round(settings.grpc_keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(settings.grpc_keepalive_timeout_s * 1000)),
        ("grpc.http2.ping_timeout_ms", round(settings.grpc_keepalive_timeout_s * 1000)),
        # gRPC stops pinging after 2 pings with no data between them (its default): a response
        # slow to start sends no data for minutes, and is when a dead gateway must still be found.
        ("grpc.http2.max_pings_without_data", 0),
    ]
    return [(key, limits.get(key, value)) for key, value in _GRPC_OPTIONS] + keepalive


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
    timer = metrics.plugin_series if metrics else None
    return load_config(text, installed_registry(), source, timer=timer, handle=handle)


def scrape_config(settings: Settings, loaded: LoadedConfig) -> ScrapeConfig:
    """Where and how each model server's metrics are read. As in the Go EPP, lowest first: the
    defaults; the --model-server-metrics-* and *-metric flags; the config's metrics data
    source and extractor (`metrics-data-source` / `core-metrics-extractor` parameters, as
    the config's data layer wires them). Raises ConfigError for an unusable combination."""
    from epp.datalayer.model_server_metrics import MetricOverrides

    s = settings
    flags = ScrapeConfig(
        path=s.model_server_metrics_path,
        scheme=s.model_server_metrics_scheme,
        port=s.model_server_metrics_port,
        https_insecure_skip_verify=s.model_server_metrics_https_insecure_skip_verify,
        only_read_families=s.model_server_metrics_only_read_families,
    )
    overrides = MetricOverrides(
        waiting=s.total_queued_requests_metric,
        running=s.total_running_requests_metric,
        kv_usage=s.kv_cache_usage_percentage_metric,
        lora_info=s.lora_info_metric,
        cache_info=s.cache_info_metric,
    )
    layer = loaded.data_layer
    try:
        return flags.with_source(layer.source, layer.extractor, overrides)
    except ValueError as exc:
        raise ConfigError(f"model-server metrics: {exc}") from None


def check_startup(settings: Settings, loaded: LoadedConfig) -> list[str]:
    """What starting epp would check besides the config, offline, for `--check-config`: the
    model-server metrics (flags and data source), --inference-objectives-file,
    --inference-model-rewrites-file, and with TLS the minimum version, the cipher suites and
    --cert-path's files. Raises ConfigError for what would stop epp; returns warnings."""
    from epp.tls import check_min_version, cipher_suites, load_key_pair

    scrape_config(settings, loaded)
    if settings.inference_objectives_file is not None:
        load_objectives_file(str(settings.inference_objectives_file))
    if settings.inference_model_rewrites_file is not None:
        load_rewrites_file(str(settings.inference_model_rewrites_file))
    if not settings.secure_serving:
        return []
    warnings = check_min_version(settings.tls_min_version)
    warnings += cipher_suites(settings.tls_cipher_suites).warnings
    if settings.cert_path is not None:
        load_key_pair(settings.cert_path)
    return warnings


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
        self.supervisor = Supervisor(self.metrics.registry)
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
            served_endpoint_header=settings.emit_served_endpoint_header,
            tracer=build_tracer(settings.tracing),
            grpc_stream_metrics=settings.enable_grpc_stream_metrics,
        )
        self.scraper = Scraper(
            self.datastore,
            settings.refresh_metrics_interval_s,
            self._scrape_config(),
            on_error=self.metrics.count_scrape_error,
            max_bytes=settings.model_server_metrics_max_bytes,
            supervisor=self.supervisor,
            idle_interval_s=settings.idle_refresh_metrics_interval_s,
            # Stretched only while the event loop is busy, never past half the staleness threshold.
            max_interval_s=settings.metrics_staleness_threshold_s / 2
            if settings.refresh_metrics_yield_when_busy
            else None,
            requests_in_flight=self.ledger.__len__,
        )
        self.objectives, self.flow_controller = self._build_admission()
        # InferenceModelRewrites (docs/flow-control.md): from the file, or watched in Kubernetes.
        self.rewrites = self.director.rewrites = RewriteStore()
        if settings.inference_model_rewrites_file is not None:
            self.rewrites.replace(load_rewrites_file(str(settings.inference_model_rewrites_file)))
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
            self.discovery = StaticDiscovery(
                self.datastore, fixed, settings.endpoints_file, supervisor=self.supervisor
            )
        self.health = Health(leader_election=self.leader is not None)
        self.tls: ServingTls | None = self._serving_tls()
        self.metrics_server = self._metrics_server()
        self._ext_proc: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        # BackgroundService plugins' run() and the tasks they spawn (ServiceContext.spawn)
        self._services: list[asyncio.Task[None]] = []
        self._objectives_watch: asyncio.Task[None] | None = None
        self._rewrites_watch: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._cutting: asyncio.Task[None] | None = None
        self.ports: BoundPorts | None = None

    def _scrape_config(self) -> ScrapeConfig:
        return scrape_config(self.settings, self.config)

    def _keep_metrics_fresh(self, admitting: bool) -> None:
        """A saturation detector in use that reads metrics older than the idle polling interval
        as stale would see an idle pool as saturated: poll idle endpoints every interval then."""
        detector = self.config.saturation_detector
        max_age = detector.metrics_max_age_s if detector is not None else None
        scraper = self.scraper
        if admitting and max_age is not None and scraper.idle_interval_s > max_age:
            scraper.idle_interval_s = 0.0
            log.info(
                "admission reads scraped metrics older than %gs as stale: idle endpoints are polled "
                "every --refresh-metrics-interval",
                max_age,
            )

    def _build_admission(self) -> tuple[ObjectiveStore, FlowController | None]:
        """InferenceObjectives (priorities), flow control when the config turns it on, the
        admitter plugins: docs/flow-control.md."""
        objectives = ObjectiveStore()
        if self.settings.inference_objectives_file is not None:
            objectives.replace(load_objectives_file(str(self.settings.inference_objectives_file)))
        config, detector = self.config.flow_control, self.config.saturation_detector
        controller = None
        if config is not None and detector is not None:
            metrics = FlowControlMetrics(self.metrics.registry, self.settings.metrics_pool_name)
            controller = FlowController(
                config,
                detector,
                self.datastore.endpoints,
                metrics,
                self.settings.refresh_metrics_interval_s,
                supervisor=self.supervisor,
            )
            self.datastore.subscribe(lambda ep: controller.wake(), lambda ep: None)
        admission = Admission(objectives, detector, controller, self.datastore.endpoints)
        self.director.use_admission(admission)
        admission.listeners.append(self._keep_metrics_fresh)
        self._keep_metrics_fresh(admission.active)
        self.director.admitters = list(self.config.admitters)
        return objectives, controller

    def _build_kubernetes(self) -> tuple[KubernetesDiscovery, LeaderElector | None]:
        # Imported here: kubernetes-asyncio takes about a second to import, which only
        # Kubernetes mode should pay.
        from epp.discovery.kubeclient import KubeClient, resolve_config_source
        from epp.discovery.kubernetes import KubernetesDiscovery
        from epp.discovery.leader import (
            LeaderElector,
            LeaseTiming,
            default_identity,
            deployment_of_pod,
            lease_name_for_pool,
        )
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
            # As Go: named after this pod's Deployment; outside a Deployment, after the selector.
            owner = deployment_of_pod(s.pod_name_env) or "selector-" + pool.stable_id()
            lease = lease_name_for_pool(s.pool_namespace, owner)
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
        leader = LeaderElector(
            client, s.pool_namespace, lease, identity, timing, self._status_changed.set, self.supervisor
        )
        return discovery, leader

    def _serving_tls(self) -> ServingTls | None:
        """The ext_proc server's TLS; raises epp.tls.TlsConfigError (a ConfigError) for
        certificate files or TLS flags that cannot be served."""
        s = self.settings
        if not s.secure_serving:
            given = [
                flag
                for flag, value in (
                    ("--cert-path", s.cert_path is not None),
                    ("--enable-cert-reload", s.enable_cert_reload),
                    ("--tls-min-version", s.tls_min_version not in ("", "1.2")),
                    ("--tls-cipher-suites", bool(s.tls_cipher_suites)),
                )
                if value
            ]
            if given:
                log.warning(
                    "%s: no effect with --secure-serving=false (ext_proc is plaintext)", ", ".join(given)
                )
            return None
        hosts = [s.bind_address, *([s.pod_name_env] if s.pod_name_env else [])]
        tls = serving_tls(
            s.cert_path,
            enable_cert_reload=s.enable_cert_reload,
            min_version=s.tls_min_version,
            cipher_suite_names=s.tls_cipher_suites,
            hosts=hosts,
        )
        for warning in tls.warnings:
            log.warning("%s", warning)
        return tls

    def _metrics_server(self) -> MetricsServer:
        s = self.settings
        if s.metrics_client_ca_file is not None and s.metrics_cert_dir is None:
            raise ConfigError('"metrics-client-ca-file" requires "metrics-cert-dir"')
        if (
            s.metrics_cert_dir is not None
            and s.metrics_client_ca_file is None
            and not s.metrics_endpoint_auth
        ):
            # The Go EPP's rule: HTTPS without any client authentication is refused.
            raise ConfigError(
                '"metrics-cert-dir" enables metrics TLS without authentication; '
                'set "metrics-client-ca-file" or "metrics-endpoint-auth"'
            )
        tls = MetricsTls(s.metrics_cert_dir, s.metrics_client_ca_file) if s.metrics_cert_dir else None
        auth: MetricsAuth | None = None
        self._metrics_auth_off: str | None = None
        if s.metrics_endpoint_auth:
            if self.kubernetes is not None:
                auth = MetricsAuth(self.kubernetes.client)
            else:  # said once, at start
                self._metrics_auth_off = (
                    "metrics endpoint auth is off: epp runs outside Kubernetes (standalone endpoints), "
                    "so there is no API server to review bearer tokens; /metrics is open"
                )
        return MetricsServer(
            self.metrics.registry,
            s.bind_address,
            s.metrics_port,
            auth=auth,
            tls=tls,
            supervisor=self.supervisor,
        )

    def _bind(self, server: grpc.aio.Server, port: int, creds: grpc.ServerCredentials | None) -> int:
        address = f"{self.settings.bind_address}:{port}"
        try:
            bound = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        except RuntimeError:  # grpcio raises where older versions returned 0 (a port in use, ...)
            bound = 0
        if bound == 0:
            raise OSError(f"cannot listen on {address} (in use, or not an address of this host)")
        return int(bound)

    async def start(self) -> BoundPorts:
        if not self.datastore.synced:
            self.discovery.load_initial()
        self.health.set_ready(False)

        ext_proc = grpc.aio.server(options=ext_proc_grpc_options(self.settings))
        service = ExtProcService(self.director, StreamLimits.from_settings(self.settings))
        ext_proc_grpc.add_ExternalProcessorServicer_to_server(service, ext_proc)
        # Health on the ext_proc port too: Envoy's gRPC health checks of the cluster ask there.
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, ext_proc)
        grpc_port = self._bind(ext_proc, self.settings.grpc_port, self.tls.credentials if self.tls else None)

        health_server = grpc.aio.server(options=_GRPC_OPTIONS)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, health_server)
        health_port = self._bind(health_server, self.settings.grpc_health_port, None)

        metrics_port = await self.metrics_server.start()
        if self._metrics_auth_off:
            log.info("%s", self._metrics_auth_off)

        await ext_proc.start()
        self._ext_proc = ext_proc
        await health_server.start()
        self._health_server = health_server
        # Tasks started in here (the Kubernetes reflectors among them) run under our supervisor.
        with use_supervisor(self.supervisor):
            await self.scraper.start()
            self.discovery.start()
            pool = self.settings.pool_name
            if self.kubernetes is not None and pool:
                from epp.discovery.objectives import ObjectiveWatcher

                s = self.settings
                watcher = ObjectiveWatcher(
                    self.kubernetes.client, s.pool_namespace, pool, s.pool_group, self.objectives
                )
                self._objectives_watch = self.supervisor.spawn(watcher.task, watcher.reflector.run)
                follower = RewriteWatcher(
                    self.kubernetes.client, s.pool_namespace, pool, s.pool_group, self.rewrites
                )
                self._rewrites_watch = self.supervisor.spawn(follower.task, follower.reflector.run)
            if self.leader is not None:
                self.leader.start()
            self._housekeeping = self.supervisor.spawn("housekeeping", self._housekeep)
            self._start_plugin_services()
        await self._refresh_status()
        self.ports = BoundPorts(grpc_port, health_port, metrics_port)
        log.info(
            "epp serving: ext_proc :%d (%s), health :%d, metrics :%d (%s), %d endpoints, %s event loop, "
            "gRPC experiments: %s",
            grpc_port,
            self._describe_tls(),
            health_port,
            metrics_port,
            self._describe_metrics(),
            len(self.datastore),
            type(asyncio.get_running_loop()).__module__.split(".")[0],  # uvloop or asyncio
            os.environ.get("GRPC_EXPERIMENTS") or "grpcio's defaults",
        )
        return self.ports

    def _start_plugin_services(self) -> None:
        """Each BackgroundService plugin's `run`, supervised, and the tasks it spawns: all
        cancelled, and waited for, at stop."""

        def spawn(task: str, factory: Callable[[], Awaitable[None]], detail: str) -> asyncio.Task[None]:
            spawned = self.supervisor.spawn(task, factory, detail=detail)
            self._services = [s for s in self._services if not s.done()]  # a plugin's ended tasks go
            self._services.append(spawned)
            return spawned

        context = ServiceContext(
            endpoints=self.datastore.endpoints, subscribe=self.datastore.subscribe, spawn=spawn
        )
        for plugin in self.config.scheduler.plugins:
            if isinstance(plugin, BackgroundService):
                run = functools.partial(plugin.run, context)
                self._services.append(self.supervisor.spawn("plugin-service", run, detail=plugin.name))

    def _describe_tls(self) -> str:
        if self.tls is None:
            return "plaintext"
        if self.tls.self_signed:
            return "TLS, self-signed certificate"
        reload = ", reloaded on change" if self.tls.reloader else ""
        return f"TLS, certificate from {self.settings.cert_path}{reload}"

    def _describe_metrics(self) -> str:
        scheme = "https" if self.metrics_server.tls else "http"
        if self.metrics_server.tls and self.metrics_server.tls.client_ca_file:
            scheme += " with client certificates"
        return (
            f"{scheme}, {'bearer tokens reviewed by Kubernetes' if self.metrics_server.auth else 'no auth'}"
        )

    def is_ready(self) -> bool:
        """Standalone: some endpoints are loaded. Kubernetes: the pool exists and its first full
        sync is done (even with no pods: requests then get 503), and, with HA, this replica leads."""
        if self.kubernetes is not None:
            ready = self.kubernetes.ready
        else:
            ready = self.datastore.synced and len(self.datastore) > 0
        return ready and (self.leader is None or self.leader.is_leader)

    async def _refresh_status(self) -> None:
        self.health.set_ready(self.is_ready())
        self.director.refresh_pool_metrics()

    async def _housekeep(self) -> None:
        while True:
            # Every second, or at once when discovery or the leader elector signals a change.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # not wait_for: see epp.discovery.leader._run
                    await self._status_changed.wait()
            self._status_changed.clear()
            await self._refresh_status()

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Drain, then stop everything (see the module's docstring). In-flight ext_proc streams
        get `drain_timeout_s` (default --drain-timeout) to finish; those still open then are
        cancelled. Returns as soon as they are done. Calling it again waits for the same stop."""
        if self._stopping is None:
            timeout = self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
            self._stopping = asyncio.get_running_loop().create_task(self._drain_and_stop(timeout))
        await asyncio.shield(self._stopping)

    def cut_drain(self) -> None:
        """End a drain now: in-flight streams are cancelled (a second SIGTERM does this)."""
        if self._ext_proc is not None and self._cutting is None:
            self._cutting = asyncio.get_running_loop().create_task(self._ext_proc.stop(None))

    async def _drain_and_stop(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.health.drain()  # every name but liveness NOT_SERVING, at once (housekeeping cannot undo it)
        if self.flow_controller is not None:
            self.flow_controller.stop()  # queued requests get 503 now, not at the drain's end
        # grpc.aio's stop(grace) refuses new streams at once (GOAWAY, listener closed) and waits
        # up to `grace` for those in flight. Discovery, scraping and metrics keep running meanwhile:
        # a stream in flight may still need to pick an endpoint.
        ext_proc_stopped = loop.create_task(self._ext_proc.stop(timeout_s)) if self._ext_proc else None
        if self.leader is not None:
            await self.leader.stop()  # releases the Lease: a standby takes over at once
        if ext_proc_stopped is not None:
            log.info("draining: no new ext_proc streams; those in flight have up to %gs", timeout_s)
            await ext_proc_stopped
            log.info("ext_proc server stopped after %.1fs", loop.time() - started)
        if self._housekeeping is not None:  # it kept the pool gauges current through the drain
            self._housekeeping.cancel()
        await self.discovery.stop()
        if self._objectives_watch is not None:
            self._objectives_watch.cancel()
        if self._rewrites_watch is not None:
            self._rewrites_watch.cancel()
        for service in self._services:
            service.cancel()
        if self._services:  # a plugin's cleanup (its finally blocks) runs now, not after epp stopped
            # A second signal (cut_drain) means stop now: the plugins get a moment, not 5 s.
            wait_s = PLUGIN_STOP_TIMEOUT_S if self._cutting is None else PLUGIN_STOP_CUT_S
            _, stuck = await asyncio.wait(self._services, timeout=wait_s)
            for service in stuck:
                log.warning("plugin task %s did not stop within %gs", service.get_name(), wait_s)
        await self.scraper.close()
        await self.metrics_server.stop()  # before the client its auth uses is closed
        if self.kubernetes is not None:
            await self.kubernetes.client.close()
        if self._health_server is not None:
            # Watch streams end by themselves once draining (epp.health): the grace lets each send
            # its last NOT_SERVING before the server goes, instead of being cancelled mid-send.
            await self._health_server.stop(HEALTH_STOP_GRACE_S)


async def serve(app: App) -> None:
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before starting: a SIGTERM while epp starts (a pod deleted at once) is a clean stop too.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled.set)
    await app.start()
    await signalled.wait()
    signalled.clear()
    log.info(
        "shutting down: draining for up to %gs (a second signal stops at once)", app.settings.drain_timeout_s
    )
    stopping = loop.create_task(app.stop())
    again = loop.create_task(signalled.wait())
    done, _ = await asyncio.wait({stopping, again}, return_when=asyncio.FIRST_COMPLETED)
    if again in done:
        log.warning("second signal: cancelling the streams still in flight")
        app.cut_drain()
    else:
        again.cancel()
    await stopping
