"""List-then-watch of one kind of Kubernetes object, kept going forever (client-go's reflector).

The loop:
1. list (with the caller's selectors) and hand the whole result to `on_list`, which replaces
   whatever the caller knew before: objects that vanished while we were not watching go away;
2. watch from the list's `resourceVersion` with bookmarks on, handing each ADDED / MODIFIED /
   DELETED to `on_event`; bookmarks and events advance the version we would resume from;
3. when the server ends the watch at the requested `timeoutSeconds`, watch again from the last
   version (nothing is missed: the server replays what happened since);
4. on `410 Gone` (the version is older than the server's history), a dropped connection, a
   watch the server ended early, a stream silent for 30 s past its timeout, or an HTTP error,
   list again: at once if the watch had been up for a while, else after a capped exponential
   backoff with jitter. Failed lists (API server down, unreachable, refusing) back off the
   same way; the delay grows while attempts keep failing and resets after a healthy watch.

The loop runs under the supervisor (epp.supervision, task `kubernetes-reflector`, or the name its
owner gives, e.g. `inference-objectives`): an error it did not expect (a bug, a response it
cannot read, a handler that raised) is logged, counted in `epp_background_task_restarts_total`
under that name and answered with a relist; anything that escapes the loop itself restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from epp.discovery.kubeclient import read_events, read_json
from epp.errors import KubeApiError
from epp.supervision import Supervisor, current_supervisor

log = logging.getLogger(__name__)

# Calls the list function (e.g. CoreV1Api.list_namespaced_pod bound to its namespace and
# selectors) with extra query arguments and `_preload_content=False`; returns the raw response.
OpenFn = Callable[..., Awaitable[aiohttp.ClientResponse]]
ListHandler = Callable[[list[dict[str, Any]]], None]
EventHandler = Callable[[str, dict[str, Any]], None]

_CONNECT_TIMEOUT_S = 10.0
_LIST_TIMEOUT_S = 60.0
_READ_GRACE_S = 30.0  # on top of the watch's own timeout before a silent stream counts as dead
_EVENT_TYPES = frozenset({"ADDED", "MODIFIED", "DELETED"})
_HINTS = {
    401: "the credentials were refused",
    403: "epp's service account lacks get/list/watch on this resource: see deploy/base/rbac.yaml",
    404: "the API server does not serve this resource: is the InferencePool CRD installed in this version?",
}


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with jitter: the n-th retry waits U(d/2, d), d = initial * 2^(n-1)."""

    initial_s: float = 0.2
    max_s: float = 10.0

    def delay(self, failures: int) -> float:
        d = min(self.max_s, self.initial_s * 2 ** max(0, failures - 1))
        return random.uniform(d / 2, d)


class _Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class _EndedEarly(Exception):
    """The server closed the watch before its timeout: treat it like a dropped connection."""


# Failures that come with talking to an API server over a network; anything else is logged with
# its traceback (and still retried: discovery must not stop).
_EXPECTED = (KubeApiError, aiohttp.ClientError, OSError, TimeoutError, ValueError, _EndedEarly)


def _resource_version(obj: dict[str, Any]) -> str | None:
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return rv if isinstance(rv, str) and rv else None


