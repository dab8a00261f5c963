"""A loopback Kubernetes API server for tests, speaking the wire format kubernetes-asyncio expects.

What it emulates (enough of the API server's list/watch contract to test a reflector against):
- namespaced resources under `/api/v1/...` and `/apis/<group>/<version>/...`: list, get, create
  (POST), replace (PUT, 409 Conflict on a stale `metadata.resourceVersion`), and watch;
- one global, increasing `resourceVersion`; lists carry it in `metadata.resourceVersion`;
- `labelSelector` (`k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`, `k>n`, `k<n`)
  and `fieldSelector` (`metadata.name`, `metadata.namespace`), applied to lists and watches;
  under a label selector an object that starts or stops matching is ADDED or DELETED, as the
  API server's watch cache does;
- watch: `?watch=true` streams one JSON event a line over chunked HTTP, replaying the history after
  `resourceVersion` (or synthetic ADDED events without one), then live events; BOOKMARK events
  every `bookmark_interval_s` when `allowWatchBookmarks=true`; ends at `timeoutSeconds`;
- `410 Gone` for a watch from a version older than the retained history (`compact()`), as an ERROR
  event in a 200 stream (the usual form) or, with `gone_as_http_status`, as the HTTP status;
- faults: `drop_watches()` cuts open watch connections mid-stream, `end_watches()` ends them
  cleanly, `freeze_watches()` stops delivering live events to the open watches (the events stay
  in history), `down()` / `up()` stop and restart the whole server on the same port, and
  `partition(agent)` answers 503 to every request whose User-Agent contains `agent`.
Objects are plain dicts; tests change them synchronously with `put` / `delete`.
- reviews (what epp's /metrics auth asks): POST `authentication.k8s.io/v1` TokenReview, answered
  from `tokens` (token -> KubeUser; others are not authenticated), and `authorization.k8s.io/v1`
  SubjectAccessReview, allowed for a non-resource (path, verb) that `grant` gave the user or one
  of its groups; `reviews` counts both kinds.
"""

from __future__ import annotations

import asyncio
import copy
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import orjson
import yaml
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.epp_app import RunningEpp, running_epp


@dataclass(frozen=True)
class Resource:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


PODS = Resource("", "v1", "pods", "Pod")
POOLS_V1 = Resource("inference.networking.k8s.io", "v1", "inferencepools", "InferencePool")
POOLS_V1ALPHA2 = Resource("inference.networking.x-k8s.io", "v1alpha2", "inferencepools", "InferencePool")
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _flag(request: web.Request, name: str) -> bool:
    """A boolean query parameter, parsed like Go's strconv.ParseBool (clients send "true" or "True")."""
    return request.query.get(name, "").lower() in ("1", "t", "true")


