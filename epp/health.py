"""gRPC health (`grpc.health.v1`), answering the service names the Go EPP answers, as it does.

The names, and the Go EPP's rules for them (llm-d-router `cmd/epp/runner/health.go`):
- Without leader election every name follows readiness: `inference-extension` (what the
  upstream chart's single-replica probes ask), `""`, `readiness`,
  `envoy.service.ext_proc.v3.ExternalProcessor`, and any other name (Go answers them all alike).
- With `--ha-enable-leader-election`, `""`, `readiness` and the ext_proc name follow readiness,
  which then includes holding the Lease; any other name, `inference-extension` included, is
  answered SERVICE_UNKNOWN (the chart probes `liveness` / `readiness` when it runs several
  replicas).
- `liveness` is SERVING while the process runs, also while it drains: a liveness failure mid-drain
  would only get the container restarted. (Go differs in one case: without leader election its
  `liveness` follows the pool's sync and the drain like the other names. The chart's
  single-replica probes ask `inference-extension`, which behaves the same in both.)
- Draining (after SIGTERM): every name but `liveness` reports NOT_SERVING at once, so the
  kubelet and Envoy's health checks take epp out of rotation while in-flight streams finish.

Check, List and Watch are served; a Watch stream sends the status when it changes and ends once
epp drains (so it does not hold the server's shutdown open).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# Watch streams open at once, over both servers that serve health (each holds a call until epp
# drains); one more is refused with RESOURCE_EXHAUSTED. Probes (Check) are never limited.
MAX_HEALTH_WATCHERS = 1000
CHART_SERVICE = "inference-extension"  # the upstream chart's probe with one replica
LIVENESS_SERVICE = "liveness"
READINESS_SERVICE = "readiness"
# What readiness answers for with leader election on (Go's switch); without it, every name.
READINESS_SERVICES = ("", READINESS_SERVICE, EXT_PROC_SERVICE)

SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN: int = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health:
    """The health state: readiness (set by the App), leader election on or off, draining."""

    def __init__(self, leader_election: bool = False) -> None:
        self.leader_election = leader_election
        self.ready = False
        self.draining = False
        self._changed = asyncio.Event()
        self.servicer = HealthServicer(self)

    def names(self) -> tuple[str, ...]:
        """The service names answered (List reports these)."""
        if self.leader_election:
            return (*READINESS_SERVICES, LIVENESS_SERVICE)
        return (*READINESS_SERVICES, LIVENESS_SERVICE, CHART_SERVICE)

    def status(self, service: str) -> int:
        if service == LIVENESS_SERVICE:
            return SERVING
        if self.leader_election and service not in READINESS_SERVICES:
            return SERVICE_UNKNOWN
        return SERVING if self.ready and not self.draining else NOT_SERVING

    def set_ready(self, ready: bool) -> None:
        if ready != self.ready:
            self.ready = ready
            self._notify()

    def drain(self) -> None:
        """Every name but liveness NOT_SERVING from now on; open Watch streams send it and end."""
        if not self.draining:
            self.draining = True
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def watch(self, service: str) -> AsyncIterator[int]:
        """The status now, then each change, until draining."""
        last: int | None = None
        while True:
            changed = self._changed
            status = self.status(service)
            if status != last:
                yield status
                last = status
                # Look again before waiting or ending: the state may have changed (drain() among
                # others) while the message was being sent, and that change's event is spent.
                continue
            if self.draining:
                return
            await changed.wait()


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    def __init__(self, health: Health) -> None:
        self._health = health
        self.watchers = 0

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=self._health.status(request.service))

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        statuses = {
            name: health_pb2.HealthCheckResponse(status=self._health.status(name))
            for name in self._health.names()
        }
        return health_pb2.HealthListResponse(statuses=statuses)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        if self.watchers >= MAX_HEALTH_WATCHERS:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many health Watch streams open (at most {MAX_HEALTH_WATCHERS})",
            )
        self.watchers += 1
        try:
            async for status in self._health.watch(request.service):
                yield health_pb2.HealthCheckResponse(status=status)
        finally:
            self.watchers -= 1
