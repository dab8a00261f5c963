"""Poll each endpoint's /metrics and swap in a fresh EndpointMetrics snapshot.

One asyncio task per endpoint, started and stopped as the datastore changes. A failed poll keeps
the last snapshot (its `updated_at` does not advance, so the endpoint ages into staleness) and
counts the error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from epp.datalayer.datastore import Datastore
from epp.datalayer.model_server_metrics import ENGINE_LABEL, names_for_engine, parse_metrics
from epp.errors import MetricsParseError
from epp.framework import Endpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScrapeConfig:
    """Where and how each model server's metrics page is read (the Go EPP's
    --model-server-metrics-* flags)."""

    path: str = "/metrics"
    scheme: str = "http"
    port: int | None = None  # None: the endpoint's own port
    https_insecure_skip_verify: bool = True

    def url(self, ep: Endpoint) -> str:
        host = (
            ep.key
            if self.port is None
            else f"[{ep.address}]:{self.port}"
            if ":" in ep.address
            else f"{ep.address}:{self.port}"
        )
        return f"{self.scheme}://{host}{self.path}"


class Scraper:
    def __init__(
        self,
        datastore: Datastore,
        interval_s: float,
        config: ScrapeConfig | None = None,
        timeout_s: float = 1.0,
        on_error: Callable[[Endpoint], None] | None = None,
    ) -> None:
        self._datastore = datastore
        self._interval = interval_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.config = config or ScrapeConfig()
        self._on_error = on_error
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        datastore.subscribe(self._start, self._stop)

    async def start(self) -> None:
        # One connection pool for all endpoints; keep-alive avoids a TCP handshake per poll.
        self._session = aiohttp.ClientSession(
            timeout=self._timeout, connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
        )
        for ep in self._datastore.endpoints():
            self._start(ep)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _start(self, ep: Endpoint) -> None:
        if self._session is None or ep.key in self._tasks:
            return  # not started yet: start() picks up every endpoint
        self._tasks[ep.key] = asyncio.get_running_loop().create_task(self._poll_forever(ep))

    def _stop(self, ep: Endpoint) -> None:
        task = self._tasks.pop(ep.key, None)
        if task is not None:
            task.cancel()

    async def scrape_once(self, ep: Endpoint) -> bool:
        """One poll. True when a fresh snapshot was stored."""
        assert self._session is not None
        url = self.config.url(ep)
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    raise MetricsParseError(f"HTTP {resp.status}")
                text = await resp.text()
            ep.metrics = parse_metrics(text, names_for_engine(ep.labels.get(ENGINE_LABEL)), time.monotonic())
            ep.scrape_errors = 0  # failures in a row: the next outage is logged again at once
            return True
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, TimeoutError, MetricsParseError, UnicodeDecodeError) as exc:
            ep.scrape_errors += 1
            if self._on_error is not None:
                self._on_error(ep)
            # Log the first failure of an outage and then rarely, not at 20 Hz.
            if ep.scrape_errors == 1 or ep.scrape_errors % 200 == 0:
                log.warning(
                    "scrape of %s failed (%d in a row): %s", url, ep.scrape_errors, exc or type(exc).__name__
                )
            return False

    async def _poll_forever(self, ep: Endpoint) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.scrape_once(ep)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end this endpoint's scraping for good
                log.exception("scrape of %s failed unexpectedly", ep.key)
            await asyncio.sleep(max(0.0, self._interval - (loop.time() - started)))
