"""The client of upstream's latency-predictor training server (llm-d-latency-predictor), for
`predicted-latency-producer` when `TRAINING_SERVER_URL` is set, as the Go EPP's chart sets it.

Everything here runs in a background task, never on a request's path: observations are buffered
(bounded) and posted to `/add_training_data_bulk` every `LATENCY_FLUSH_INTERVAL_SEC` (a random
sample of at most `LATENCY_MAX_SAMPLE_SIZE` when more accumulated, as Go's client does), and the
server's linear model (`ttft_intercept`, `ttft_coef{feature=...}`, ... on its `/metrics` page:
present when it trains Bayesian Ridge) is fetched every `LATENCY_METRICS_INTERVAL_SEC`. Each HTTP
call is bounded by `LATENCY_HTTP_TIMEOUT_SEC`. The producer predicts with the server's model while
a fetch younger than three intervals holds one, and with its own in-process model otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from epp_scorers.producers.latency_model import CoefficientModel

log = logging.getLogger(__name__)

_COEF_LINE = re.compile(r'^(ttft|tpot)_(intercept|coef)(?:\{[^}]*feature="([^"]+)"[^}]*\})?\s+(\S+)$')


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    training_url: str
    prediction_urls: tuple[str, ...] = ()
    flush_interval_s: float = 1.0
    http_timeout_s: float = 10.0
    metrics_interval_s: float = 60.0
    max_sample_size: int = 1000

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SidecarConfig | None:
        """The Go client's environment variables; None when `TRAINING_SERVER_URL` is not set."""
        url = env.get("TRAINING_SERVER_URL", "").strip().rstrip("/")
        if not url:
            return None

        def positive(name: str, default: float) -> float:
            raw = env.get(name, "")
            try:
                value = int(raw)
            except ValueError:
                return default  # Go ignores a bad value too
            return float(value) if value > 0 else default

        predictions = tuple(
            u.strip().rstrip("/") for u in env.get("PREDICTION_SERVER_URL", "").split(",") if u.strip()
        )
        return cls(
            training_url=url,
            prediction_urls=predictions,
            flush_interval_s=positive("LATENCY_FLUSH_INTERVAL_SEC", 1.0),
            http_timeout_s=positive("LATENCY_HTTP_TIMEOUT_SEC", 10.0),
            metrics_interval_s=positive("LATENCY_METRICS_INTERVAL_SEC", 60.0),
            max_sample_size=int(positive("LATENCY_MAX_SAMPLE_SIZE", 1000.0)),
        )


def parse_coefficients(text: str) -> tuple[CoefficientModel, CoefficientModel] | None:
    """The TTFT and TPOT linear models of a training server's /metrics page; None when it has
    none (it trains XGBoost or LightGBM, or has not trained yet)."""
    intercepts: dict[str, float] = {}
    coefs: dict[str, dict[str, float]] = {"ttft": {}, "tpot": {}}
    for line in text.splitlines():
        m = _COEF_LINE.match(line.strip())
        if m is None:
            continue
        model, kind, feature, raw = m.groups()
        try:
            value = float(raw)
        except ValueError:
            continue
        if kind == "intercept":
            intercepts[model] = value
        elif feature:
            coefs[model][feature] = value
    if "ttft" not in intercepts or "tpot" not in intercepts:
        return None
    return CoefficientModel(intercepts["ttft"], coefs["ttft"]), CoefficientModel(
        intercepts["tpot"], coefs["tpot"]
    )


class LatencySidecar:
    """Buffers training entries for the training server and keeps its latest linear model."""

    def __init__(self, config: SidecarConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._buffer: deque[dict[str, Any]] = deque(maxlen=10 * config.max_sample_size)
        self._models: tuple[CoefficientModel, CoefficientModel] | None = None
        self._fetched_at = 0.0
        self._rng = rng or random.Random()
        self.posted = 0  # entries the server accepted
        self._failing = False  # the last call failed (logged once per change)

    def record(self, entry: dict[str, Any]) -> None:
        self._buffer.append(entry)

    def models(self) -> tuple[CoefficientModel, CoefficientModel] | None:
        """The server's (TTFT, TPOT) models, if a recent fetch had them."""
        if self._models is None or time.monotonic() - self._fetched_at > 3 * self.config.metrics_interval_s:
            return None
        return self._models

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.http_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            next_refresh = 0.0
            while True:
                now = time.monotonic()
                if now >= next_refresh:
                    await self._call(self.refresh(session))
                    next_refresh = now + self.config.metrics_interval_s
                if self._buffer:
                    await self._call(self.flush(session))
                await asyncio.sleep(self.config.flush_interval_s)

    async def _call(self, call: Any) -> None:
        try:
            await call
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            if not self._failing:
                log.warning(
                    "latency training server %s: %s", self.config.training_url, exc or type(exc).__name__
                )
            self._failing = True
        else:
            if self._failing:
                log.info("latency training server %s answers again", self.config.training_url)
            self._failing = False

    async def flush(self, session: aiohttp.ClientSession) -> None:
        entries = list(self._buffer)
        self._buffer.clear()
        if len(entries) > self.config.max_sample_size:
            entries = self._rng.sample(entries, self.config.max_sample_size)
        url = self.config.training_url + "/add_training_data_bulk"
        async with session.post(url, json={"entries": entries}) as resp:
            if resp.status >= 300:
                raise ValueError(f"POST {url}: HTTP {resp.status}")
        self.posted += len(entries)

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        url = self.config.training_url + "/metrics"
        async with session.get(url) as resp:
            if resp.status != 200:
                raise ValueError(f"GET {url}: HTTP {resp.status}")
            text = await resp.text()
        models = parse_coefficients(text)
        if models is None and self._models is not None:
            log.info("latency training server publishes no linear model now: predicting in process")
        self._models = models
        self._fetched_at = time.monotonic()
