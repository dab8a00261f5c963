"""The Prometheus endpoint, `GET /metrics`, served as the Go EPP's controller-runtime metrics
server serves it.

- `--metrics-endpoint-auth` (default true): a request needs `Authorization: Bearer <token>`;
  the Kubernetes API authenticates the token (a TokenReview) and authorizes the user for `get`
  on the non-resource URL `/metrics` (a SubjectAccessReview), so a scraper's service account
  needs a ClusterRole with `nonResourceURLs: ["/metrics"], verbs: ["get"]`, and epp's own
  account may create tokenreviews and subjectaccessreviews. Answers as controller-runtime's
  filter gives them: 401 `Unauthorized` (no, malformed or rejected token), 403 `Authorization
  denied for user NAME`, 500 when the API server cannot be asked. Decisions are cached, bounded
  in number, for controller-runtime's times: a token's review 1 minute (10 s when rejected), an
  allow 5 minutes, a deny 30 s. Outside Kubernetes (standalone discovery) there is no API
  server to ask, so the endpoint is open, and epp says so once at start.
- `--metrics-cert-dir DIR`: HTTPS with DIR/tls.crt and DIR/tls.key (TLS 1.2 or later), re-read
  when the files change (checked every 10 s, as controller-runtime's certificate watcher polls);
  `--metrics-client-ca-file` additionally requires a client certificate signed by that CA.

The page is rendered on a worker thread, never on the event loop that serves ext_proc: a registry
with a thousand models' series is a 47 MB page, seconds of work. The thread pauses between slices
of its work (`_Throttle`) and asks the interpreter to hand over the GIL more often while it runs
(`_GilShare`), so ext_proc keeps most of the interpreter. `render_text` writes exactly what
prometheus_client's `generate_latest` writes, twice as fast with epp's registry (names, label
orders, `name="value"` pairs and values are formatted once per render, not once per sample).
Scrapes that arrive while a render runs share its result (at most one render at a time of each
encoding), and the page is gzipped on the thread when the scraper accepts it (Prometheus does).
Collectors are read from that thread: prometheus_client's are thread-safe, epp's `LeanHistogram`
copies its series list and reads plain counts (at worst a scrape sees an observation's bucket
before its sum), and collectors that read endpoints read the datastore's immutable snapshot.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import math
import os
import ssl
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.openmetrics.exposition import UNDERSCORES, escape_label_name, escape_metric_name
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from epp.errors import ConfigError, KubeApiError
from epp.supervision import Supervisor, current_supervisor

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"

# controller-runtime's WithAuthenticationAndAuthorization cache times (and apiserver's default
# for rejected tokens).
TOKEN_TTL_S = 60.0
TOKEN_REJECTED_TTL_S = 10.0
ALLOW_TTL_S = 300.0
DENY_TTL_S = 30.0
CACHE_ENTRIES = 1024
REVIEW_TIMEOUT_S = 10.0
METRICS_STOP_GRACE_S = 1.0  # at stop, for a scrape still being answered (aiohttp waits it twice)


class ReviewClient(Protocol):
    """The two Kubernetes API calls the auth needs (epp.discovery.kubeclient.KubeClient)."""

    async def create_token_review(self, token: str, timeout_s: float = ...) -> dict[str, Any]: ...

    async def create_subject_access_review(
        self, spec: Mapping[str, Any], timeout_s: float = ...
    ) -> dict[str, Any]: ...


K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """At most `size` entries, least recently used evicted first, each kept for its own TTL."""

    def __init__(self, size: int = CACHE_ENTRIES, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> tuple[V] | None:
        """(value,) while fresh, None when absent or expired."""
        hit = self._entries.get(key)
        if hit is None:
            return None
        if hit[0] <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return (hit[1],)

    def put(self, key: K, value: V, ttl_s: float) -> None:
        self._entries[key] = (self._clock() + ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class Decision:
    """An HTTP status and body for a refused request; None from `check` means allowed."""

    status: int
    text: str


@dataclass(frozen=True)
class _User:
    name: str
    uid: str
    groups: tuple[str, ...]
    extra: Mapping[str, Any]

    def key(self) -> bytes:
        return orjson.dumps([self.name, self.uid, self.groups, self.extra], option=orjson.OPT_SORT_KEYS)


def bearer_token(header: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>`, as the API server's bearer-token
    authenticator reads it (scheme case-insensitive; None when absent or malformed)."""
    parts = (header or "").strip().split(" ", 2)
    if len(parts) < 2 or parts[0].lower() != "bearer" or not parts[1]:
        return None
    return parts[1]


