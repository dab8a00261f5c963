"""Leader election on a `coordination.k8s.io/v1` Lease, for active-passive HA (client-go's rules).

Every replica runs discovery (so a standby's endpoint set and metrics are warm); only the
leader reports ready, so the Service in front of the replicas sends Envoy to the leader alone.

- A replica becomes leader by writing its identity into the Lease: creating it, or replacing it
  when it is free (no holder) or expired. Writes carry the `resourceVersion` that was read, so
  of two replicas racing for the same Lease the API server accepts one and answers 409 Conflict
  to the other.
- Expiry is judged by the local clock: a Lease is expired when its record (holder, renew time,
  ...) has not changed for `leaseDurationSeconds` since this replica first saw it, so clock skew
  between replicas does not matter. A replica that starts beside a crashed leader therefore
  waits one lease duration before taking over.
- The leader renews every `retry_period_s`; when it has not managed to renew for
  `renew_deadline_s` it steps down (not ready) and goes back to competing, rather than exiting.
- Stopping releases the Lease (empty holder, duration 1 s), so a standby takes over at its next
  attempt instead of after the lease duration.
- The loop runs under the supervisor (epp.supervision, task `leader-election`): an attempt that
  fails unexpectedly is logged and counted, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import random
import re
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio.client import CoordinationV1Api

from epp.discovery.kubeclient import KubeClient, raw_response, read_json
from epp.errors import KubeApiError
from epp.supervision import Supervisor, current_supervisor

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=5.0)
_JITTER = 1.2  # a standby waits retry_period x U(1, 1.2) between attempts


def lease_name_for_pool(namespace: str, name: str) -> str:
    """The Go EPP's lease name (llm-d-router: `epp-<namespace>-<name>.llm-d.ai`), so a mixed or
    migrating deployment contends for the same Lease."""
    return f"epp-{namespace}-{name}.llm-d.ai"


# A Deployment's pod: <deployment>-<pod-template-hash>-<5 random characters>.
_DEPLOYMENT_POD = re.compile(r"^(?P<deployment>[a-z0-9]([-a-z0-9]*[a-z0-9])?)-[a-z0-9]{5,10}-[a-z0-9]{5}$")


def deployment_of_pod(pod_name: str | None) -> str | None:
    """The Deployment a pod belongs to, from its name (as the Go EPP names the Lease in selector
    mode); None when the name does not have a Deployment pod's shape."""
    if not pod_name:
        return None
    m = _DEPLOYMENT_POD.match(pod_name)
    return m.group("deployment") if m else None


def default_identity(pod_name: str | None = None) -> str:
    """This replica's holder identity: `<pod>_<uuid>`, the form client-go writes (hostname + "_" +
    a UUID, and a pod's hostname is its name). The pod is `pod_name`, else $POD_NAME (the Downward
    API, as the Go EPP's manifests set it), else the hostname. The UUID keeps a restarted container
    from taking the Lease its previous incarnation held as its own."""
    pod = pod_name or os.environ.get("POD_NAME") or socket.gethostname()
    return f"{pod}_{uuid.uuid4()}"


def _micro_time(now: datetime.datetime) -> str:
    """metav1.MicroTime: RFC 3339 with microseconds, UTC."""
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    lease_duration_s: float = 15.0  # controller-runtime's defaults
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0


