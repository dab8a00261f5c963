"""Poll each endpoint's /metrics and swap in a fresh EndpointMetrics snapshot.

One task, the ticker, under the supervisor (epp.supervision): it starts each endpoint's poll that
is due, a slice of at most TICK_SLICE endpoints a tick with the ticks spread over the interval
(IDLE_TICK_SLICE while epp has no request in flight), and between ticks wakes only to time out a
poll at its deadline. A
poll is a write on the endpoint's keep-alive connection (`epp.datalayer.metrics_client`, a lean
HTTP/1.1 client) and, when the answer arrives, a callback that stores the snapshot: no task,
future or timer an endpoint, which is most of what polling costs on the loop (a connection is
opened by a short task of its own). An unexpected error in a poll's callback is logged and
counted by the supervisor, and polling goes on; an error in the ticker restarts it. A failed poll
keeps the last snapshot (its `updated_at` does not advance, so the endpoint ages into staleness)
and counts the error.

What a poll asks for: only the families the endpoint's engine mapping reads (`?name[]=...`,
which prometheus-client honours on its default registry, as vLLM serves it; 1.3 kB of vLLM's 59 kB page),
once a whole page and then one filtered page have shown that the server answers it with every
family the whole page has. A server that does not (an error status, an empty page, a family
missing) is read whole; both verdicts are checked again every FILTER_RECHECK_S
(`only_read_families=False`, --model-server-metrics-only-read-families=false: always whole, as the
Go EPP). A page of at most 16 kB that is byte for byte the endpoint's last one is not parsed again
(`RepeatAwareReader`), only stamped with the new time: an idle server's filtered page. An answer
that is byte for byte the connection's last one (an idle vLLM's, until its Date header moves a
second later) is not even framed again (`MetricsConnection`), nor handed to the reader when the
endpoint stored what that page reads as (`_finished` with `repeated`: the snapshot is stamped
with the new time).

One model server cannot stall the others, nor the request path: a page is handed as it arrives
to a `PageReader`, which parses only the lines of the families read (the rest is never decoded
or kept), so the event loop runs other work between reads and memory stays small whatever the
page; the ticker polls at most TICK_SLICE endpoints a tick (IDLE_TICK_SLICE and IDLE_TICK_BYTES
without requests in flight), the ticks spread over the interval. Limits:
`max_bytes` per page (a declared Content-Length past it is refused unread; an undeclared one is
cut there), the `timeout_s` of the whole poll (reading and parsing), 64 kB per wanted line and
10,000 wanted samples. A page past a limit is an error like any other, and that endpoint is then
polled less often: after 1 s, doubling up to 30 s, until a poll succeeds. A large page that is
within the limits is paced so that one endpoint is read at most at 16 MiB/s (a page of 1.6 MB at
most ten times a second).

With `idle_interval_s` (--idle-refresh-metrics-interval, opt-in; 0, the default, polls every
endpoint at the base interval as the Go EPP does) an idle endpoint is polled less often: one whose
last page said no request waiting and none running, to which epp has no request in flight. Its
values cannot change unless another client sends it work, and the interval is kept below the
staleness threshold, so it never goes stale; as soon as epp routes a request to it (its in-flight
count rises) it is polled again at the next tick. The cost: work another client (another epp
replica, direct traffic) sends to an idle endpoint is seen up to one idle interval late.

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
import math
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol, runtime_checkable

from epp.datalayer.datastore import Datastore
from epp.datalayer.metrics_client import MetricsConnection, connect, request_bytes
from epp.datalayer.model_server_metrics import (
    DEFAULT_ENGINES,
    EngineTable,
    HttpStatusError,
    LastPage,
    MetricNames,
    MetricOverrides,
    NoValuesError,
    PageLimitError,
    RepeatAwareReader,
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
# The most endpoints one tick polls while epp has requests in flight: 100 endpoints are polled in
# 7 ticks spread over the interval.
# Their answers come back together and run one after another on the loop: a request arriving
# then waits for them (docs/performance.md, eleventh round).
TICK_SLICE = 16
# ... while epp has no request in flight: then what waits on the loop is at most a request just
# arriving (or one flow control holds back: it is not in flight yet), and fewer, larger ticks cost
# less (one wake-up of the loop a tick, and the answers batched): 100 idle pods' small pages in
# one tick take about a quarter less CPU than in seven. Not large pages, though: 100 whole vLLM
# pages at once cost more than in slices, and held the loop for up to 19 ms, so an idle tick also
# stops at IDLE_TICK_BYTES of the endpoints' last pages (twelfth round of docs/performance.md).
IDLE_TICK_SLICE = 128
IDLE_TICK_BYTES = 1024 * 1024
# A timer may fire up to a millisecond early (libuv's timers, uvloop's, count whole milliseconds):
# a wake-up this close to its time is on time, not a reason to sleep again for the rest.
TIMER_SLACK_S = 0.002
# How often an endpoint's `name[]` answers are checked against its whole page again.
FILTER_RECHECK_S = 300.0


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
    # Ask for the families read alone (`name[]`), once the server is seen to honour it.
    only_read_families: bool = True

    def url(self, ep: Endpoint) -> str:
        host = (
            ep.key
            if self.port is None
            else f"[{ep.address}]:{self.port}"
            if ":" in ep.address
            else f"{ep.address}:{self.port}"
        )
        return f"{self.scheme}://{host}{self.path}"

    def request_path(self, names: MetricNames, filtered: bool) -> str:
        """The path a poll asks for: with `filtered`, only the families `names` reads."""
        if not filtered:
            return self.path
        return f"{self.path}{'&' if '?' in self.path else '?'}{names.families_query}"

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


@dataclass(eq=False)
class _PollState:
    ep: Endpoint
    limit_failures: int = 0  # pages past a limit in a row
    last_bytes: int = 0  # the size of the last page read
    # Where each family read was in the last page: the next poll looks there first (PageReader).
    hints: dict[bytes, int] = field(default_factory=dict)
    started: float = -math.inf  # when the last poll started (the loop's clock)
    due: float = -math.inf  # when the next poll is due (idle endpoints: see Scraper._due)
    deadline: float = 0.0  # when the poll in flight times out
    in_flight: bool = False
    by_caller: bool = False  # the poll in flight is scrape_once's, which keeps its own deadline
    connecting: asyncio.Task[None] | None = None  # opening the connection for the poll in flight
    last_page: LastPage = field(default_factory=LastPage)  # a repeated small page is not parsed
    # The reader of every poll (reset for each: nothing made per poll) and its callbacks.
    reader: RepeatAwareReader | None = None
    on_done: Callable[[BaseException | None], None] | None = None
    on_repeat: Callable[[], None] | None = None
    # The last poll stored what `last_page` read as, and the next asks the same (unless a filter
    # recheck moves it on, which clears this; `_send` also checks the engine mapping): an answer
    # byte for byte the connection's last needs no reading (`MetricsConnection.start`'s on_repeat).
    repeatable: bool = False
    # The labels the reader's engine mapping was chosen for (the datastore replaces them whole on
    # a change), and the last GET built: (mapping, filtered, the request's bytes).
    labels: Mapping[str, str] | None = None
    request: tuple[MetricNames, bool, bytes] | None = None
    # Asking for the families read alone (`name[]`): a whole page first (WHOLE), then one
    # filtered page (TRIAL) that must hold every family the whole one had; then FILTERED, or
    # WHOLE_ONLY. Both are checked again from WHOLE every FILTER_RECHECK_S (the model server may
    # have been replaced), and a FILTERED poll the server refuses goes back to WHOLE at once.
    filtering: int = 0
    families: frozenset[str] = frozenset()  # the families the whole page had
    filter_refused_noted: bool = False
    filter_recheck_at: float = 0.0  # FILTERED, WHOLE_ONLY: when to check again


WHOLE, TRIAL, FILTERED, WHOLE_ONLY = 0, 1, 2, 3


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
        requests_in_flight: Callable[[], int] | None = None,
    ) -> None:
        self._datastore = datastore
        # epp's requests in flight (the in-flight ledger's count): none, and a tick polls more.
        self._requests_in_flight = requests_in_flight
        self._page_bytes = 0  # the polled endpoints' last pages, summed once a round of ticks
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
        self._state: dict[str, _PollState] = {}  # every endpoint polled, by the ticker or scrape_once
        self._polled: dict[str, _PollState] = {}  # the datastore's endpoints, which the ticker polls
        self._ticker: asyncio.Task[None] | None = None
        self._order: list[_PollState] | None = None  # the ticker's order of _polled (None: redo)
        self._flying: set[_PollState] = set()  # the ticker's polls in flight
        self.idle_interval_s = idle_interval_s if idle_interval_s > self._interval else 0.0
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
        self._ticker = self._supervisor.spawn("scraper", self._tick_forever)

    async def close(self) -> None:
        self._started = False  # the polls in flight end with their connections, uncounted
        tasks = [s.connecting for s in self._state.values() if s.connecting is not None]
        if self._ticker is not None:
            tasks.append(self._ticker)
            self._ticker = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()
        self._polled.clear()
        self._flying.clear()
        self._order = None
        for state in self._state.values():
            state.in_flight, state.connecting = False, None

    def polled(self) -> frozenset[str]:
        """The keys of the endpoints the ticker polls (the datastore's, once started)."""
        return frozenset(self._polled)

    def _start(self, ep: Endpoint) -> None:
        if not self._started or ep.key in self._polled:
            return  # not started yet: start() picks up every endpoint
        state = self._state.get(ep.key)
        if state is None or state.ep is not ep:
            state = self._state[ep.key] = _PollState(ep)
        self._polled[ep.key] = state
        self._order = None

    def _stop(self, ep: Endpoint) -> None:
        self._polled.pop(ep.key, None)
        self._order = None
        state = self._state.pop(ep.key, None)
        if state is not None:
            self._flying.discard(state)
        if state is not None and state.connecting is not None:
            state.connecting.cancel()
        connection = self._connections.pop(ep.key, None)
        if connection is not None:
            connection.close()  # a poll in flight ends with it (its answer is ignored)

    # --- the ticker: every endpoint's polls, from one task ------------------------------------

    async def _tick_forever(self) -> None:
        """Start each endpoint's poll that is due, a slice of the endpoints at a time, the slices
        spread over the interval; between ticks, wake only to time out a poll at its deadline.

        A poll is a write, and its answer a callback (`MetricsConnection.start`): no task,
        future or timer an endpoint, and one wake-up of the loop for a slice, which is most of
        what polling costs (docs/performance.md). While requests are in flight, slices of at
        most TICK_SLICE endpoints bound the burst a tick makes: their answers come back
        together, and the loop runs them one after another before anything else (a request)
        gets a turn. Without any, IDLE_TICK_SLICE: fewer wake-ups."""
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        turn = 0
        while True:
            now = loop.time()
            soonest = math.inf  # the earliest deadline of a poll in flight
            for state in list(self._flying):
                if state.in_flight and not state.by_caller and state.connecting is None:
                    if now >= state.deadline - TIMER_SLACK_S:
                        self._expire(state)
                    else:
                        soonest = min(soonest, state.deadline)
            if now >= next_tick - TIMER_SLACK_S:
                if self._order is None:
                    self._order = list(self._polled.values())
                slices = self._slices(len(self._order))
                turn = (turn + 1) % slices
                if turn == 0:
                    self._page_bytes = sum(state.last_bytes for state in self._order)
                for state in self._order[turn::slices]:  # rebuilt whenever _polled changes
                    if not state.in_flight and self._due(state, now):
                        self._begin(state, now)
                        soonest = min(soonest, state.deadline)
                self.pacer.tick(loop.time())  # polls stretched while the loop is busy (pacing.py)
                next_tick = max(next_tick + self.pacer.interval_s / slices, loop.time())
            await asyncio.sleep(min(next_tick, soonest) - loop.time())

    def _slices(self, endpoints: int) -> int:
        """How many ticks share the endpoints' polls in an interval (see TICK_SLICE)."""
        if self._requests_in_flight is None or self._requests_in_flight():
            return max(1, math.ceil(endpoints / TICK_SLICE))
        return max(1, math.ceil(endpoints / IDLE_TICK_SLICE), math.ceil(self._page_bytes / IDLE_TICK_BYTES))

    def _due(self, state: _PollState, now: float) -> bool:
        if now < state.due:
            return False
        if self.idle_interval_s and self.idle(state.ep):
            return now >= state.started + self.idle_interval_s - self.pacer.interval_s / 2
        return True

    def _schedule(self, state: _PollState) -> None:
        """After a poll: when the next is due. Half a tick early rather than a whole tick late:
        ticks and due times never align."""
        state.due = state.started + self._delay(state) - self.pacer.interval_s / 2

    def _begin(self, state: _PollState, now: float) -> None:
        ep = state.ep
        state.in_flight, state.started, state.deadline = True, now, now + self._timeout_s
        self._flying.add(state)
        reader = self._reader(state)
        connection = self._connections.get(ep.key)
        if connection is None or connection.closed:
            state.connecting = asyncio.get_running_loop().create_task(self._connect_then_poll(state, reader))
            return
        self._send(state, connection, reader)

    async def _connect_then_poll(self, state: _PollState, reader: RepeatAwareReader) -> None:
        """A poll that must open its connection first: a task of its own (only after an error or
        at the start), with its own deadline."""
        error: BaseException | None = None
        try:
            await self._fetch(state, reader, state.deadline)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure ends the poll: _record sorts them
            error = exc
        self._finished(state, reader, error)

    async def _fetch(self, state: _PollState, reader: RepeatAwareReader, deadline: float) -> None:
        """One page into `reader` by `deadline`, as a coroutine, over the endpoint's connection
        (opened first if it has none). Raises OSError, TimeoutError, MetricsParseError."""
        connection = self._connections.get(state.ep.key)
        if connection is None or connection.closed:
            connection = await self._connect(state.ep, deadline)
        await connection.get(self._request(state, reader.names), reader, self.max_bytes, deadline)

    def _send(self, state: _PollState, connection: MetricsConnection, reader: RepeatAwareReader) -> None:
        on_done = state.on_done
        assert on_done is not None and state.reader is reader  # _reader made both for this poll
        request = self._request(state, reader.names)  # first: it may end `repeatable`
        repeat = state.on_repeat if state.repeatable and state.last_page.names is reader.names else None
        try:
            connection.start(request, reader, self.max_bytes, on_done, repeat)
        except ConnectionError as exc:
            self._finished(state, reader, exc)

    def _expire(self, state: _PollState) -> None:
        connection = self._connections.get(state.ep.key)
        if connection is not None and connection.busy:
            connection.expire()  # -> _finished with TimeoutError
        else:
            self._finished(state, None, TimeoutError())

    def _finished(
        self,
        state: _PollState,
        reader: RepeatAwareReader | None,
        error: BaseException | None,
        repeated: bool = False,
    ) -> None:
        """A poll's end, from the connection's callback: store the snapshot or count the error;
        `repeated` (the connection's on_repeat), the answer was byte for byte the last one, whose
        page this endpoint stored: the same values, stamped with the new time (an idle server's
        poll). An unexpected error (a bug) is logged and counted by the supervisor, and polling
        goes on."""
        state.in_flight, state.connecting = False, None
        self._flying.discard(state)
        if not self._started or self._state.get(state.ep.key) is not state:
            return  # closing, or the endpoint left the pool meanwhile
        try:
            if repeated:
                last = state.last_page.metrics
                assert last is not None  # `repeatable`: the last poll stored it
                state.ep.metrics = last.stamped(time.monotonic())
            else:
                self._record(state, reader, error)
        except Exception as exc:  # supervised: logged, counted, recovered
            state.repeatable = False
            state.ep.scrape_errors += 1
            if self._supervisor is not None:
                self._supervisor.failed("scraper", exc, detail=state.ep.key)
        self._schedule(state)

    # --- one poll ------------------------------------------------------------------------------

    def _reader(self, state: _PollState) -> RepeatAwareReader:
        reader, labels = state.reader, state.ep.labels
        if reader is not None and labels is state.labels:
            names = reader.names
        else:
            names, state.labels = self.config.engines.for_labels(labels), labels
        if reader is not None and reader.names is names:
            reader.reset()
            return reader
        reader = state.reader = RepeatAwareReader(names, state.last_page, hints=state.hints)
        state.on_done = partial(self._finished, state, reader)
        state.on_repeat = state.on_repeat or partial(self._finished, state, None, None, True)
        return reader

    def _request(self, state: _PollState, names: MetricNames) -> bytes:
        """The GET of the endpoint's next poll (see `_PollState.filtering`), for the engine
        mapping `names` the poll reads (labels change in place: it may differ from the last)."""
        if state.filtering >= FILTERED and state.started >= state.filter_recheck_at:
            state.filtering, state.repeatable = WHOLE, False
        filtered = state.filtering in (TRIAL, FILTERED)
        cached = state.request
        if cached is not None and cached[0] is names and cached[1] is filtered:
            return cached[2]
        host, port = self.config.target(state.ep)
        request = request_bytes(host, port, self.config.request_path(names, filtered))
        state.request = (names, filtered, request)
        return request

    async def _connect(self, ep: Endpoint, deadline: float) -> MetricsConnection:
        """A new kept-alive connection to `ep`'s metrics server, open by `deadline`. Raises
        OSError, TimeoutError."""
        host, port = self.config.target(ep)
        async with asyncio.timeout_at(deadline):
            connection = await connect(host, port, self._ssl)
        self._connections[ep.key] = connection
        return connection

    async def scrape_once(self, ep: Endpoint) -> bool:
        """One poll now (reading and parsing within the scrape timeout), after any poll of the
        ticker's in flight. True when a fresh snapshot was stored."""
        state = self._state.get(ep.key)
        if state is None or state.ep is not ep:
            state = self._state[ep.key] = _PollState(ep)
        clock = self._clock or asyncio.get_running_loop().time
        while state.in_flight:
            await asyncio.sleep(0.005)
        state.in_flight, state.by_caller, state.started = True, True, clock()
        reader = self._reader(state)
        error: BaseException | None = None
        try:
            await self._fetch(state, reader, state.started + self._timeout_s)
        except (OSError, TimeoutError, MetricsParseError) as exc:  # ssl.SSLError is an OSError
            error = exc
        finally:
            state.in_flight = state.by_caller = False
        stored = self._record(state, reader, error)
        self._schedule(state)
        return stored

    def _record(
        self, state: _PollState, reader: RepeatAwareReader | None, error: BaseException | None
    ) -> bool:
        """Store what a poll read, or count its error. True when a fresh snapshot was stored."""
        ep = state.ep
        state.repeatable = False
        try:
            if error is not None:
                raise error
            assert reader is not None
            metrics = reader.finish(time.monotonic())
            filtered = state.filtering == FILTERED or not self.config.only_read_families
            if not filtered and not self._filter_checked(state, reader):
                return False
            ep.metrics = metrics
            if ep.scrape_errors:
                ep.scrape_errors = 0  # failures in a row: the next outage is logged again at once
            state.limit_failures = 0
            # The next poll asks the same (unless the filter's check moved it on): a repeat of
            # this answer reads as this snapshot.
            state.repeatable = filtered and reader.remembered
            return True
        except MetricsParseError as exc:
            if state.filtering == TRIAL and _refuses_filter(exc):
                self._filter_refused(state, str(exc))
                return False
            if state.filtering == FILTERED and _refuses_filter(exc):
                state.filtering = WHOLE  # a new server? Its whole page next, and the check again
            return self._failed(state, exc)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            return self._failed(state, exc)
        finally:
            if reader is not None:
                state.last_bytes = reader.bytes_read

    def _filter_checked(self, state: _PollState, reader: RepeatAwareReader) -> bool:
        """After a good page while the filter is not yet in use: move the endpoint on (see
        `_PollState.filtering`). False when this page must not be stored: a filtered page that
        lacks a family the whole page had."""
        if state.filtering == WHOLE:
            state.families, state.filtering = reader.found(), TRIAL
        elif state.filtering == TRIAL:
            missing = state.families - reader.found()
            if missing:
                self._filter_refused(state, "it lacks " + ", ".join(sorted(missing)))
                return False
            state.filtering = FILTERED
            state.filter_recheck_at = state.started + FILTER_RECHECK_S
        return True

    def _filter_refused(self, state: _PollState, why: str) -> None:
        """The server does not honour `name[]` as asked: whole pages until FILTER_RECHECK_S from
        now (logged once an endpoint; not a failed poll: the next poll, a whole page, follows at
        once)."""
        state.filtering = WHOLE_ONLY
        state.filter_recheck_at = state.started + FILTER_RECHECK_S
        state.started = state.due = -math.inf
        if not state.filter_refused_noted:
            state.filter_refused_noted = True
            log.info(
                "%s: the page asked with name[] (only the families read) is not usable (%s); "
                "reading the whole page",
                self.config.url(state.ep),
                why,
            )

    def _failed(self, state: _PollState, exc: BaseException) -> bool:
        """Count a failed poll (logged at an outage's start, then rarely)."""
        ep = state.ep
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
            log.warning(
                "scrape of %s failed (%d in a row): %s", self.config.url(ep), ep.scrape_errors, reason
            )
        return False

    def next_delay(self, ep: Endpoint) -> float:
        """How long after the start of its last poll an endpoint is polled again."""
        state = self._state.get(ep.key)
        return self.pacer.interval_s if state is None else self._delay(state)

    def _delay(self, state: _PollState) -> float:
        if state.limit_failures:
            return min(LIMIT_BACKOFF_MAX_S, LIMIT_BACKOFF_S * 2.0 ** (state.limit_failures - 1))
        return max(self.pacer.interval_s, state.last_bytes / PACE_BYTES_PER_S)

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


def _refuses_filter(exc: MetricsParseError) -> bool:
    """A filtered poll's failure that says the server does not take `name[]` (a client error, or
    a page without the families asked for), rather than an outage."""
    if isinstance(exc, HttpStatusError):
        return 400 <= exc.status < 500
    return isinstance(exc, NoValuesError)