def _status_response(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(status(code, reason, message), status=code)


# -- selectors -------------------------------------------------------------------------------------

Predicate = Callable[[Mapping[str, Any]], bool]


_WORD = r"[^\s=!(),<>]+"
_LABEL_TERM = re.compile(
    rf"""!\s*(?P<absent>{_WORD})
    | (?P<key>{_WORD}) (?:
        \s*(?P<op>==|=|!=)\s*(?P<value>{_WORD})?
      | \s+(?P<setop>in|notin)\s*\((?P<set>[^()]*)\)
      | \s*(?P<cmp>[<>])\s*(?P<number>[+-]?[0-9]+)
    )?""",
    re.VERBOSE,
)


def _selector_terms(text: str) -> list[str]:
    """`text` split at the commas outside parentheses."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return terms


def parse_label_selector(text: str) -> Predicate:
    """The API server's label selection: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`,
    `k`, `!k`, `k>n`, `k<n`; comma = and. `!=` and `notin` also match objects without the label.
    Written apart from epp's parser (term by term, with one regular expression), so the two check
    each other; ValueError (400 BadRequest) for what the API server would refuse."""
    if not text.strip():
        return lambda obj: True
    tests: list[Callable[[Mapping[str, str]], bool]] = []
    for term in _selector_terms(text):
        m = _LABEL_TERM.fullmatch(term.strip())
        if m is None:
            raise ValueError(f"unable to parse requirement: {term.strip()!r}")
        if m["absent"]:
            tests.append(lambda labels, k=m["absent"]: k not in labels)
            continue
        key = m["key"]
        if m["op"]:
            value = m["value"] or ""
            if m["op"] == "!=":
                tests.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                tests.append(lambda labels, k=key, v=value: k in labels and labels[k] == v)
        elif m["setop"]:
            values = {v.strip() for v in m["set"].split(",")}
            if any(" " in v or "\t" in v for v in values):
                raise ValueError(f"unable to parse requirement: {term.strip()!r}")
            if m["setop"] == "in":
                tests.append(lambda labels, k=key, vs=values: k in labels and labels[k] in vs)
            else:
                tests.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif m["cmp"]:

            def compare(
                labels: Mapping[str, str],
                k: str = key,
                gt: bool = m["cmp"] == ">",
                bound: int = int(m["number"]),
            ) -> bool:
                try:
                    have = int(labels[k])
                except (KeyError, ValueError):
                    return False
                return have > bound if gt else have < bound

            tests.append(compare)
        else:
            tests.append(lambda labels, k=key: k in labels)

    def match(obj: Mapping[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(t(labels) for t in tests)

    return match


def parse_field_selector(text: str) -> Predicate:
    tests: list[tuple[str, str]] = []
    for term in (t.strip() for t in text.split(",")):
        if not term:
            continue
        key, _, value = term.replace("==", "=").partition("=")
        if key not in ("metadata.name", "metadata.namespace"):
            raise ValueError(f'field label not supported: "{key}"')
        tests.append((key.split(".", 1)[1], value))

    def match(obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata", {})
        return all(meta.get(k) == v for k, v in tests)

    return match


# -- objects ---------------------------------------------------------------------------------------


def pod(
    name: str,
    ip: str,
    labels: Mapping[str, str] | None = None,
    *,
    ready: bool = True,
    namespace: str = "default",
    annotations: Mapping[str, str] | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    """A pod as the API server returns it, with the fields discovery reads."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels or {})}
    if annotations:
        metadata["annotations"] = dict(annotations)
    if deleting:
        metadata["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    return {
        "metadata": metadata,
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}] if ip else [],
            "conditions": [
                {"type": "Initialized", "status": "True"},
                {"type": "Ready", "status": "True" if ready else "False"},
                {"type": "ContainersReady", "status": "True" if ready else "False"},
            ],
        },
    }


def inference_pool(
    name: str,
    selector: Mapping[str, str],
    ports: Iterable[int],
    *,
    namespace: str = "default",
    resource: Resource = POOLS_V1,
) -> dict[str, Any]:
    """An InferencePool in the v1 shape, or the v1alpha2 shape for POOLS_V1ALPHA2 (one port)."""
    ports = list(ports)
    if resource == POOLS_V1ALPHA2:
        spec: dict[str, Any] = {
            "selector": dict(selector),
            "targetPortNumber": ports[0],
            "extensionRef": {"name": f"{name}-epp"},
        }
    else:
        spec = {
            "selector": {"matchLabels": dict(selector)},
            "targetPorts": [{"number": p} for p in ports],
            "endpointPickerRef": {
                "name": f"{name}-epp",
                "port": {"number": 9002},
                "failureMode": "FailClose",
            },
        }
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


# -- watches ---------------------------------------------------------------------------------------

_DROP = object()  # cut the connection without ending the chunked body
_END = object()  # end the stream cleanly, as at timeoutSeconds


@dataclass
class _Event:
    rv: int
    resource: Resource
    namespace: str
    type: str
    obj: dict[str, Any]
    old: dict[str, Any] | None


@dataclass(eq=False)
class _Watcher:
    resource: Resource
    namespace: str
    match: Predicate
    agent: str
    sent_rv: int  # everything up to here has been sent (or filtered out): what a bookmark may say
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    frozen: bool = False

    def translate(self, ev: _Event) -> tuple[str, dict[str, Any]] | None:
        """The event this watch sees, with selector transitions (None: not for this watch)."""
        if ev.resource != self.resource or ev.namespace != self.namespace:
            return None
        now = self.match(ev.obj)
        before = ev.old is not None and self.match(ev.old)
        if ev.type == "DELETED":
            return ("DELETED", ev.obj) if now else None
        if now and before:
            return ("MODIFIED", ev.obj)
        if now:
            return ("ADDED", ev.obj)
        if before:
            return ("DELETED", ev.obj)
        return None


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    agent: str
    authorization: str


