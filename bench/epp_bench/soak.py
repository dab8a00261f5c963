"""`python -m epp_bench soak`: epp under a steady load for a long time, with pods coming and going
and model servers whose `/metrics` fails, through a real Envoy. Reports what an operator would
look at after a night of it: requests lost, epp's memory growth, latency.

    python -m epp_bench soak                          # 10 minutes (`make soak`)
    python -m epp_bench soak --duration 20s --json soak.json

The stack: simulated vLLM servers (epp_bench.sim, in this process), `python -m epp` watching an
endpoints file (`--endpoints-file`), and Envoy in front (ext_proc to epp, FULL_DUPLEX_STREAMED, no
fail-open: a request epp cannot place fails, and counts as lost).

- Load: `--rate` requests a second, evenly spaced (a steady rate, not bursts), for `--duration`.
  Prompts share one of `--prefix-groups` system prompts (the prefix index fills and turns over)
  and end in a unique question; nine in ten stream (SSE, with usage), one in ten does not.
- Pod churn: every `--churn-interval`, the oldest churned pod leaves the endpoints file and a new
  one (a new port, a new name) joins it in the same write; the one leaving keeps serving for
  `--drain-grace` (what a terminating pod's grace period gives) and then stops, as a rolling
  update replaces pods.
- Scrape failures: `--flaky-pods` servers in the pool serve requests normally but fail every
  scrape of their `/metrics`, in turn: HTTP 500, a page that is not Prometheus text (and not
  UTF-8), and a page that answers only after 3 s.

A request is lost unless it completes exactly as the model server sent it: HTTP 200, every token
(`max_tokens` of them, the last with its finish reason), the usage chunk and `data: [DONE]` for a
stream; the body with `max_tokens` tokens of usage otherwise. epp's resident memory is read from
/proc/<pid>/status every `--rss-interval`; the growth is the end against the first sample after
the warm-up (a tenth of the run, at most a minute), with a least-squares slope over the same span.
Every wait is bounded: a request by `--request-timeout`, the run by its duration plus the drain.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from epp_bench.gateway import EnvoyGateway, EppProcess
from epp_bench.sim.config import SimConfig
from epp_bench.sim.server import Simulator
from epp_bench.workloads import make_text

MODEL = "sim-model"
SERVED_BY = "x-served-by"
FLAKY_MODES = ("status-500", "not-prometheus", "slow")
FLAKY_SLOW_S = 3.0


def parse_duration(text: str) -> float:
    """'600', '600s', '10m', '1h', '1.5m' -> seconds."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not found:
        raise argparse.ArgumentTypeError(f"expected a duration like 600s, 10m or 20s, got {text!r}")
    value = float(found.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[found.group(2) or "s"]
    if value <= 0:
        raise argparse.ArgumentTypeError("a duration must be positive")
    return value


@dataclass
class SoakConfig:
    duration_s: float = 600.0
    rate: float = 10.0  # requests/s, evenly spaced
    stable_pods: int = 3  # always in the pool
    churn_pods: int = 2  # replaced one at a time, every churn_interval_s
    flaky_pods: int = 1  # in the pool, /metrics always failing
    churn_interval_s: float = 10.0
    drain_grace_s: float = 3.0  # a pod leaving the file serves this long before it stops
    max_tokens: int = 24
    prompt_tokens: int = 192  # system prompt; the question adds 16
    prefix_groups: int = 16
    inter_token_latency_s: float = 0.02
    request_timeout_s: float = 30.0
    rss_interval_s: float = 2.0
    warmup_s: float | None = None  # default: a tenth of the run, at most 60 s, at least 2 s
    stream_share: float = 0.9
    seed: int = 1
    epp_args: list[str] = field(default_factory=list)

    def warmup(self) -> float:
        if self.warmup_s is not None:
            return self.warmup_s
        return max(2.0, min(60.0, self.duration_s / 10))

    def validate(self) -> None:
        if self.duration_s <= 0 or self.rate <= 0:
            raise ValueError("duration and rate must be positive")
        if self.stable_pods < 1:
            raise ValueError("at least one stable pod")
        if min(self.churn_pods, self.flaky_pods) < 0 or self.max_tokens < 1:
            raise ValueError("pod counts must not be negative, max_tokens must be positive")
        if self.churn_interval_s <= 0 or self.drain_grace_s < 0 or self.request_timeout_s <= 0:
            raise ValueError("churn interval and request timeout must be positive, drain grace not negative")


# --- one request, checked for completeness --------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    started_s: float  # its arrival time in the schedule, seconds from the start
    latency_s: float = 0.0
    ttft_s: float | None = None  # streams only: the first token
    served_by: str = ""
    reason: str = ""  # why it was lost: a short category
    detail: str = ""


async def stream_completion(
    session: aiohttp.ClientSession, base_url: str, prompt: str, max_tokens: int, *, stream: bool = True
) -> Outcome:
    """POST /v1/completions and check the answer is whole (module docstring). Never raises for a
    failed request: the outcome says why (HTTP status, a cut stream, a missing token...)."""
    body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    started = time.perf_counter()
    first = 0.0
    served_by = ""
    try:
        async with session.post(
            f"{base_url}/v1/completions",
            data=orjson.dumps(body),
            headers={"content-type": "application/json"},
        ) as resp:
            served_by = resp.headers.get(SERVED_BY, "")
            if resp.status != 200:
                text = (await resp.read())[:200].decode("utf-8", "replace")
                return Outcome(False, 0.0, served_by=served_by, reason=f"http-{resp.status}", detail=text)
            if not stream:
                payload = orjson.loads(await resp.read())
                tokens = (payload.get("usage") or {}).get("completion_tokens")
                if tokens != max_tokens or not payload.get("choices"):
                    return Outcome(
                        False, 0.0, served_by=served_by, reason="incomplete", detail=str(payload)[:200]
                    )
            else:
                tokens, finished, usage_tokens, done = 0, "", None, False
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        continue
                    event = orjson.loads(data)
                    if "error" in event:
                        return Outcome(
                            False, 0.0, served_by=served_by, reason="error-event", detail=str(event)[:200]
                        )
                    if event.get("usage"):
                        usage_tokens = event["usage"].get("completion_tokens")
                    for choice in event.get("choices") or ():
                        tokens += 1
                        first = first or time.perf_counter()
                        finished = choice.get("finish_reason") or finished
                if not done or tokens != max_tokens or usage_tokens != max_tokens or not finished:
                    detail = f"{tokens}/{max_tokens} tokens, usage {usage_tokens}, [DONE] {done}"
                    detail += f", finish {finished!r}"
                    return Outcome(False, 0.0, served_by=served_by, reason="cut", detail=detail)
    except (aiohttp.ClientError, ValueError) as exc:
        return Outcome(False, 0.0, served_by=served_by, reason=type(exc).__name__, detail=str(exc)[:200])
    except TimeoutError:
        return Outcome(False, 0.0, served_by=served_by, reason="timeout")
    end = time.perf_counter()
    ttft = first - started if first else None
    return Outcome(True, 0.0, latency_s=end - started, ttft_s=ttft, served_by=served_by)


# --- the pods ------------------------------------------------------------------------------------


class FlakyMetricsSimulator(Simulator):
    """A simulator whose /metrics fails every scrape, rotating through FLAKY_MODES; the rest of
    its API (the requests) works."""

    def __init__(self, cfg: SimConfig) -> None:
        super().__init__(cfg)
        self.failures: Counter[str] = Counter()
        self._modes = itertools.cycle(FLAKY_MODES)

    def make_app(self) -> web.Application:
        app = super().make_app()

        @web.middleware
        async def fail_metrics(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if request.path != "/metrics":
                return await handler(request)
            mode = next(self._modes)
            self.failures[mode] += 1
            if mode == "status-500":
                return web.Response(status=500, text="internal error")
            if mode == "not-prometheus":
                return web.Response(body=b"\xff\xfe<html>not metrics {{{\n\x00", content_type="text/plain")
            await asyncio.sleep(FLAKY_SLOW_S)
            return web.Response(text="vllm:num_requests_waiting{model_name=", content_type="text/plain")

        app.middlewares.append(fail_metrics)
        return app


class Pool:
    """The running simulators and the endpoints file epp watches."""

    def __init__(self, cfg: SoakConfig, path: Path) -> None:
        self.cfg = cfg
        self.path = path
        self.live: dict[str, Simulator] = {}  # in the endpoints file
        self.leaving: list[asyncio.Task[None]] = []
        self.churned: list[str] = []  # names of churnable pods, oldest first
        self.started = 0
        self.stopped = 0
        self.churn_events = 0
        self._names = itertools.count()

    def _sim_config(self, name: str) -> SimConfig:
        return SimConfig(name=name, model=MODEL, inter_token_latency_s=self.cfg.inter_token_latency_s)

    async def _start(self, kind: str, flaky: bool = False) -> Simulator:
        name = f"{kind}-{next(self._names)}"
        sim: Simulator = (FlakyMetricsSimulator if flaky else Simulator)(self._sim_config(name))
        await sim.start("127.0.0.1", 0)
        self.started += 1
        self.live[name] = sim
        return sim

    def write(self) -> None:
        """The endpoints file, replaced atomically (epp never reads half a file)."""
        entries = [
            {
                "address": sim.host,
                "port": sim.port,
                "name": name,
                "labels": {"soak.epp/kind": name.split("-")[0]},
            }
            for name, sim in self.live.items()
        ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(entries, sort_keys=False))
        os.replace(tmp, self.path)

    async def start(self) -> None:
        for _ in range(self.cfg.stable_pods):
            await self._start("stable")
        for _ in range(self.cfg.flaky_pods):
            await self._start("flaky", flaky=True)
        for _ in range(self.cfg.churn_pods):
            self.churned.append((await self._start("churn")).name)
        self.write()

    async def churn(self) -> None:
        """One rolling replacement: the oldest churned pod out of the file, a new one in."""
        if not self.churned:
            return
        old = self.live.pop(self.churned.pop(0))
        self.churned.append((await self._start("churn")).name)
        self.write()
        self.churn_events += 1
        self.leaving.append(asyncio.create_task(self._retire(old)))

    async def _retire(self, sim: Simulator) -> None:
        await asyncio.sleep(self.cfg.drain_grace_s)
        await sim.stop()
        self.stopped += 1

    def scrape_failures(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for sim in self.live.values():
            if isinstance(sim, FlakyMetricsSimulator):
                total.update(sim.failures)
        return dict(total)

    async def stop(self) -> None:
        for task in self.leaving:
            task.cancel()
        await asyncio.gather(*self.leaving, return_exceptions=True)
        for sim in self.live.values():
            await sim.stop()
        self.live.clear()


# --- epp's process -----------------------------------------------------------------------------


def process_of(epp: EppProcess) -> asyncio.subprocess.Process:
    """epp's subprocess, for its pid (/proc) and signals. EppProcess keeps it private."""
    proc = epp._proc
    if proc is None:
        raise RuntimeError("epp is not running")
    return proc


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


async def epp_counters(epp: EppProcess) -> dict[str, float]:
    """A few of epp's own counters, summed over their labels: scrape (poll) errors, request errors."""
    wanted = {
        "llm_d_epp_datalayer_poll_errors": 0.0,
        "llm_d_epp_request_error": 0.0,
        "llm_d_epp_request": 0.0,
    }
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(epp.metrics_url) as resp,
    ):
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        if family.name in wanted:
            wanted[family.name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return wanted


# --- the run -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def slope_per_minute(samples: Sequence[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, bytes) samples, in MB a minute."""
    if len(samples) < 2:
        return 0.0
    xs = [t for t, _ in samples]
    ys = [b / 1e6 for _, b in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 0.0 if den == 0 else 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


def summarize(
    cfg: SoakConfig,
    outcomes: Sequence[Outcome],
    rss: Sequence[tuple[float, int]],
    pool: Pool,
    counters: dict[str, float],
    elapsed_s: float,
) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    lost = [o for o in outcomes if not o.ok]
    latencies = [o.latency_s for o in ok]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    warm = [(t, b) for t, b in rss if t >= cfg.warmup()] or list(rss[-1:])
    base = warm[0][1] if warm else 0
    end = rss[-1][1] if rss else 0
    return {
        "config": asdict(cfg),
        "elapsed_s": round(elapsed_s, 1),
        "requests": {
            "sent": len(outcomes),
            "ok": len(ok),
            "lost": len(lost),
            "lost_by_reason": dict(Counter(o.reason for o in lost)),
            "lost_examples": [
                f"{o.reason} @{o.started_s:.1f}s via {o.served_by or '?'}: {o.detail}" for o in lost[:5]
            ],
            "served_by_kind": dict(Counter(o.served_by.split("-")[0] for o in ok if o.served_by)),
        },
        "latency_s": {
            "p50": percentile(latencies, 0.50),
            "p90": percentile(latencies, 0.90),
            "p99": percentile(latencies, 0.99),
            "max": max(latencies, default=float("nan")),
        },
        "ttft_s": {"p50": percentile(ttfts, 0.50), "p99": percentile(ttfts, 0.99)},
        "epp_rss_mb": {
            "start": round(rss[0][1] / 1e6, 1) if rss else None,
            "after_warmup": round(base / 1e6, 1),
            "end": round(end / 1e6, 1),
            "max": round(max((b for _, b in rss), default=0) / 1e6, 1),
            "growth_pct": round(100 * (end - base) / base, 2) if base else None,
            "slope_mb_per_min": round(slope_per_minute(warm), 3),
            "samples": len(rss),
        },
        "churn": {"events": pool.churn_events, "pods_started": pool.started, "pods_stopped": pool.stopped},
        "scrape_failures": {
            "served": pool.scrape_failures(),
            "epp_poll_errors": counters.get("llm_d_epp_datalayer_poll_errors", 0.0),
        },
        "epp_counters": counters,
        "windows": windows(cfg, outcomes, rss),
        # The machine's load (1-minute average) at the end: latency figures from a busy machine
        # measure the machine as much as epp.
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def windows(
    cfg: SoakConfig, outcomes: Sequence[Outcome], rss: Sequence[tuple[float, int]]
) -> list[dict[str, Any]]:
    """The run in ten windows (a minute each for `make soak`): requests started, lost, p99 and
    epp's RSS at the window's end, to tell a trend from a spike."""
    width = max(cfg.duration_s / 10, 1.0)
    out = []
    start = 0.0
    while start < cfg.duration_s:
        end = start + width
        inside = [o for o in outcomes if start <= o.started_s < end]
        memory = [b for t, b in rss if t < end]
        out.append(
            {
                "from_s": round(start, 1),
                "requests": len(inside),
                "lost": sum(not o.ok for o in inside),
                "p99_s": round(percentile([o.latency_s for o in inside if o.ok], 0.99), 3),
                "rss_mb": round(memory[-1] / 1e6, 1) if memory else None,
            }
        )
        start = end
    return out


async def run_soak(cfg: SoakConfig, progress: Callable[[str], object] | None = None) -> dict[str, Any]:
    """Run the soak (module docstring) and return its report; every wait is bounded."""
    cfg.validate()
    rng = random.Random(cfg.seed)
    systems = [make_text(rng, cfg.prompt_tokens) for _ in range(cfg.prefix_groups)]
    outcomes: list[Outcome] = []
    rss: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory(prefix="epp-soak-") as tmp:
        pool = Pool(cfg, Path(tmp) / "endpoints.yaml")
        try:
            await pool.start()
            epp_args = ["--endpoints-file", str(pool.path), *cfg.epp_args]
            async with (
                EppProcess([], extra_args=epp_args, log_path=Path(tmp) / "epp.log") as epp,
                EnvoyGateway("epp", epp_grpc_port=epp.grpc_port) as gateway,
                aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=cfg.request_timeout_s),
                    connector=aiohttp.TCPConnector(limit=0),
                ) as session,
            ):
                pid = process_of(epp).pid
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                deadline = t0 + cfg.duration_s

                async def one(i: int) -> None:
                    prompt = f"{systems[i % len(systems)]}question {i}: {make_text(random.Random(i), 16)}"
                    stream = (i % 10) < round(cfg.stream_share * 10)
                    started = i / cfg.rate  # its slot in the steady schedule
                    try:
                        outcome = await stream_completion(
                            session, gateway.url, prompt, cfg.max_tokens, stream=stream
                        )
                    except Exception as exc:  # a bug of the harness still counts, as a lost request
                        outcome = Outcome(False, 0.0, reason=type(exc).__name__, detail=str(exc)[:200])
                    outcome.started_s = started
                    outcomes.append(outcome)

                async def sample_rss() -> None:
                    while True:
                        rss.append((loop.time() - t0, rss_bytes(pid)))
                        await asyncio.sleep(cfg.rss_interval_s)

                async def churn() -> None:
                    while True:
                        await asyncio.sleep(cfg.churn_interval_s)
                        await pool.churn()
                        if progress:
                            progress(
                                f"{loop.time() - t0:6.0f}s  {len(outcomes)} done, "
                                f"{sum(not o.ok for o in outcomes)} lost, churn {pool.churn_events}, "
                                f"epp RSS {rss[-1][1] / 1e6 if rss else 0:.0f} MB"
                            )

                background = [loop.create_task(sample_rss()), loop.create_task(churn())]
                requests: list[asyncio.Task[None]] = []
                try:
                    for i in itertools.count():
                        at = t0 + i / cfg.rate
                        if at >= deadline:
                            break
                        await asyncio.sleep(max(0.0, at - loop.time()))
                        requests.append(loop.create_task(one(i)))
                    # The last requests finish (each bounded by the client timeout).
                    await asyncio.wait_for(
                        asyncio.gather(*requests, return_exceptions=True), cfg.request_timeout_s + 5
                    )
                finally:
                    for task in background:
                        task.cancel()
                    await asyncio.gather(*background, return_exceptions=True)
                rss.append((loop.time() - t0, rss_bytes(pid)))
                elapsed = loop.time() - t0
                counters = await epp_counters(epp)
                report = summarize(cfg, outcomes, rss, pool, counters, elapsed)
                report["epp_log_tail"] = epp.log_tail(2000) if report["requests"]["lost"] else ""
                return report
        finally:
            await pool.stop()


# --- the report --------------------------------------------------------------------------------


def table(report: dict[str, Any]) -> str:
    r, lat, mem = report["requests"], report["latency_s"], report["epp_rss_mb"]
    failures = report["scrape_failures"]
    cfg = report["config"]
    rows = [
        ("duration", f"{report['elapsed_s']:.0f} s at {cfg['rate']:g} req/s"),
        ("requests sent / ok", f"{r['sent']} / {r['ok']}"),
        ("lost", f"{r['lost']}" + (f"  {r['lost_by_reason']}" if r["lost"] else "")),
        (
            "latency p50 / p90 / p99",
            f"{lat['p50'] * 1000:.0f} / {lat['p90'] * 1000:.0f} / {lat['p99'] * 1000:.0f} ms",
        ),
        ("TTFT p99", f"{report['ttft_s']['p99'] * 1000:.0f} ms"),
        ("epp RSS after warm-up / end / max", f"{mem['after_warmup']} / {mem['end']} / {mem['max']} MB"),
        ("epp RSS growth", f"{mem['growth_pct']} %  (slope {mem['slope_mb_per_min']} MB/min)"),
        (
            "pod churn",
            f"{report['churn']['events']} replacements ({report['churn']['pods_started']} pods started)",
        ),
        (
            "scrapes failed (flaky pods) / epp's poll errors",
            f"{sum(failures['served'].values())} / {failures['epp_poll_errors']:.0f}",
        ),
    ]
    rows.append(("machine load (1 min) at the end", f"{report['loadavg_1m']}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("windows (start s: requests, lost, p99 ms, epp RSS MB):")
    lines += [
        f"  {w['from_s']:>6.1f}: {w['requests']:>5} {w['lost']:>3} {w['p99_s'] * 1000:>7.0f} {w['rss_mb']}"
        for w in report["windows"]
    ]
    lines += [f"  {example}" for example in r["lost_examples"]]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SoakConfig()
    p.add_argument("--duration", type=parse_duration, default=d.duration_s, help="e.g. 10m (default), 20s")
    p.add_argument(
        "--rate", type=float, default=d.rate, help=f"requests/s, evenly spaced (default {d.rate:g})"
    )
    p.add_argument("--stable-pods", type=int, default=d.stable_pods)
    p.add_argument("--churn-pods", type=int, default=d.churn_pods)
    p.add_argument("--flaky-pods", type=int, default=d.flaky_pods, help="pods whose /metrics always fails")
    p.add_argument("--churn-interval", type=parse_duration, default=d.churn_interval_s)
    p.add_argument("--drain-grace", type=parse_duration, default=d.drain_grace_s)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--request-timeout", type=parse_duration, default=d.request_timeout_s)
    p.add_argument("--rss-interval", type=parse_duration, default=d.rss_interval_s)
    p.add_argument("--warmup", type=parse_duration, help="default: a tenth of the run, at most 60 s")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--epp-arg", action="append", default=[], help="a flag passed to epp (repeat)")
    p.add_argument("--json", type=Path, help="write the report as JSON here")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> SoakConfig:
    return SoakConfig(
        duration_s=args.duration,
        rate=args.rate,
        stable_pods=args.stable_pods,
        churn_pods=args.churn_pods,
        flaky_pods=args.flaky_pods,
        churn_interval_s=args.churn_interval,
        drain_grace_s=args.drain_grace,
        max_tokens=args.max_tokens,
        request_timeout_s=args.request_timeout,
        rss_interval_s=args.rss_interval,
        warmup_s=args.warmup,
        seed=args.seed,
        epp_args=[a for arg in args.epp_arg for a in arg.split("=", 1)],
    )


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        cfg.validate()
    except ValueError as exc:
        raise SystemExit(f"epp_bench soak: error: {exc}") from None

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = asyncio.run(run_soak(cfg, None if args.no_progress else progress))
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"report: {args.json}")
    return 1 if report["requests"]["lost"] else 0