class Reflector:
    def __init__(
        self,
        what: str,
        open_fn: OpenFn,
        on_list: ListHandler,
        on_event: EventHandler,
        backoff: Backoff,
        watch_timeout_s: float = 300.0,
        supervisor: Supervisor | None = None,
        task: str = "kubernetes-reflector",
    ) -> None:
        self.what = what
        self.task = task  # the supervised task's name: what its failures are counted and logged under
        self._open = open_fn
        self._on_list = on_list
        self._on_event = on_event
        self._backoff = backoff
        self._watch_timeout_s = watch_timeout_s
        self._supervisor = supervisor
        self.lists = 0  # completed lists, for logs and tests

    async def run(self) -> None:
        """List and watch until cancelled, under the supervisor (given, else the context's)."""
        self._supervisor = self._supervisor or current_supervisor()
        await self._supervisor.run(self.task, self._run, detail=self.what)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            if failures:
                delay = self._backoff.delay(failures)
                log.debug("%s: retrying in %.2fs", self.what, delay)
                await asyncio.sleep(delay)
            try:
                version = await self._list()
            except Exception as exc:
                failures += 1
                self._log_failure("list", exc, failures)
                continue
            started = loop.time()
            try:
                await self._watch(version)
            except Exception as exc:
                # After a watch that stayed up a while, list again at once; after one that failed
                # right away, back off more each time.
                healthy = loop.time() - started >= self._backoff.max_s
                failures = 0 if healthy else failures + 1
                if isinstance(exc, _Gone):
                    log.info("%s: resource version %s expired (410 Gone), listing again", self.what, version)
                else:
                    self._log_failure("watch", exc, failures)

    def _log_failure(self, step: str, exc: Exception, failures: int) -> None:
        if not isinstance(exc, _EXPECTED):
            # A bug or a response we cannot read: keep going (the next list reconciles), loudly.
            (self._supervisor or current_supervisor()).failed(
                self.task, exc, detail=f"{self.what}: {step} failed, listing again"
            )
            return
        text = str(exc) or type(exc).__name__
        if isinstance(exc, KubeApiError) and exc.status in _HINTS:
            text += f" ({_HINTS[exc.status]})"
        # The first failure and then every tenth: an API server that is down for a while must
        # not fill the log.
        if failures <= 1 or failures % 10 == 0:
            log.warning("%s: %s failed (%d in a row), listing again: %s", self.what, step, failures, text)
        else:
            log.debug("%s: %s failed (%d in a row): %s", self.what, step, failures, text)

    async def _list(self) -> str:
        resp = await self._open(
            _request_timeout=aiohttp.ClientTimeout(total=_LIST_TIMEOUT_S, sock_connect=_CONNECT_TIMEOUT_S)
        )
        doc = await read_json(resp)
        items = doc.get("items") or []
        version = _resource_version(doc)
        if not isinstance(items, list) or version is None:
            raise KubeApiError(resp.status, "BadResponse", "list without items or resourceVersion")
        self._on_list([item for item in items if isinstance(item, dict)])
        self.lists += 1
        log.debug("%s: listed %d objects at version %s", self.what, len(items), version)
        return version

    async def _watch(self, version: str) -> None:
        """Watch from `version`, resuming after each normal end. Returns never; raises to relist."""
        loop = asyncio.get_running_loop()
        while True:
            # Spread the reconnects of many clients, as client-go does.
            timeout_s = int(self._watch_timeout_s * random.uniform(1.0, 2.0)) or 1
            opened = loop.time()
            resp = await self._open(
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_s,
                _request_timeout=aiohttp.ClientTimeout(
                    sock_connect=_CONNECT_TIMEOUT_S, sock_read=timeout_s + _READ_GRACE_S
                ),
            )
            if resp.status == 410:
                resp.close()
                raise _Gone
            async with contextlib.aclosing(read_events(resp)) as events:
                async for event in events:
                    kind, obj = event.get("type"), event.get("object")
                    if not isinstance(obj, dict):
                        raise KubeApiError(200, "BadResponse", f"watch event {kind} without an object")
                    if kind == "ERROR":
                        error = KubeApiError.from_status(500, obj)
                        if error.status == 410:
                            raise _Gone
                        raise error
                    if kind == "BOOKMARK" or kind in _EVENT_TYPES:
                        version = _resource_version(obj) or version
                        if kind != "BOOKMARK":
                            self._on_event(kind, obj)
                    else:
                        log.debug("%s: ignoring watch event of type %r", self.what, kind)
            if loop.time() - opened < timeout_s - 1:
                raise _EndedEarly(f"server ended the watch after {loop.time() - opened:.1f}s")
