"""Poll each endpoint's /metrics and swap in a fresh EndpointMetrics snapshot.

One asyncio task per endpoint, started and stopped as the datastore changes, each under the
supervisor (epp.supervision: an unexpected exception is logged, counted and the poller restarted).
A failed poll keeps the last snapshot (its `updated_at` does not advance, so the endpoint ages
into staleness) and counts the error.

One model server cannot stall the others, nor the request path: each endpoint has one keep-alive
connection (`epp.datalayer.metrics_client`, a lean HTTP/1.1 client: a poll is one write and one
callback a socket read), and a page is handed as it arrives to a `PageReader`, which parses only
the lines of the families read (the rest is never decoded or kept), so the event loop runs other
work between reads and memory stays small whatever the page. Limits: `max_bytes` per page (a declared
Content-Length past it is refused unread; an undeclared one is cut there), the `timeout_s` of
the whole poll (reading and parsing), 64 kB per wanted line and 10,000 wanted samples. A page
past a limit is an error like any other, and that endpoint is then polled less often: after 1 s,
doubling up to 30 s, until a poll succeeds. A large page that is within the limits is paced so
that one endpoint is read at most at 16 MiB/s (a page of 1.6 MB at most ten times a second).

With `idle_interval_s` (--idle-refresh-metrics-interval, opt-in; 0, the default, polls every
endpoint at the base interval as the Go EPP does) an idle endpoint is polled less often: one whose
last page said no request waiting and none running, to which epp has no request in flight. Its
values cannot change unless another client sends it work, and the interval is kept below the
staleness threshold, so it never goes stale; as soon as epp routes a request to it (its in-flight
count rises) it is polled again at the base interval, within one base interval. The cost: work
another client (another epp replica, direct traffic) sends to an idle endpoint is seen up to one
idle interval late. The gain: at 100 idle pods with vLLM's 59 kB pages the base interval is 2,000
pages a second for nothing.

While the event loop's thread is busy (a large pool, or requests near epp's capacity), every
interval is stretched, never past `max_interval_s` (half the staleness threshold), and shrinks
back once the loop has room (`epp.datalayer.pacing.PollPacer`): one loop serves the requests and
the polls, and the polls yield.

Where and how a page is read (`ScrapeConfig`) comes, as in the Go EPP, from built-in defaults,
then the `--model-server-metrics-*` flags, then the config's `metrics-data-source` parameters
(the highest wins); which series are read, per engine, from the `core-metrics-extractor`
parameters and the `*-metric` flags (`model_server_metrics.build_engine_table`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from epp.datalayer.datastore import Datastore
from epp.datalayer.metrics_client import MetricsConnection, connect, request_bytes
from epp.datalayer.model_server_metrics import (
    DEFAULT_ENGINES,
    EngineTable,
    MetricOverrides,
    PageLimitError,
    PageReader,
    build_engine_table,
)
from epp.datalayer.pacing import PollPacer
from epp.errors import MetricsParseError
from epp.framework import Endpoint
from epp.supervision import Supervisor, current_supervisor

log = logging.getLogger(__name__)

SCHEMES = ("http", "https")

# Largest page read (--model-server-metrics-max-bytes): vLLM's is about 43 kB for one model and
# 300 kB with eight data-parallel engines; this leaves room for a Triton serving many models.
DEFAULT_MAX_PAGE_BYTES = 16 * 1024 * 1024
# After a page past a limit: wait this long before the next poll, doubling up to the cap.
LIMIT_BACKOFF_S = 1.0
LIMIT_BACKOFF_MAX_S = 30.0
# One endpoint's pages are read at most at this rate: a large page is polled less often.
PACE_BYTES_PER_S = 16 * 1024 * 1024


@runtime_checkable
class MetricsSourceParams(Protocol):
    """What a metrics data-source plugin (the Go type `metrics-data-source`) was configured with.
    None: not given in the config (the flag, else the default, applies)."""

    scheme: str | None
    path: str | None
    port: int | None
    insecure_skip_verify: bool | None
    ca_cert_path: str | None
    client_cert_path: str | None
    client_key_path: str | None
    interval_s: float | None


@runtime_checkable
class MetricsExtractorParams(Protocol):
    """What a metrics extractor plugin (the Go type `core-metrics-extractor`) was configured with:
    the engine label, the default engine (None: vllm), and `engineConfigs` entries in Go's field
    names."""

    engine_label_key: str | None
    default_engine: str | None
    engine_configs: Sequence[Mapping[str, Any]]


def engines_of(
    extractor: MetricsExtractorParams | None, overrides: MetricOverrides | None = None
) -> EngineTable:
    """The engine table an extractor's parameters and the `*-metric` flags describe. Raises
    ValueError."""
    if extractor is None:
        if overrides is None or not overrides.given():
            return DEFAULT_ENGINES
        return build_engine_table(overrides=overrides)
    return build_engine_table(
        extractor.engine_configs, extractor.default_engine, extractor.engine_label_key, overrides
    )


@dataclass(frozen=True)
class ScrapeConfig:
    """Where and how each model server's metrics page is read, and which series hold what."""

    path: str = "/metrics"
    scheme: str = "http"
    port: int | None = None  # None: the endpoint's own port
    https_insecure_skip_verify: bool = True
    ca_cert_path: str | None = None  # PEM bundle to verify the server with (ignored when skipping)
    client_cert_path: str | None = None  # mTLS: a client certificate and its key, both or neither
    client_key_path: str | None = None
    interval_s: float | None = None  # None: the scraper's own interval (--refresh-metrics-interval)
    engines: EngineTable = DEFAULT_ENGINES

    def url(self, ep: Endpoint) -> str:
        host = (
            ep.key
            if self.port is None
            else f"[{ep.address}]:{self.port}"
            if ":" in ep.address
            else f"{ep.address}:{self.port}"
        )
        return f"{self.scheme}://{host}{self.path}"

    def target(self, ep: Endpoint) -> tuple[str, int]:
        """The host and port an endpoint's page is read from."""
        return ep.address, self.port if self.port is not None else ep.port

    def with_source(
        self,
        source: MetricsSourceParams | None,
        extractor: MetricsExtractorParams | None = None,
        overrides: MetricOverrides | None = None,
    ) -> ScrapeConfig:
        """This config (the flags' values) with what the config's data source and extractor set
        on top. Raises ValueError for an unusable result (bad scheme, a bad metric spec, a
        certificate that cannot be loaded)."""
        changes: dict[str, Any] = {"engines": engines_of(extractor, overrides)}
        if source is not None:
            given = {
                "scheme": source.scheme,
                "path": source.path,
                "port": source.port,
                "https_insecure_skip_verify": source.insecure_skip_verify,
                "ca_cert_path": source.ca_cert_path,
                "client_cert_path": source.client_cert_path,
                "client_key_path": source.client_key_path,
                "interval_s": source.interval_s,
            }
            changes.update({k: v for k, v in given.items() if v is not None})
        config = replace(self, **changes)
        config.check()
        return config

    def check(self) -> None:
        """Raise ValueError when this config cannot be used."""
        if self.scheme not in SCHEMES:
            raise ValueError(f"unsupported scheme {self.scheme!r} (use http or https)")
        if not self.path.startswith("/"):
            raise ValueError(f"path {self.path!r} must start with /")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"invalid port {self.port}: must be between 1 and 65535")
        if self.interval_s is not None and self.interval_s < 0:
            raise ValueError(f"interval must not be negative, got {self.interval_s}s")
        self.ssl_context()

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS settings of an https scrape (None for http), as the Go data source builds
        them: the system CAs or `ca_cert_path`, no verification at all when
        `https_insecure_skip_verify`, and a client certificate for mTLS. Raises ValueError."""
        if self.scheme != "https":
            return None
        if bool(self.client_cert_path) != bool(self.client_key_path):
            raise ValueError("clientCertPath and clientKeyPath go together")
        try:
            if self.https_insecure_skip_verify:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            else:
                context = ssl.create_default_context(cafile=self.ca_cert_path or None)
            if self.client_cert_path and self.client_key_path:
                context.load_cert_chain(self.client_cert_path, self.client_key_path)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the scrape TLS files: {exc}") from None
        return context


@dataclass
class _PollState:
    limit_failures: int = 0  # pages past a limit in a row
    last_bytes: int = 0  # the size of the last page read
    # Where each family read was in the last page: the next poll looks there first (PageReader).
    hints: dict[bytes, int] = field(default_factory=dict)


class Scraper:
    def __init__(
        self,
        datastore: Datastore,
        interval_s: float,
        config: ScrapeConfig | None = None,
        timeout_s: float = 1.0,
        on_error: Callable[[Endpoint], None] | None = None,
        max_bytes: int = DEFAULT_MAX_PAGE_BYTES,
        supervisor: Supervisor | None = None,
        idle_interval_s: float = 0.0,
        max_interval_s: float | None = None,
    ) -> None:
        self._datastore = datastore
        self.config = config or ScrapeConfig()
        self._interval = interval_s
        if self.config.interval_s:
            # The Go data layer rounds a source's interval to a multiple of its base tick.
            self._interval = max(1, round(self.config.interval_s / interval_s)) * interval_s
        # Polls stretched while the event loop is busy, up to `max_interval_s` (None: never).
        self.pacer = PollPacer(self._interval, max_interval_s or self._interval)
        self._timeout_s = timeout_s
        self._on_error = on_error
        self.max_bytes = max_bytes
        self._supervisor = supervisor
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._state: dict[str, _PollState] = {}
        # Idle endpoints (see the module's doc) wait on a future the waker sets, or the idle interval.
        self.idle_interval_s = idle_interval_s if idle_interval_s > self._interval else 0.0
        self._idle_waits: dict[str, tuple[Endpoint, asyncio.Future[None]]] = {}
        self._waker: asyncio.Task[None] | None = None
        # One keep-alive connection per endpoint (opened by its first poll, dropped after an error).
        self._connections: dict[str, MetricsConnection] = {}
        self._started = False
        self._ssl: ssl.SSLContext | None = None
        self._clock: Callable[[], float] | None = None  # the loop's clock, once started
        datastore.subscribe(self._start, self._stop)

    async def start(self) -> None:
        self._ssl = self.config.ssl_context()
        self._clock = asyncio.get_running_loop().time
        self._started = True
        if self._supervisor is None:
            self._supervisor = current_supervisor()
        for ep in self._datastore.endpoints():
            self._start(ep)
        if self.idle_interval_s:
            self._waker = self._supervisor.spawn("scraper-waker", self._wake_busy)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        if self._waker is not None:
            tasks.append(self._waker)
            self._waker = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()
        self._started = False

    def _start(self, ep: Endpoint) -> None:
        if not self._started or self._supervisor is None or ep.key in self._tasks:
            return  # not started yet: start() picks up every endpoint
        self._tasks[ep.key] = self._supervisor.spawn("scraper", lambda: self._poll_forever(ep), detail=ep.key)

    def _stop(self, ep: Endpoint) -> None:
        task = self._tasks.pop(ep.key, None)
        self._state.pop(ep.key, None)
        connection = self._connections.pop(ep.key, None)
        if connection is not None:
            connection.close()
        if task is not None:
            task.cancel()

    async def _read(self, ep: Endpoint, reader: PageReader, deadline: float) -> None:
        """One page of `ep` into `reader` by `deadline` (the loop's clock), over its kept-alive
        connection (a new one if it has none or the last one failed). Raises OSError,
        TimeoutError, MetricsParseError."""
        connection = self._connections.get(ep.key)
        host, port = self.config.target(ep)
        if connection is None or connection.closed:
            async with asyncio.timeout_at(deadline):
                connection = await connect(host, port, self._ssl)
            self._connections[ep.key] = connection
        try:
            await connection.get(
                request_bytes(host, port, self.config.path), reader, self.max_bytes, deadline
            )
        except BaseException:
            connection.close()  # mid-answer: the connection cannot be reused
            if self._connections.get(ep.key) is connection:
                del self._connections[ep.key]
            raise

    async def scrape_once(self, ep: Endpoint) -> bool:
        """One poll (reading and parsing within the scrape timeout). True when a fresh snapshot
        was stored."""
        url = self.config.url(ep)
        state = self._state.setdefault(ep.key, _PollState())
        reader = PageReader(self.config.engines.for_labels(ep.labels), hints=state.hints)
        try:
            clock = self._clock or asyncio.get_running_loop().time
            await self._read(ep, reader, clock() + self._timeout_s)
            ep.metrics = reader.finish(time.monotonic())
            ep.scrape_errors = 0  # failures in a row: the next outage is logged again at once
            state.limit_failures = 0
            return True
        except asyncio.CancelledError:
            raise
        except (OSError, TimeoutError, MetricsParseError) as exc:  # ssl.SSLError is an OSError
            ep.scrape_errors += 1
            if isinstance(exc, PageLimitError):
                state.limit_failures += 1
            if self._on_error is not None:
                self._on_error(ep)
            # Log the first failure of an outage and then rarely, not at 20 Hz.
            if ep.scrape_errors == 1 or ep.scrape_errors % 200 == 0:
                reason = str(exc) or (
                    f"no complete answer within {self._timeout_s}s"
                    if isinstance(exc, TimeoutError)
                    else type(exc).__name__
                )
                log.warning("scrape of %s failed (%d in a row): %s", url, ep.scrape_errors, reason)
            return False
        finally:
            state.last_bytes = reader.bytes_read

    def next_delay(self, ep: Endpoint) -> float:
        """How long after the start of its last poll an endpoint is polled again."""
        state = self._state.get(ep.key)
        if state is None:
            return self.pacer.interval_s
        if state.limit_failures:
            return min(LIMIT_BACKOFF_MAX_S, LIMIT_BACKOFF_S * 2.0 ** (state.limit_failures - 1))
        return max(self.pacer.interval_s, state.last_bytes / PACE_BYTES_PER_S)

    async def _poll_forever(self, ep: Endpoint) -> None:
        loop = asyncio.get_running_loop()
        pacer = self.pacer
        while True:
            started = loop.time()
            await self.scrape_once(ep)
            pacer.tick(loop.time())  # polls stretched while the loop is busy (epp.datalayer.pacing)
            await asyncio.sleep(max(0.0, self.next_delay(ep) - (loop.time() - started)))
            if self.idle(ep):
                await self._idle_wait(ep, started + self.idle_interval_s - loop.time())

    def idle(self, ep: Endpoint) -> bool:
        """Polled every idle interval rather than every base interval (see the module's doc)."""
        m = ep.metrics
        return (
            self.idle_interval_s > 0
            and m.updated_at > 0
            and not ep.scrape_errors
            and m.waiting_queue_size == 0
            and m.running_requests == 0
            and ep.inflight_requests == 0
        )

    async def _idle_wait(self, ep: Endpoint, seconds: float) -> None:
        if seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(seconds, _resolve, wake)
        self._idle_waits[ep.key] = (ep, wake)
        try:
            await wake
        finally:
            timer.cancel()
            if self._idle_waits.get(ep.key, (None, None))[1] is wake:
                del self._idle_waits[ep.key]

    async def _wake_busy(self) -> None:
        """Every base interval: wake the idle endpoints epp has since sent a request to."""
        while True:
            await asyncio.sleep(self._interval)
            for ep, wake in list(self._idle_waits.values()):
                if ep.inflight_requests:
                    _resolve(wake)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