class MetricsAuth:
    """Bearer tokens reviewed by the Kubernetes API: TokenReview, then SubjectAccessReview."""

    def __init__(self, client: ReviewClient, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.tokens: TtlCache[str, _User | None] = TtlCache(clock=clock)
        self.decisions: TtlCache[tuple[bytes, str, str], bool] = TtlCache(clock=clock)

    async def check(self, authorization: str | None, verb: str, path: str) -> Decision | None:
        token = bearer_token(authorization)
        if token is None:
            return Decision(401, "Unauthorized")
        try:
            user = await self._authenticate(token)
        except (KubeApiError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            log.error("metrics auth: TokenReview failed: %s", exc or type(exc).__name__)
            return Decision(500, "Authentication failed")
        if user is None:
            return Decision(401, "Unauthorized")
        try:
            allowed = await self._authorize(user, verb, path)
        except (KubeApiError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            log.error(
                "metrics auth: SubjectAccessReview for %s failed: %s", user.name, exc or type(exc).__name__
            )
            return Decision(500, f"Authorization for user {user.name} failed")
        if not allowed:
            log.debug("metrics auth: %s may not %s %s", user.name, verb, path)
            return Decision(403, f"Authorization denied for user {user.name}")
        return None

    async def _authenticate(self, token: str) -> _User | None:
        key = hashlib.sha256(token.encode()).hexdigest()  # the cache keeps no token
        cached = self.tokens.get(key)
        if cached is not None:
            return cached[0]
        review = await self.client.create_token_review(token, timeout_s=REVIEW_TIMEOUT_S)
        status = review.get("status") or {}
        user: _User | None = None
        if status.get("authenticated"):
            info = status.get("user") or {}
            user = _User(
                str(info.get("username", "")),
                str(info.get("uid", "")),
                tuple(str(g) for g in info.get("groups") or ()),
                dict(info.get("extra") or {}),
            )
        self.tokens.put(key, user, TOKEN_TTL_S if user is not None else TOKEN_REJECTED_TTL_S)
        return user

    async def _authorize(self, user: _User, verb: str, path: str) -> bool:
        key = (user.key(), verb, path)
        cached = self.decisions.get(key)
        if cached is not None:
            return cached[0]
        spec: dict[str, Any] = {
            "user": user.name,
            "groups": list(user.groups),
            "nonResourceAttributes": {"path": path, "verb": verb},
        }
        if user.uid:
            spec["uid"] = user.uid
        if user.extra:
            spec["extra"] = dict(user.extra)
        review = await self.client.create_subject_access_review(spec, timeout_s=REVIEW_TIMEOUT_S)
        status = review.get("status") or {}
        allowed = bool(status.get("allowed")) and not status.get("denied")
        self.decisions.put(key, allowed, ALLOW_TTL_S if allowed else DENY_TTL_S)
        return allowed


# -- TLS -------------------------------------------------------------------------------------------


class MetricsTls:
    """The HTTPS context of --metrics-cert-dir (and --metrics-client-ca-file). `reload_if_changed`
    re-reads the pair when the files changed (the server calls it every few seconds); a pair that
    does not load is logged and the previous one stays in use."""

    def __init__(self, cert_dir: Path, client_ca_file: Path | None = None) -> None:
        self.cert_dir = cert_dir
        self.client_ca_file = client_ca_file
        self._paths = (cert_dir / "tls.crt", cert_dir / "tls.key")
        self._stamp = self._files_stamp()
        self.context = self._build()  # raises ConfigError: checked at start
        self.reloads = 0

    def _files_stamp(self) -> tuple[tuple[int, int, int], ...] | None:
        try:
            stats = [os.stat(p) for p in self._paths]
        except OSError:
            return None
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self._paths[0], self._paths[1])
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"--metrics-cert-dir {self.cert_dir}: cannot load tls.crt/tls.key: {exc}"
            ) from None
        if self.client_ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=str(self.client_ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"--metrics-client-ca-file {self.client_ca_file}: no usable CA certificate: {exc}"
                ) from None
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def reload_if_changed(self) -> bool:
        """True when a new pair was loaded; connections made from now on present it."""
        stamp = self._files_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self._build()  # the pair is whole and matching before the live context takes it
            self.context.load_cert_chain(self._paths[0], self._paths[1])
        except (ConfigError, OSError, ssl.SSLError) as exc:
            log.error("metrics certificate reload failed, keeping the previous one: %s", exc)
            return False
        self.reloads += 1
        log.info("reloaded the metrics TLS certificate from %s", self.cert_dir)
        return True


# -- rendering -------------------------------------------------------------------------------------

_TYPES = {
    "counter": "counter",
    "info": "gauge",
    "stateset": "gauge",
    "gaugehistogram": "histogram",
    "unknown": "untyped",
}
_NAME_SUFFIX = {"counter": "_total", "info": "_info"}
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")
_MAX_CACHED_VALUES = 4096
_ZERO = "0.0"


def _escape_value(v: str) -> str:
    if "\\" in v or "\n" in v or '"' in v:
        return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return v


def _help_text(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def render_text(registry: Collector, pause: Callable[[], None] | None = None) -> bytes:
    """The Prometheus text format (0.0.4) of `registry`, byte for byte what
    `prometheus_client.generate_latest` writes, about three times faster: every name is escaped,
    every label set's order sorted, every `name="value"` pair and every value formatted once per
    render rather than once per sample."""
    metric_names: dict[str, str] = {}
    # label names in the order a label dict gives them -> (name, its pairs by value), sorted
    orders: dict[tuple[str, ...], tuple[tuple[str, dict[str, str]], ...]] = {}
    pairs: dict[str, dict[str, str]] = {}
    values: dict[float, str] = {0.0: _ZERO}

    def metric_name(name: str) -> str:
        escaped = metric_names[name] = escape_metric_name(name, UNDERSCORES)
        return escaped

    def order_of(keys: tuple[str, ...]) -> tuple[tuple[str, dict[str, str]], ...]:
        order = orders[keys] = tuple((k, pairs.setdefault(k, {})) for k in sorted(keys))
        return order

    def pair(k: str, v: str, by_value: dict[str, str]) -> str:
        text = by_value[v] = f'{escape_label_name(k, UNDERSCORES)}="{_escape_value(v)}"'
        return text

    def value_text(value: float) -> str:
        text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
        if len(values) < _MAX_CACHED_VALUES:
            values[value] = text
        return text

    def sample_line(s: Sample) -> str:
        labels = s.labels
        head = metric_names.get(s.name) or metric_name(s.name)
        if labels:
            keys = tuple(labels)
            parts = []
            for k, by_value in orders.get(keys) or order_of(keys):
                v = labels[k]
                parts.append(by_value.get(v) or pair(k, v, by_value))
            head += "{" + ",".join(parts) + "}"
        value = s.value
        text = values.get(value) or value_text(value)
        if text is _ZERO and math.copysign(1.0, value) < 0:  # 0.0 and -0.0 are one key
            text = "-0.0"
        if s.timestamp is not None:
            return f"{head} {text} {int(float(s.timestamp) * 1000):d}\n"
        return f"{head} {text}\n"

    output: list[str] = []
    for metric in registry.collect():
        try:
            kind = metric.type
            name = metric_name(metric.name + _NAME_SUFFIX.get(kind, ""))
            kind = _TYPES.get(kind, kind)
            output.append(f"# HELP {name} {_help_text(metric.documentation)}\n# TYPE {name} {kind}\n")
            om_samples: dict[str, list[str]] = {}
            prefix_len = len(metric.name)
            for n, s in enumerate(metric.samples, 1):
                suffix = s.name[prefix_len:]
                if suffix in _OM_SUFFIXES and s.name == metric.name + suffix:
                    om_samples.setdefault(suffix, []).append(sample_line(s))
                else:
                    output.append(sample_line(s))
                if pause is not None and not n % 256:
                    pause()
            if pause is not None:
                pause()
        except Exception as exception:
            exception.args = (*(exception.args or ("",)), metric)
            raise
        for suffix, lines in sorted(om_samples.items()):
            name = metric_name(metric.name + suffix)
            output.append(f"# HELP {name} {_help_text(metric.documentation)}\n# TYPE {name} gauge\n")
            output.extend(lines)
    return "".join(output).encode("utf-8")


class _GilShare:
    """While a render runs, the interpreter hands the GIL between threads every 0.5 ms instead
    of every 5 ms. The event loop gives up the GIL at every system call; with the default
    interval it then waits up to 5 ms to get it back from the rendering thread, for every
    message of every ext_proc stream. Measured with a 47 MB page: closed-loop p99 268 ms
    instead of 638 ms, and a third more throughput during the render."""

    INTERVAL_S = 0.0005

    def __init__(self) -> None:
        self._active = 0
        self._saved = sys.getswitchinterval()

    def enter(self) -> None:
        if self._active == 0:
            self._saved = sys.getswitchinterval()
            sys.setswitchinterval(min(self._saved, self.INTERVAL_S))
        self._active += 1

    def exit(self) -> None:
        self._active -= 1
        if self._active == 0:
            sys.setswitchinterval(self._saved)


_GIL_SHARE = _GilShare()


class _Throttle:
    """Called between slices of a render on its thread (every 256 samples and after each
    family): after each `slice_s` of work, sleep as long as the work took times `rest`, so the
    event loop has the GIL to itself at least that share of the time, whatever it needs it for.
    The pauses add at most `max_pause_s` to a render (Prometheus gives a scrape 10 s by
    default). Measured with 300 models' series (a 14 MB page) scraped every 5 s, ext_proc at 100
    requests/s: p99 109 ms instead of 680 ms without the pauses (11 ms with no scrape; 2.6 s when
    the page was rendered on the event loop); twice the pause gained nothing more: what remains
    is the collectors' own work, one family at a time."""

    def __init__(self, slice_s: float = 0.002, rest: float = 1.0, max_pause_s: float = 2.0) -> None:
        self.slice_s = slice_s
        self.rest = rest
        self.max_pause_s = max_pause_s
        self.paused_s = 0.0
        self._since = time.perf_counter()

    def __call__(self) -> None:
        worked = time.perf_counter() - self._since
        if worked >= self.slice_s and self.paused_s < self.max_pause_s:
            pause = min(worked * self.rest, self.max_pause_s - self.paused_s)
            time.sleep(pause)
            self.paused_s += pause
            self._since = time.perf_counter()


def _render(registry: Collector, compress: bool) -> bytes:
    body = render_text(registry, _Throttle())
    return gzip.compress(body, compresslevel=1) if compress else body


# -- the server ------------------------------------------------------------------------------------


class MetricsServer:
    """aiohttp serving `registry` at GET /metrics, behind `auth` and `tls` when given."""

    def __init__(
        self,
        registry: CollectorRegistry,
        bind_address: str,
        port: int,
        *,
        auth: MetricsAuth | None = None,
        tls: MetricsTls | None = None,
        cert_check_interval_s: float = 10.0,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.registry = registry
        self.bind_address = bind_address
        self.port = port
        self.auth = auth
        self.tls = tls
        self.cert_check_interval_s = cert_check_interval_s
        self._supervisor = supervisor
        self._runner: web.AppRunner | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._renders: dict[bool, asyncio.Future[bytes]] = {}  # in progress, by gzip or not
        self.renders = 0  # pages rendered (scrapes that shared one count once)

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.auth is not None:
            refused = await self.auth.check(
                request.headers.get("Authorization"), request.method.lower(), request.path
            )
            if refused is not None:
                return web.Response(status=refused.status, text=refused.text + "\n")
        compress = "gzip" in request.headers.get("Accept-Encoding", "").lower()
        body = await self.render(compress)
        headers = {"Content-Type": CONTENT_TYPE_LATEST}
        if compress:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    async def render(self, compress: bool = False) -> bytes:
        """The page, rendered on a worker thread; a scrape arriving during a render shares it."""
        pending = self._renders.get(compress)
        if pending is None:
            _GIL_SHARE.enter()
            pending = asyncio.ensure_future(asyncio.to_thread(_render, self.registry, compress))
            self._renders[compress] = pending
            self.renders += 1

            def done(_: asyncio.Future[bytes]) -> None:
                self._renders.pop(compress, None)
                _GIL_SHARE.exit()

            pending.add_done_callback(done)
        return await asyncio.shield(pending)

    async def start(self) -> int:
        """Listen; returns the bound port."""
        http = web.Application()
        http.router.add_get(METRICS_PATH, self._metrics)
        # At stop, a scrape still being answered gets this long (aiohttp's default is 60 s, which
        # would hold epp's exit that far past --drain-timeout).
        runner = web.AppRunner(http, access_log=None, shutdown_timeout=METRICS_STOP_GRACE_S)
        await runner.setup()
        site = web.TCPSite(
            runner, self.bind_address, self.port, ssl_context=self.tls.context if self.tls else None
        )
        await site.start()
        self._runner = runner
        if self.tls is not None:
            tls = self.tls
            self._watcher = (self._supervisor or current_supervisor()).spawn(
                "metrics-certificate-watcher", lambda: self._watch_certificate(tls), detail=str(tls.cert_dir)
            )
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def _watch_certificate(self, tls: MetricsTls) -> None:
        while True:
            await asyncio.sleep(self.cert_check_interval_s)
            tls.reload_if_changed()

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