@dataclass(frozen=True)
class KubeUser:
    """Whom a token belongs to, as a TokenReview reports it."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()


class KubeApiServer:
    def __init__(
        self,
        resources: Iterable[Resource] = (PODS, POOLS_V1, POOLS_V1ALPHA2, LEASES),
        bookmark_interval_s: float = 0.2,
    ) -> None:
        self.resources = {(r.group, r.version, r.plural): r for r in resources}
        self.bookmark_interval_s = bookmark_interval_s
        self.gone_as_http_status = False
        self.rv = 100
        self.compacted_rv = 0  # history at or before this version is forgotten
        self.objects: dict[tuple[Resource, str, str], dict[str, Any]] = {}
        self.history: list[_Event] = []
        self.requests: list[RecordedRequest] = []
        self.partitioned: set[str] = set()
        self.tokens: dict[str, KubeUser] = {}  # TokenReview: which tokens are valid, and whose
        self.grants: set[tuple[str, str, str]] = set()  # SubjectAccessReview: (user or group, verb, path)
        self.reviews = {"TokenReview": 0, "SubjectAccessReview": 0}
        self.access_reviews: list[dict[str, Any]] = []  # the SubjectAccessReview specs received
        self.gone_served = 0  # watches answered with 410 Gone
        self.port = 0
        self._watchers: set[_Watcher] = set()
        self._runner: web.AppRunner | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> KubeApiServer:
        await self.up()
        return self

    async def up(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        for prefix in ("/api/{version}", "/apis/{group}/{version}"):
            base = prefix + "/namespaces/{namespace}/{plural}"
            app.router.add_route("GET", base, self._collection)
            app.router.add_route("POST", base, self._create)
            app.router.add_route("GET", base + "/{name}", self._get)
            app.router.add_route("PUT", base + "/{name}", self._replace)
        app.router.add_route("POST", "/apis/authentication.k8s.io/v1/tokenreviews", self._token_review)
        app.router.add_route(
            "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", self._access_review
        )
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def down(self) -> None:
        """Stop listening and cut every connection: clients get connection refused until up()."""
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def stop(self) -> None:
        await self.down()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig pointing at this server (plain HTTP, a bearer token)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "loopback", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [
                {"name": "test", "context": {"cluster": "loopback", "user": "tester", "namespace": namespace}}
            ],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # -- objects --------------------------------------------------------------------------------

    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def put(self, resource: Resource, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create or update an object (ADDED or MODIFIED), as a controller or the kubelet would."""
        stored = copy.deepcopy(dict(obj))
        meta = stored.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        key = (resource, meta["namespace"], meta["name"])
        old = self.objects.get(key)
        rv = self._next_rv()
        meta["resourceVersion"] = str(rv)
        meta["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
        meta.setdefault("creationTimestamp", "2025-01-01T00:00:00Z")
        stored["apiVersion"] = resource.api_version
        stored["kind"] = resource.kind
        self.objects[key] = stored
        self._publish(_Event(rv, resource, key[1], "MODIFIED" if old else "ADDED", stored, old))
        return stored

    def delete(self, resource: Resource, name: str, namespace: str = "default") -> None:
        old = self.objects.pop((resource, namespace, name))
        gone = copy.deepcopy(old)
        rv = self._next_rv()
        gone["metadata"]["resourceVersion"] = str(rv)
        self._publish(_Event(rv, resource, namespace, "DELETED", gone, old))

    def get(self, resource: Resource, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.objects.get((resource, namespace, name))

    def _list(self, resource: Resource, namespace: str, match: Predicate) -> list[dict[str, Any]]:
        return [
            obj
            for (res, ns, _), obj in sorted(self.objects.items(), key=lambda kv: kv[0][2])
            if res == resource and ns == namespace and match(obj)
        ]

    def _publish(self, ev: _Event) -> None:
        self.history.append(ev)
        for watcher in self._watchers:
            if not watcher.frozen:
                watcher.queue.put_nowait(ev)

    # -- faults ---------------------------------------------------------------------------------

    def compact(self) -> None:
        """Forget the history so far: a watch from any older version gets 410 Gone."""
        self.compacted_rv = self.rv
        self.history.clear()

    def drop_watches(self, agent: str = "") -> int:
        """Cut open watch connections (those of clients whose User-Agent contains `agent`)."""
        hit = [w for w in self._watchers if agent in w.agent]
        for watcher in hit:
            watcher.queue.put_nowait(_DROP)
        return len(hit)

    def end_watches(self) -> int:
        for watcher in self._watchers:
            watcher.queue.put_nowait(_END)
        return len(self._watchers)

    def freeze_watches(self) -> None:
        for watcher in self._watchers:
            watcher.frozen = True

    def partition(self, agent: str) -> None:
        self.partitioned.add(agent)
        self.drop_watches(agent)

    def heal(self, agent: str) -> None:
        self.partitioned.discard(agent)

    def open_watches(self, resource: Resource | None = None) -> int:
        return sum(1 for w in self._watchers if resource is None or w.resource == resource)

    def lists(self, resource: Resource) -> list[RecordedRequest]:
        """The list (not watch) requests made for `resource`."""
        return [r for r in self.watch_or_list(resource) if r.query.get("watch", "").lower() != "true"]

    def watches(self, resource: Resource) -> list[RecordedRequest]:
        return [r for r in self.watch_or_list(resource) if r.query.get("watch", "").lower() == "true"]

    def watch_or_list(self, resource: Resource) -> list[RecordedRequest]:
        prefix = (
            f"/api/{resource.version}" if not resource.group else f"/apis/{resource.group}/{resource.version}"
        )
        return [
            r
            for r in self.requests
            if r.method == "GET" and r.path.startswith(prefix) and r.path.endswith("/" + resource.plural)
        ]

    # -- HTTP -----------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        agent = request.headers.get("User-Agent", "")
        self.requests.append(
            RecordedRequest(
                request.method,
                request.path,
                dict(request.query),
                agent,
                request.headers.get("Authorization", ""),
            )
        )
        if any(p in agent for p in self.partitioned):
            return _status_response(503, "ServiceUnavailable", "partitioned by the test")
        return await handler(request)

    def _resource(self, request: web.Request) -> Resource | None:
        info = request.match_info
        return self.resources.get((info.get("group", ""), info["version"], info["plural"]))

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        resource = self._resource(request)
        if resource is None:
            return _status_response(404, "NotFound", "the server could not find the requested resource")
        namespace = request.match_info["namespace"]
        try:
            label_match = parse_label_selector(request.query.get("labelSelector", ""))
            field_match = parse_field_selector(request.query.get("fieldSelector", ""))
        except ValueError as exc:
            return _status_response(400, "BadRequest", str(exc))

        def match(obj: Mapping[str, Any]) -> bool:
            return label_match(obj) and field_match(obj)

        if _flag(request, "watch"):
            return await self._watch(request, resource, namespace, match)
        return web.json_response(
            {
                "kind": resource.kind + "List",
                "apiVersion": resource.api_version,
                "metadata": {"resourceVersion": str(self.rv)},
                "items": self._list(resource, namespace, match),
            }
        )

    async def _watch(
        self, request: web.Request, resource: Resource, namespace: str, match: Predicate
    ) -> web.StreamResponse:
        since = request.query.get("resourceVersion", "")
        if since not in ("", "0") and int(since) < self.compacted_rv:
            message = f"too old resource version: {since} ({self.compacted_rv})"
            self.gone_served += 1
            if self.gone_as_http_status:
                return _status_response(410, "Expired", message)
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(
                orjson.dumps({"type": "ERROR", "object": status(410, "Expired", message)}) + b"\n"
            )
            await resp.write_eof()
            return resp
        bookmarks = _flag(request, "allowWatchBookmarks")
        timeout = float(request.query.get("timeoutSeconds", "0") or 0)
        deadline = time.monotonic() + timeout if timeout else float("inf")
        # Register and take the backlog in one step (no await between), so no event is lost or
        # sent twice.
        watcher = _Watcher(resource, namespace, match, request.headers.get("User-Agent", ""), self.rv)
        if since in ("", "0"):
            backlog = [(("ADDED", obj), self.rv) for obj in self._list(resource, namespace, match)]
        else:
            backlog = [(watcher.translate(ev), ev.rv) for ev in self.history if ev.rv > int(since)]
        self._watchers.add(watcher)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            for item, _ in backlog:
                if item is not None:
                    await resp.write(orjson.dumps({"type": item[0], "object": item[1]}) + b"\n")
            while True:
                wait = min(self.bookmark_interval_s, deadline - time.monotonic())
                if wait <= 0:
                    break  # timeoutSeconds: a normal end
                try:
                    async with asyncio.timeout(wait):  # not wait_for: on 3.11 it can swallow a cancel
                        ev = await watcher.queue.get()
                except TimeoutError:
                    if bookmarks and time.monotonic() < deadline:
                        bookmark = {
                            "kind": resource.kind,
                            "apiVersion": resource.api_version,
                            "metadata": {"resourceVersion": str(watcher.sent_rv)},
                        }
                        await resp.write(orjson.dumps({"type": "BOOKMARK", "object": bookmark}) + b"\n")
                    continue
                if ev is _DROP:
                    if request.transport is not None:  # None: the client has gone already
                        request.transport.abort()
                    return resp
                if ev is _END:
                    break
                item = watcher.translate(ev)
                if item is not None:
                    await resp.write(orjson.dumps({"type": item[0], "object": item[1]}) + b"\n")
                watcher.sent_rv = ev.rv
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._watchers.discard(watcher)
        return resp

    async def _get(self, request: web.Request) -> web.Response:
        resource = self._resource(request)
        if resource is None:
            return _status_response(404, "NotFound", "the server could not find the requested resource")
        info = request.match_info
        obj = self.objects.get((resource, info["namespace"], info["name"]))
        if obj is None:
            return _status_response(404, "NotFound", f'{resource.plural} "{info["name"]}" not found')
        return web.json_response(obj)

    async def _create(self, request: web.Request) -> web.Response:
        resource = self._resource(request)
        if resource is None:
            return _status_response(404, "NotFound", "the server could not find the requested resource")
        body = await request.json()
        namespace = request.match_info["namespace"]
        name = body.get("metadata", {}).get("name", "")
        if (resource, namespace, name) in self.objects:
            return _status_response(409, "AlreadyExists", f'{resource.plural} "{name}" already exists')
        body["metadata"]["namespace"] = namespace
        body["metadata"].pop("resourceVersion", None)
        return web.json_response(self.put(resource, body), status=201)

    async def _replace(self, request: web.Request) -> web.Response:
        resource = self._resource(request)
        if resource is None:
            return _status_response(404, "NotFound", "the server could not find the requested resource")
        body = await request.json()
        info = request.match_info
        current = self.objects.get((resource, info["namespace"], info["name"]))
        if current is None:
            return _status_response(404, "NotFound", f'{resource.plural} "{info["name"]}" not found')
        sent_rv = body.get("metadata", {}).get("resourceVersion")
        if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
            return _status_response(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {resource.plural} "{info["name"]}": '
                "the object has been modified; please apply your changes to the latest version and try again",
            )
        body["metadata"]["namespace"] = info["namespace"]
        return web.json_response(self.put(resource, body))

    # -- reviews --------------------------------------------------------------------------------

    def grant(self, subject: str, verb: str = "get", path: str = "/metrics") -> None:
        """Let a user or group `verb` the non-resource URL `path` (a ClusterRole and its binding)."""
        self.grants.add((subject, verb, path))

    async def _token_review(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("kind") != "TokenReview" or not isinstance(body.get("spec"), dict):
            return _status_response(400, "BadRequest", "expected a TokenReview with a spec")
        self.reviews["TokenReview"] += 1
        user = self.tokens.get(str(body["spec"].get("token", "")))
        if user is None:
            review_status: dict[str, Any] = {"authenticated": False, "error": "invalid bearer token"}
        else:
            info: dict[str, Any] = {"username": user.username, "groups": list(user.groups)}
            if user.uid:
                info["uid"] = user.uid
            review_status = {"authenticated": True, "user": info}
        return web.json_response({**body, "status": review_status}, status=201)

    async def _access_review(self, request: web.Request) -> web.Response:
        body = await request.json()
        spec = body.get("spec")
        if body.get("kind") != "SubjectAccessReview" or not isinstance(spec, dict):
            return _status_response(400, "BadRequest", "expected a SubjectAccessReview with a spec")
        self.reviews["SubjectAccessReview"] += 1
        self.access_reviews.append(spec)
        attrs = spec.get("nonResourceAttributes") or {}
        subjects = [spec.get("user", ""), *(spec.get("groups") or [])]
        allowed = any((who, attrs.get("verb"), attrs.get("path")) in self.grants for who in subjects)
        review_status: dict[str, Any] = {"allowed": allowed}
        if not allowed:
            review_status["reason"] = "no RBAC policy matched"
        return web.json_response({**body, "status": review_status}, status=201)


# -- running epp against it ------------------------------------------------------------------------

# Fast retries so fault scenarios resolve in well under a second.
FAST = {"kube_backoff_initial_s": 0.05, "kube_backoff_max_s": 0.4}


@asynccontextmanager
async def running_k8s_epp(kubeconfig: Path, *flags: str, **overrides: Any) -> AsyncIterator[RunningEpp]:
    """epp in-process on free loopback ports, discovering from the server `kubeconfig` names."""
    async with running_epp("--kubeconfig", str(kubeconfig), *flags, **{**FAST, **overrides}) as epp:
        yield epp


async def health(epp: RunningEpp, service: str = "readiness") -> str:
    """What the gRPC health service on the health port says: SERVING or NOT_SERVING."""
    assert epp.app.ports is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.app.ports.health}") as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


async def wait_for_health(epp: RunningEpp, expected: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (current := await health(epp)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"health stayed {current}, expected {expected} within {timeout}s")
        await asyncio.sleep(0.02)


def endpoint_keys(epp: RunningEpp) -> set[str]:
    return {ep.key for ep in epp.app.datastore.endpoints()}


def endpoint_view(epp: RunningEpp) -> dict[str, str]:
    """key -> endpoint name."""
    return {ep.key: ep.name for ep in epp.app.datastore.endpoints()}
