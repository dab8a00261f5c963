"""Kubernetes discovery: the endpoints of an InferencePool (or of a label selector) from its pods.

Two reflectors (see `reflector.py`) feed a local cache:
- the pool: `inferencepools` in the pool's namespace with `fieldSelector=metadata.name=<pool>`
  (absent in `--endpoint-selector` mode, where flags give the selector and ports);
- its pods: `pods` in the same namespace with the pool's selector as a server-side
  `labelSelector` (canonical form of a `selector.Selector`: a pool's matchLabels as `k=v` terms,
  or `--endpoint-selector` in full syntax, set-based terms included). A selector change restarts
  this reflector, so the new selector is listed afresh; a port change needs no new list.

Reconciliation is from the cache, not incremental: after every change the desired endpoint list
is recomputed by a pure function of (pool spec, cached pods) and applied with
`Datastore.replace_all`, which keeps the object (and scraped metrics) of every endpoint whose key
(ip:port) did not change, updates name/labels in place, and removes or adds the rest (stopping
and starting scrapes, purging the prefix index). A list (first sync, a relist after 410 Gone or a
dropped watch) therefore reconciles by construction: nothing missed while disconnected is lost or
left behind. Per-pod results are memoised, so an event costs one pod's parse plus an O(endpoints)
dictionary pass; events arriving together are coalesced into one pass.

Pod rules (as the Go EPP): a pod counts when it has no deletionTimestamp, a Ready=True condition, a
pod IP and labels matching the selector (checked again locally, with the API server's rules); it
then gives one endpoint per target port, narrowed by its `llm-d.ai/active-ports` annotation
(legacy `inference.networking.k8s.io/active-ports`): a comma-separated list of ports, of which
only those among the target ports are used. Endpoint names are the pod name with one target
port, `<pod>:<port>` with several; endpoint labels are the pod's labels, so filters see
`llm-d.ai/role` and friends.

`ready` is true once the pool exists and its pods have been listed once. A deleted pool clears
every endpoint and makes `ready` false until the pool is back and listed again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from kubernetes_asyncio.client import CoreV1Api, CustomObjectsApi

from epp.datalayer.datastore import Datastore
from epp.discovery.kubeclient import KubeClient, check_config_source, raw_response
from epp.discovery.pool import POOL_PLURAL, PoolRef, PoolSpec, parse_pool
from epp.discovery.reflector import Backoff, Reflector
from epp.errors import PoolSpecError
from epp.framework import Endpoint

log = logging.getLogger(__name__)

ACTIVE_PORTS_ANNOTATION = "llm-d.ai/active-ports"
LEGACY_ACTIVE_PORTS_ANNOTATION = "inference.networking.k8s.io/active-ports"


@dataclass(frozen=True, slots=True)
class PodView:
    """The fields of a pod that decide its endpoints."""

    name: str
    ip: str
    labels: Mapping[str, str] = field(hash=False)
    ready: bool  # Ready=True and not being deleted
    active_ports: str | None = None  # the annotation's raw value, None when absent
    namespace: str = ""


def pod_view(obj: Mapping[str, Any]) -> PodView:
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    ready = False
    if not meta.get("deletionTimestamp"):
        for cond in status.get("conditions") or ():
            if isinstance(cond, Mapping) and cond.get("type") == "Ready":
                ready = cond.get("status") == "True"
                break
    annotations = meta.get("annotations") or {}
    active = annotations.get(ACTIVE_PORTS_ANNOTATION, annotations.get(LEGACY_ACTIVE_PORTS_ANNOTATION))
    labels = meta.get("labels") or {}
    return PodView(
        name=str(meta.get("name", "")),
        ip=str(status.get("podIP") or ""),
        labels={str(k): str(v) for k, v in labels.items()},
        ready=ready,
        active_ports=active if isinstance(active, str) else None,
        namespace=str(meta.get("namespace", "")),
    )


def active_ports(annotation: str | None, target_ports: tuple[int, ...]) -> tuple[int, ...]:
    """The target ports a pod serves: all of them, or those its annotation names."""
    if annotation is None:
        return target_ports
    named = set()
    for part in annotation.split(","):
        try:
            named.add(int(part.strip()))
        except ValueError:
            continue
    return tuple(p for p in target_ports if p in named)


def pod_endpoints(pool: PoolSpec, pod: PodView) -> list[Endpoint]:
    if not pod.ready or not pod.ip or not pool.matches(pod.labels):
        return []
    several = len(pool.target_ports) > 1
    return [
        Endpoint(
            pod.ip,
            port,
            f"{pod.name}:{port}" if several else pod.name,
            pod.labels,
            namespace=pod.namespace,
            go_id=f"{pod.namespace}/{pod.name}-rank-{pool.target_ports.index(port)}",
            pod_name=pod.name,
        )
        for port in active_ports(pod.active_ports, pool.target_ports)
    ]


def desired_endpoints(pool: PoolSpec | None, pods: Iterable[PodView]) -> list[Endpoint]:
    """The endpoint set a pool and its pods call for (empty without a pool)."""
    if pool is None:
        return []
    return [ep for pod in pods for ep in pod_endpoints(pool, pod)]


class KubernetesDiscovery:
    """Keeps the datastore equal to `desired_endpoints(pool, pods)` as the cluster changes."""

    def __init__(
        self,
        datastore: Datastore,
        client: KubeClient,
        namespace: str,
        pool: PoolRef | PoolSpec,
        backoff: Backoff | None = None,
        watch_timeout_s: float = 300.0,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._datastore = datastore
        self.client = client
        self.namespace = namespace
        self._pool_ref = pool if isinstance(pool, PoolRef) else None
        self._pool: PoolSpec | None = pool if isinstance(pool, PoolSpec) else None
        self._backoff = backoff or Backoff()
        self._watch_timeout_s = watch_timeout_s
        self._on_change = on_change
        self._pods: dict[str, PodView] = {}
        self._memo: dict[str, tuple[PodView, list[Endpoint]]] = {}
        self._pods_synced = False
        self._pods_generation = 0  # callbacks of a replaced pod reflector are ignored
        self._pods_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reconcile_pending = False
        self._pool_absent_logged = False
        self.pool_reflector: Reflector | None = None
        self.pods_reflector: Reflector | None = None

    @property
    def pool(self) -> PoolSpec | None:
        return self._pool

    @property
    def ready(self) -> bool:
        """The pool exists and its pods have been listed: the endpoint set is complete."""
        return self._pool is not None and self._pods_synced

    def describe(self) -> str:
        if self._pool_ref is not None:
            return str(self._pool_ref)
        assert self._pool is not None
        return (
            f"pods {self.namespace}/{{{self._pool.label_selector()}}} ports {list(self._pool.target_ports)}"
        )

    def load_initial(self) -> None:
        """Validate the client configuration (raises KubeConfigError). Endpoints come later."""
        check_config_source(self.client.source)

    def start(self) -> None:
        log.info("Kubernetes discovery: %s (%s)", self.describe(), self.client.source.describe())
        if self._pool_ref is not None:
            self.pool_reflector = Reflector(
                f"InferencePool {self._pool_ref.namespace}/{self._pool_ref.name}",
                self._open_pool,
                self._pool_listed,
                self._pool_event,
                self._backoff,
                self._watch_timeout_s,
            )
            self._spawn(self.pool_reflector.run())
        else:
            assert self._pool is not None
            self._start_pods(self._pool)

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # reflectors retry all else
            log.error("Kubernetes discovery task died", exc_info=task.exception())

    # -- the pool ------------------------------------------------------------------------------

    async def _open_pool(self, **query: Any) -> aiohttp.ClientResponse:
        assert self._pool_ref is not None
        ref = self._pool_ref
        api = CustomObjectsApi(await self.client.api())
        return await raw_response(
            api.list_namespaced_custom_object(
                ref.group,
                ref.version,
                ref.namespace,
                POOL_PLURAL,
                field_selector=f"metadata.name={ref.name}",
                _preload_content=False,
                **query,
            )
        )

    def _is_our_pool(self, obj: Mapping[str, Any]) -> bool:
        assert self._pool_ref is not None
        return bool((obj.get("metadata") or {}).get("name") == self._pool_ref.name)

    def _pool_listed(self, items: list[dict[str, Any]]) -> None:
        self._apply_pool(next((obj for obj in items if self._is_our_pool(obj)), None))

    def _pool_event(self, kind: str, obj: dict[str, Any]) -> None:
        if self._is_our_pool(obj):
            self._apply_pool(None if kind == "DELETED" else obj)

    def _apply_pool(self, obj: Mapping[str, Any] | None) -> None:
        if obj is None:
            if self._pool is not None:
                log.warning("%s was deleted: dropping its %d endpoints", self._pool_ref, len(self._datastore))
            elif not self._pool_absent_logged:
                log.warning("%s does not exist (yet): not ready until it does", self._pool_ref)
            self._pool_absent_logged = True
            self._pool = None
            self._stop_pods()
            self._reconcile()
            return
        try:
            spec = parse_pool(obj)
        except PoolSpecError as exc:
            log.error("%s; keeping the previous pool state", exc)
            return
        old, self._pool = self._pool, spec
        self._pool_absent_logged = False
        if spec == old:
            return  # a status or metadata update: nothing for discovery
        self._memo.clear()
        if old is None or old.selector != spec.selector:
            log.info(
                "%s: selector {%s}, target ports %s",
                self._pool_ref,
                spec.label_selector(),
                list(spec.target_ports),
            )
            self._start_pods(spec)
        else:
            log.info("%s: target ports now %s", self._pool_ref, list(spec.target_ports))
        self._reconcile()

    # -- its pods ------------------------------------------------------------------------------

    def _start_pods(self, spec: PoolSpec) -> None:
        """(Re)start the pod reflector for `spec`'s selector. Current endpoints stay until it lists."""
        if self._pods_task is not None:
            self._pods_task.cancel()
        self._pods_generation += 1
        generation = self._pods_generation
        selector = spec.label_selector()

        async def open_pods(**query: Any) -> aiohttp.ClientResponse:
            api = CoreV1Api(await self.client.api())
            return await raw_response(
                api.list_namespaced_pod(
                    self.namespace, label_selector=selector, _preload_content=False, **query
                )
            )

        self.pods_reflector = Reflector(
            f"pods {self.namespace}/{{{selector}}}",
            open_pods,
            lambda items: self._pods_listed(generation, items),
            lambda kind, obj: self._pod_event(generation, kind, obj),
            self._backoff,
            self._watch_timeout_s,
        )
        self._pods_task = self._spawn(self.pods_reflector.run())

    def _stop_pods(self) -> None:
        if self._pods_task is not None:
            self._pods_task.cancel()
            self._pods_task = None
        self._pods_generation += 1
        self._pods.clear()
        self._memo.clear()
        self._pods_synced = False

    def _pods_listed(self, generation: int, items: list[dict[str, Any]]) -> None:
        if generation != self._pods_generation:
            return
        pods = (pod_view(obj) for obj in items)
        self._pods = {pod.name: pod for pod in pods if pod.name}
        for name in [n for n in self._memo if n not in self._pods]:
            del self._memo[name]
        self._pods_synced = True
        self._reconcile()

    def _pod_event(self, generation: int, kind: str, obj: dict[str, Any]) -> None:
        if generation != self._pods_generation:
            return
        pod = pod_view(obj)
        if kind == "DELETED":
            self._pods.pop(pod.name, None)
            self._memo.pop(pod.name, None)
        elif pod.name:
            self._pods[pod.name] = pod
        if not self._reconcile_pending:
            self._reconcile_pending = True
            asyncio.get_running_loop().call_soon(self._reconcile)

    # -- reconciliation ------------------------------------------------------------------------

    def _endpoints_of(self, pool: PoolSpec, pod: PodView) -> list[Endpoint]:
        memo = self._memo.get(pod.name)
        if memo is not None and memo[0] == pod:
            return memo[1]
        endpoints = pod_endpoints(pool, pod)
        self._memo[pod.name] = (pod, endpoints)
        return endpoints

    def _reconcile(self) -> None:
        self._reconcile_pending = False
        pool = self._pool
        if pool is None:
            desired: list[Endpoint] = []
        else:
            desired = [ep for pod in self._pods.values() for ep in self._endpoints_of(pool, pod)]
        self._datastore.replace_all(desired)
        self._on_change()