class LeaderElector:
    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        name: str,
        identity: str,
        timing: LeaseTiming = LeaseTiming(),
        on_change: Callable[[], None] = lambda: None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.timing = timing
        self._on_change = on_change
        self.is_leader = False
        self.transitions = 0  # times this replica became leader
        self._observed: tuple[Any, ...] | None = None  # the Lease record last read
        self._observed_at = 0.0  # loop time when that record was first seen
        self._last_renew = 0.0
        self._supervisor = supervisor
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        log.info("leader election: lease %s/%s as %s", self.namespace, self.name, self.identity)
        self._supervisor = self._supervisor or current_supervisor()
        self._task = self._supervisor.spawn(
            "leader-election", self._run, detail=f"lease {self.namespace}/{self.name}"
        )

    async def stop(self, release: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        # Also when not (yet) leading: a stop that cancelled an acquire after the API server took
        # the write would otherwise leave the Lease naming a departing pod for its whole duration.
        # _release changes nothing unless the Lease names this replica.
        if release:
            try:
                async with asyncio.timeout(_REQUEST_TIMEOUT.total):
                    await self._release()
            except Exception as exc:
                log.warning("could not release lease %s/%s: %s", self.namespace, self.name, exc)
        self._set_leader(False, stopping=True)

    def _set_leader(self, leader: bool, stopping: bool = False) -> None:
        if leader == self.is_leader:
            return
        self.is_leader = leader
        if leader:
            self.transitions += 1
            log.info("became leader (lease %s/%s)", self.namespace, self.name)
        else:
            log.log(
                logging.INFO if stopping else logging.WARNING,
                "no longer leader (lease %s/%s)",
                self.namespace,
                self.name,
            )
        self._on_change()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A leader's attempt may not outlast what is left of its renew deadline.
            budget = self.timing.renew_deadline_s
            if self.is_leader:
                budget = max(0.05, self._last_renew + budget - loop.time())
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that
                # lands as the attempt completes, and stop() would then wait forever.
                async with asyncio.timeout(budget):
                    renewed = await self.try_acquire_or_renew()
            except (KubeApiError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                log.debug("lease %s/%s: %s", self.namespace, self.name, exc or type(exc).__name__)
                renewed = False
            except Exception as exc:  # never let a surprise leave a stale leader behind
                (self._supervisor or current_supervisor()).failed(
                    "leader-election", exc, detail=f"lease {self.namespace}/{self.name}: attempt failed"
                )
                renewed = False
            now = loop.time()
            if renewed:
                self._last_renew = now
                self._set_leader(True)
            elif self.is_leader and now - self._last_renew >= self.timing.renew_deadline_s:
                log.warning("could not renew lease for %.1fs: stepping down", now - self._last_renew)
                self._set_leader(False)
            period = self.timing.retry_period_s
            await asyncio.sleep(period if self.is_leader else period * random.uniform(1.0, _JITTER))

    async def _leases(self) -> CoordinationV1Api:
        return CoordinationV1Api(await self._client.api())

    async def try_acquire_or_renew(self) -> bool:
        """One attempt. True when this replica holds the Lease afterwards."""
        leases = await self._leases()
        now = datetime.datetime.now(datetime.UTC)
        resp = await raw_response(
            leases.read_namespaced_lease(
                self.name, self.namespace, _preload_content=False, _request_timeout=_REQUEST_TIMEOUT
            )
        )
        if resp.status == 404:
            resp.release()
            return await self._create(leases, now)
        lease = await read_json(resp)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("acquireTime"), spec.get("leaseTransitions"))
        loop_now = asyncio.get_running_loop().time()
        if record != self._observed:
            self._observed, self._observed_at = record, loop_now
        duration = spec.get("leaseDurationSeconds") or self.timing.lease_duration_s
        if holder and holder != self.identity and loop_now < self._observed_at + float(duration):
            return False  # held, and renewed within its duration as far as we have seen
        ours = holder == self.identity
        new_spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.timing.lease_duration_s)),
            "acquireTime": spec.get("acquireTime") if ours else _micro_time(now),
            "renewTime": _micro_time(now),
            "leaseTransitions": int(spec.get("leaseTransitions") or 0) + (0 if ours or not holder else 1),
        }
        lease["spec"] = {**spec, **new_spec}
        return await self._replace(leases, lease)

    async def _create(self, leases: CoordinationV1Api, now: datetime.datetime) -> bool:
        body: Any = {  # a dict body is sent as is (the annotation names the model)
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self.timing.lease_duration_s)),
                "acquireTime": _micro_time(now),
                "renewTime": _micro_time(now),
                "leaseTransitions": 0,
            },
        }
        resp = await raw_response(
            leases.create_namespaced_lease(
                self.namespace, body, _preload_content=False, _request_timeout=_REQUEST_TIMEOUT
            )
        )
        if resp.status == 409:  # someone created it first
            resp.release()
            return False
        await read_json(resp)
        return True

    async def _replace(self, leases: CoordinationV1Api, lease: Any) -> bool:
        resp = await raw_response(
            leases.replace_namespaced_lease(
                self.name, self.namespace, lease, _preload_content=False, _request_timeout=_REQUEST_TIMEOUT
            )
        )
        if resp.status == 409:  # the Lease changed since we read it: someone else won
            resp.release()
            return False
        written = await read_json(resp)
        spec = written.get("spec") or {}
        self._observed = (
            spec.get("holderIdentity") or "",
            spec.get("renewTime"),
            spec.get("acquireTime"),
            spec.get("leaseTransitions"),
        )
        self._observed_at = asyncio.get_running_loop().time()
        return True

    async def _release(self) -> None:
        leases = await self._leases()
        resp = await raw_response(
            leases.read_namespaced_lease(
                self.name, self.namespace, _preload_content=False, _request_timeout=_REQUEST_TIMEOUT
            )
        )
        lease = await read_json(resp)
        spec = lease.get("spec") or {}
        if spec.get("holderIdentity") != self.identity:
            return
        now = _micro_time(datetime.datetime.now(datetime.UTC))
        lease["spec"] = {**spec, "holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": now}
        if await self._replace(leases, lease):
            log.info("released lease %s/%s", self.namespace, self.name)
