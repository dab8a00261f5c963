"""`python -m epp_bench report`: a cache-hit, latency and stickiness report against a live gateway.

Any OpenAI-compatible gateway (`--gateway URL`, `--host` for the Host header): a warm-up, then a
measured ramp of multi-turn sessions, every request streamed. Every session opens with the same
long system prompt, then its own long context, then grows turn by turn (each turn resends the
conversation so far), as llm-d's cache-aware demo does. The warm-up and the ramp carry distinct
test and session ids in the prompts, so nothing an earlier run (or the warm-up) cached is reused.

What it reports (printed, and written as JSON and a PNG):
- the prefix-cache hit rate of the measured traffic: the increase of the pods'
  `vllm:prefix_cache_hits_total` over that of `..._queries_total` (or the older
  `vllm:gpu_prefix_cache_*`), read before and after the ramp (cache_counters.py);
- TTFT, TPOT (time per output token after the first) and end-to-end time, measured by the client:
  percentiles and means;
- stickiness per session: the share of its requests served by its most-used pod.

Which pod served a request: the gateway's response header (`--served-header`, by default the one
epp adds with `--emit-served-endpoint-header`) when responses carry it; else the pods' counters
read around each request, which needs one request in flight at a time (the ramp is then run at
concurrency 1: the pods see no concurrent load, so load-aware routing is not exercised) and
counters read live from the pods (`--pods` / `--pool`, not `--prometheus`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from epp_bench.cache_counters import (
    CounterError,
    CounterSource,
    PodsSource,
    PrometheusSource,
    Snapshot,
    delta,
    pool_pods,
)
from epp_bench.load import sse_events
from epp_bench.workloads import make_text

SERVED_HEADER = "x-gateway-destination-endpoint-served"  # epp --emit-served-endpoint-header
ATTRIBUTIONS = ("auto", "header", "counters")
MAX_SESSIONS = 10_000
MAX_TURNS = 100


class ReportError(RuntimeError):
    """The report cannot run (unreachable gateway, every request failing, bad counters)."""


@dataclass(frozen=True)
class ReportConfig:
    gateway: str
    model: str = "sim-model"
    host: str | None = None
    sessions: int = 8
    turns: int = 5
    warmup: int = 4
    ramp: tuple[int, ...] = (1, 2, 4)  # sessions in flight in each stage
    system_tokens: int = 1024  # shared by every session
    session_tokens: int = 1024  # each session's own context
    question_tokens: int = 32
    output_tokens: int = 32
    api: str = "chat"  # "chat" (/v1/chat/completions) or "completions" (/v1/completions)
    served_header: str = SERVED_HEADER
    attribution: str = "auto"
    settle_s: float = 0.0  # wait this long before each counter read (Prometheus' scrape lag)
    timeout_s: float = 120.0  # per request
    max_seconds: float = 600.0  # the whole ramp
    test_id: str = ""
    seed: int = 1

    def check(self) -> None:
        if not self.gateway.startswith(("http://", "https://")):
            raise ValueError(f"--gateway expects http(s)://host[:port], got {self.gateway!r}")
        if not 1 <= self.sessions <= MAX_SESSIONS:
            raise ValueError(f"--sessions must be 1..{MAX_SESSIONS}")
        if not 1 <= self.turns <= MAX_TURNS:
            raise ValueError(f"--turns must be 1..{MAX_TURNS}")
        if self.warmup < 0:
            raise ValueError("--warmup must not be negative")
        if not self.ramp or any(c < 1 for c in self.ramp):
            raise ValueError("--ramp takes positive concurrencies, e.g. 1,2,4")
        if len(self.ramp) > self.sessions:
            raise ValueError(f"--ramp has {len(self.ramp)} stages for {self.sessions} sessions")
        if min(self.system_tokens, self.session_tokens, self.question_tokens) < 0 or self.output_tokens < 1:
            raise ValueError("token counts must not be negative (--output-tokens at least 1)")
        if self.api not in ("chat", "completions"):
            raise ValueError("--api is chat or completions")
        if self.attribution not in ATTRIBUTIONS:
            raise ValueError(f"--attribution is one of {', '.join(ATTRIBUTIONS)}")


@dataclass
class Sample:
    """One request as the client saw it."""

    session: str
    turn: int
    stage: int
    ok: bool
    status: int = 0
    ttft_s: float = math.nan
    tpot_s: float = math.nan
    e2e_s: float = math.nan
    output_tokens: int = 0
    pod: str = ""  # "" when unknown
    error: str = ""


# -- the sessions ---------------------------------------------------------------------------------


@dataclass
class Session:
    id: str
    system: str
    context: str
    questions: list[str]
    history: list[tuple[str, str]] = field(default_factory=list)

    def body(self, cfg: ReportConfig, turn: int) -> dict[str, Any]:
        question = self.questions[turn]
        body: dict[str, Any] = {
            "model": cfg.model,
            "max_tokens": cfg.output_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": self.id,
        }
        if cfg.api == "chat":
            messages = [{"role": "system", "content": self.system + self.context}]
            for q, a in self.history:
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            body["messages"] = [*messages, {"role": "user", "content": question}]
        else:
            parts = [self.system, self.context]
            parts += [f"\nUser: {q}\nAssistant: {a}" for q, a in self.history]
            body["prompt"] = "".join([*parts, f"\nUser: {question}\nAssistant:"])
        return body


def make_sessions(cfg: ReportConfig, test_id: str, count: int, label: str) -> list[Session]:
    """`count` sessions of one test: one shared system prompt (naming the test, so no cache of an
    earlier test matches), then each session's own context (naming the session)."""
    rng = random.Random(f"{cfg.seed}-{test_id}-{label}")
    system = f"[test {test_id}] " + make_text(rng, cfg.system_tokens)
    sessions = []
    for i in range(count):
        sid = f"{test_id}-{label}{i}"
        context = f"\n[session {sid}] " + make_text(rng, cfg.session_tokens)
        questions = [make_text(rng, cfg.question_tokens) for _ in range(cfg.turns)]
        sessions.append(Session(sid, system, context, questions))
    return sessions


# -- one streamed request -------------------------------------------------------------------------


async def stream_one(
    http: aiohttp.ClientSession, cfg: ReportConfig, session: Session, turn: int, stage: int
) -> Sample:
    path = "/v1/chat/completions" if cfg.api == "chat" else "/v1/completions"
    headers = {"content-type": "application/json", "x-session-id": session.id}
    if cfg.host:
        headers["host"] = cfg.host
    sample = Sample(session.id, turn, stage, ok=False)
    started = time.perf_counter()
    first = 0.0
    chunks = usage_tokens = 0
    text: list[str] = []
    try:
        async with http.post(
            cfg.gateway.rstrip("/") + path, data=orjson.dumps(session.body(cfg, turn)), headers=headers
        ) as resp:
            sample.status = resp.status
            sample.pod = resp.headers.get(cfg.served_header, "")
            if resp.status != 200:
                sample.error = (await resp.content.read(300)).decode("utf-8", "replace").strip()
                return sample
            async for event in sse_events(resp):
                usage = event.get("usage")
                if usage:
                    usage_tokens = int(usage.get("completion_tokens") or 0)
                for choice in event.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                    if piece:
                        first = first or time.perf_counter()
                        chunks += 1
                        text.append(piece)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"
        return sample
    end = time.perf_counter()
    if not first:
        sample.error = "no tokens received"
        return sample
    tokens = usage_tokens or chunks
    sample.ok = True
    sample.ttft_s = first - started
    sample.e2e_s = end - started
    sample.output_tokens = tokens
    if tokens > 1:
        sample.tpot_s = (end - first) / (tokens - 1)
    session.history.append((session.questions[turn], "".join(text)))
    return sample


# -- the run --------------------------------------------------------------------------------------


def stages(sessions: Sequence[Session], ramp: Sequence[int]) -> list[list[Session]]:
    """The sessions split over the ramp's stages in order (the last takes the remainder)."""
    size = len(sessions) // len(ramp)
    parts = [list(sessions[i * size : (i + 1) * size]) for i in range(len(ramp) - 1)]
    return [*parts, list(sessions[(len(ramp) - 1) * size :])]


class Attributor:
    """Names the pod of a request from counter deltas: the only pod whose queries grew."""

    def __init__(self, source: CounterSource) -> None:
        self.source = source
        self.last: Snapshot | None = None

    async def pod_of_last_request(self) -> str:
        now = await self.source.read()
        before, self.last = self.last, now
        if before is None:
            return ""
        grew = [pod for pod, c in delta(now, before).items() if c.queries > 0]
        return grew[0] if len(grew) == 1 else ""


async def _settled_read(source: CounterSource, settle_s: float) -> Snapshot:
    if settle_s > 0:
        await asyncio.sleep(settle_s)
    return await source.read()


async def run_report(cfg: ReportConfig, source: CounterSource, log: Any = None) -> dict[str, Any]:
    """Warm-up, counters, the ramp, counters: the report document."""
    cfg.check()
    if cfg.attribution == "counters" and not source.live:
        raise ReportError("--attribution counters needs live counters: --pods or --pool, not --prometheus")
    say = log or (lambda _msg: None)
    await source.read()  # unreadable counters fail here, before any traffic
    test_id = cfg.test_id or uuid.uuid4().hex[:8]
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        warm = await _warmup(http, cfg, test_id, say)
        header_seen = any(s.pod for s in warm)
        attribution = cfg.attribution
        if attribution == "auto":
            attribution = "header" if header_seen else ("counters" if source.live else "none")
        serial = attribution == "counters"
        say(f"attribution: {attribution}" + (" (the ramp runs one request at a time)" if serial else ""))
        before = await _settled_read(source, cfg.settle_s)
        sessions = make_sessions(cfg, test_id, cfg.sessions, "s")
        started = time.perf_counter()
        samples = await _ramp(http, cfg, sessions, source if serial else None, attribution, say)
        elapsed = time.perf_counter() - started
    after = await _settled_read(source, cfg.settle_s)
    if attribution == "header":
        _map_to_pods(samples, source.addresses)
    return build_document(cfg, test_id, attribution, serial, samples, delta(after, before), elapsed, source)


async def _warmup(http: aiohttp.ClientSession, cfg: ReportConfig, test_id: str, say: Any) -> list[Sample]:
    """Warm-up requests (their own test id): connections, the gateway's view of the pods, and a
    first look at the responses (is the served-endpoint header there?)."""
    count = max(cfg.warmup, 1)  # at least one: the gateway must answer before anything is measured
    sessions = make_sessions(cfg, f"{test_id}-warmup", count, "w")
    samples = await asyncio.gather(*(stream_one(http, cfg, s, 0, -1) for s in sessions))
    ok = [s for s in samples if s.ok]
    say(f"warm-up: {len(ok)}/{len(samples)} ok")
    if not ok:
        first = samples[0]
        why = f"HTTP {first.status}: {first.error}" if first.status else first.error
        raise ReportError(
            f"every warm-up request to {cfg.gateway} failed ({why}); check --gateway, --host and --model"
        )
    return list(samples)


async def _ramp(
    http: aiohttp.ClientSession,
    cfg: ReportConfig,
    sessions: list[Session],
    serial_source: CounterSource | None,
    attribution: str,
    say: Any,
) -> list[Sample]:
    samples: list[Sample] = []
    deadline = time.monotonic() + cfg.max_seconds
    attributor = Attributor(serial_source) if serial_source is not None else None
    if attributor is not None:
        await attributor.pod_of_last_request()  # the baseline

    async def run_session(session: Session, stage: int) -> None:
        for turn in range(cfg.turns):
            if time.monotonic() > deadline:
                samples.append(Sample(session.id, turn, stage, ok=False, error="not sent: --max-seconds"))
                continue
            sample = await stream_one(http, cfg, session, turn, stage)
            if attributor is not None:
                sample.pod = await attributor.pod_of_last_request()
            elif attribution != "header":
                sample.pod = ""
            samples.append(sample)
            if not sample.ok:
                break  # the conversation cannot go on without its answer

    for index, (concurrency, group) in enumerate(zip(cfg.ramp, stages(sessions, cfg.ramp), strict=True)):
        limit = 1 if attributor is not None else concurrency
        gate = asyncio.Semaphore(limit)

        async def gated(session: Session, stage: int, gate: asyncio.Semaphore) -> None:
            async with gate:
                await run_session(session, stage)

        await asyncio.gather(*(gated(s, index, gate) for s in group))
        say(f"stage {index + 1}/{len(cfg.ramp)}: {len(group)} sessions, {limit} at a time")
    return samples


def _map_to_pods(samples: list[Sample], addresses: dict[str, str]) -> None:
    """Header values (host:port) -> the pod names of the counter source, where they match."""
    by_address = {address: pod for pod, address in addresses.items()}
    for sample in samples:
        sample.pod = by_address.get(sample.pod, sample.pod)


# -- the document ---------------------------------------------------------------------------------


def _figures(values: list[float]) -> dict[str, float | None]:
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}

    def pct(p: float) -> float:
        return values[min(len(values) - 1, math.ceil(p * len(values)) - 1)]

    return {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "mean": statistics.fmean(values)}


def stickiness(samples: list[Sample]) -> dict[str, dict[str, Any]]:
    """Per session: requests with a known pod, its most-used pod, and that pod's share."""
    pods: dict[str, Counter[str]] = {}
    for s in samples:
        if s.ok:
            pods.setdefault(s.session, Counter())
            if s.pod:
                pods[s.session][s.pod] += 1
    out: dict[str, dict[str, Any]] = {}
    for session, counts in pods.items():
        known = sum(counts.values())
        top, top_count = counts.most_common(1)[0] if counts else ("", 0)
        out[session] = {
            "requests": known,
            "pods": len(counts),
            "top_pod": top,
            "stickiness": top_count / known if known else None,
        }
    return out


def build_document(
    cfg: ReportConfig,
    test_id: str,
    attribution: str,
    serial: bool,
    samples: list[Sample],
    counters: Snapshot,
    elapsed_s: float,
    source: CounterSource,
) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    hits = sum(c.hits for c in counters.values())
    queries = sum(c.queries for c in counters.values())
    sessions = stickiness(samples)
    shares = [v["stickiness"] for v in sessions.values() if v["stickiness"] is not None]
    served = Counter(s.pod for s in ok if s.pod)
    per_pod = {
        pod: {
            "requests": served.get(pod, 0),
            "hits": c.hits,
            "queries": c.queries,
            "hit_rate": c.hits / c.queries if c.queries else None,
        }
        for pod, c in sorted(counters.items())
    }
    for pod in served:  # header values no counter source names (e.g. behind port-forwards)
        per_pod.setdefault(pod, {"requests": served[pod], "hits": None, "queries": None, "hit_rate": None})
    return {
        "gateway": cfg.gateway,
        "host": cfg.host,
        "model": cfg.model,
        "test_id": test_id,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("gateway", "host", "model", "test_id")},
        "counters": source.describe(),
        "attribution": attribution,
        "serial": serial,
        "elapsed_s": elapsed_s,
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "error_examples": sorted({s.error for s in samples if not s.ok})[:5],
        "hit_rate": hits / queries if queries else None,
        "prefix_cache_hits": hits,
        "prefix_cache_queries": queries,
        "ttft_s": _figures([s.ttft_s for s in ok]),
        "tpot_s": _figures([s.tpot_s for s in ok]),
        "e2e_s": _figures([s.e2e_s for s in ok]),
        "stages": [
            {
                "concurrency": 1 if serial else c,
                "requests": len(group),
                "ttft_s": _figures([s.ttft_s for s in group]),
            }
            for c, group in zip(cfg.ramp, _by_stage(ok, len(cfg.ramp)), strict=True)
        ],
        "stickiness": {
            "mean": statistics.fmean(shares) if shares else None,
            "min": min(shares) if shares else None,
            "sessions_on_one_pod": sum(1 for v in sessions.values() if v["pods"] == 1),
            "sessions_measured": len(shares),
        },
        "sessions": sessions,
        "pods": per_pod,
        "samples": [asdict(s) for s in samples],
    }


def _by_stage(samples: list[Sample], count: int) -> list[list[Sample]]:
    groups: list[list[Sample]] = [[] for _ in range(count)]
    for s in samples:
        groups[s.stage].append(s)
    return groups


ATTRIBUTION_TEXT = {
    "header": "response header {}",
    "counters": "counter deltas (one request at a time)",
    "none": "unknown (no header, and counters not live)",
}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _sec(value: float | None) -> str:
    return "-" if value is None else (f"{value * 1000:.1f}ms" if value < 1 else f"{value:.2f}s")


def render(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    stick = doc["stickiness"]
    ramp = ",".join(str(s["concurrency"]) for s in doc["stages"])
    lines = [
        f"gateway {doc['gateway']}  model {doc['model']}  test {doc['test_id']}",
        f"{cfg['sessions']} sessions x {cfg['turns']} turns, ramp {ramp} sessions at a time, "
        f"{max(cfg['warmup'], 1)} warm-up requests; counters: {doc['counters']}",
        "pod of each request: " + ATTRIBUTION_TEXT[doc["attribution"]].format(cfg["served_header"]),
        f"requests {doc['requests']}, errors {doc['errors']}, {doc['elapsed_s']:.1f}s",
        f"prefix-cache hit rate (delta): {_pct(doc['hit_rate'])}  "
        f"({doc['prefix_cache_hits']:.0f} of {doc['prefix_cache_queries']:.0f} prompt tokens)",
        f"{'':6}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}",
    ]
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "e2e")):
        f = doc[key]
        lines.append(f"{label:6}" + "".join(f"{_sec(f[k]):>10}" for k in ("p50", "p90", "p99", "mean")))
    lines.append(
        "TTFT p50/p90 by stage (sessions at a time): "
        + ", ".join(
            f"{st['concurrency']}: {_sec(st['ttft_s']['p50'])}/{_sec(st['ttft_s']['p90'])}"
            for st in doc["stages"]
        )
    )
    lines.append(
        f"stickiness (share of a session's requests on its most-used pod): mean {_pct(stick['mean'])}, "
        f"min {_pct(stick['min'])}, {stick['sessions_on_one_pod']}/{len(doc['sessions'])} sessions on one pod"
    )
    lines.append("per pod: " + ", ".join(
        f"{pod} {v['requests']} req {_pct(v['hit_rate'])}" for pod, v in doc["pods"].items()
    ))  # fmt: skip
    if doc["error_examples"]:
        lines.append("errors: " + " | ".join(doc["error_examples"]))
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Latency percentiles, stickiness per session, requests and hit rate per pod."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_stick, ax_pods) = plt.subplots(1, 3, figsize=(15, 4))
    keys = ("p50", "p90", "p99", "mean")
    for i, (key, label) in enumerate((("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "e2e"))):
        values = [doc[key][k] or 0.0 for k in keys]
        ax_lat.bar([x + (i - 1) * 0.27 for x in range(len(keys))], values, 0.27, label=label)
    ax_lat.set_xticks(range(len(keys)), keys)
    ax_lat.set_yscale("log")
    ax_lat.set_title("Latency (s, client-side)")
    ax_lat.legend()
    sessions = doc["sessions"]
    ax_stick.bar(
        range(len(sessions)), [v["stickiness"] or 0.0 for v in sessions.values()], color="tab:purple"
    )
    ax_stick.set_ylim(0, 1.05)
    ax_stick.set_xlabel("session")
    ax_stick.set_title(f"Stickiness per session (mean {_pct(doc['stickiness']['mean'])})")
    pods = list(doc["pods"])
    ax_pods.bar(range(len(pods)), [doc["pods"][p]["requests"] for p in pods], color="tab:green")
    ax_pods.set_xticks(range(len(pods)), pods, rotation=30, ha="right", fontsize="small")
    ax_pods.set_ylabel("requests")
    ax_hit = ax_pods.twinx()
    rates = [doc["pods"][p]["hit_rate"] for p in pods]  # None (no queries): no point
    ax_hit.plot(range(len(pods)), [math.nan if r is None else r for r in rates], "ko")
    ax_hit.set_ylim(0, 1.05)
    ax_hit.set_ylabel("hit rate")
    ax_pods.set_title(f"Per pod (hit rate overall {_pct(doc['hit_rate'])})")
    fig.suptitle(f"{doc['gateway']} ({doc['model']}), test {doc['test_id']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the command ----------------------------------------------------------------------------------


def _ramp_arg(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ramp takes concurrencies like 1,2,4, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("--ramp concurrencies must be positive")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ReportConfig(gateway="")
    arg = p.add_argument
    arg("--gateway", required=True, help="the gateway's base URL, e.g. http://10.0.0.5:80")
    arg("--host", help="Host header to send (the HTTPRoute's hostname)")
    arg("--model", default=d.model)
    arg("--sessions", type=int, default=d.sessions, help=f"measured sessions (default {d.sessions})")
    arg("--turns", type=int, default=d.turns, help=f"requests per session (default {d.turns})")
    arg("--warmup", type=int, default=d.warmup, help=f"warm-up requests (default {d.warmup})")
    arg("--ramp", type=_ramp_arg, default=d.ramp, help="sessions in flight per stage (default 1,2,4)")
    arg("--system-tokens", type=int, default=d.system_tokens, help="the shared system prompt's length")
    arg("--session-tokens", type=int, default=d.session_tokens, help="each session's own context")
    arg("--question-tokens", type=int, default=d.question_tokens)
    arg("--output-tokens", type=int, default=d.output_tokens)
    arg("--api", choices=("chat", "completions"), default=d.api)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--pods", help="the model servers' metrics: host:port or URL, comma-separated")
    source.add_argument("--prometheus", help="a Prometheus server's URL (its HTTP API)")
    source.add_argument("--pool", help="an InferencePool's name: its ready pods, read from Kubernetes")
    arg("--namespace", default="default", help="--pool's namespace (default default)")
    arg("--kubeconfig", type=Path, help="--pool: kubeconfig (default $KUBECONFIG, ~/.kube/config)")
    arg("--prometheus-selector", default="", help='--prometheus: label matchers, e.g. namespace="llm"')
    arg("--settle", type=float, help="seconds before each counter read (default 0; 30 with --prometheus)")
    arg("--served-header", default=SERVED_HEADER, help="the response header naming the pod")
    arg("--attribution", choices=ATTRIBUTIONS, default="auto", help="how to tell each request's pod")
    arg("--max-seconds", type=float, default=d.max_seconds, help="bound on the ramp")
    arg("--test-id", default="", help="the id in the prompts (default: random)")
    arg("--out-dir", type=Path, default=Path("build/report"), help="report.json and report.png go here")
    arg("--quiet", action="store_true", help="no progress lines on stderr")


async def _source_from_args(args: argparse.Namespace) -> CounterSource:
    if args.pods:
        return PodsSource.from_list([u for u in args.pods.split(",") if u.strip()])
    if args.prometheus:
        return PrometheusSource(args.prometheus, args.prometheus_selector)
    return PodsSource(await pool_pods(args.pool, args.namespace, args.kubeconfig))


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    source = await _source_from_args(args)
    settle = args.settle if args.settle is not None else (30.0 if args.prometheus else 0.0)
    cfg = ReportConfig(
        gateway=args.gateway, model=args.model, host=args.host, sessions=args.sessions, turns=args.turns,
        warmup=args.warmup, ramp=args.ramp, system_tokens=args.system_tokens,
        session_tokens=args.session_tokens, question_tokens=args.question_tokens,
        output_tokens=args.output_tokens, api=args.api, served_header=args.served_header.lower(),
        attribution=args.attribution, settle_s=settle, max_seconds=args.max_seconds, test_id=args.test_id,
    )  # fmt: skip
    log = None if args.quiet else (lambda msg: print(f"report: {msg}", file=sys.stderr))
    try:
        return await run_report(cfg, source, log)
    finally:
        if isinstance(source, PodsSource):
            await source.close()


def main(args: argparse.Namespace) -> int:
    try:
        doc = asyncio.run(_main(args))
    except (ValueError, ReportError, CounterError) as exc:
        print(f"epp_bench report: error: {exc}", file=sys.stderr)
        return 2
    print(render(doc))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "report.json"
    out.write_text(json.dumps(doc, indent=2))
    print(f"json: {out}")
    try:
        plot(doc, args.out_dir / "report.png")
        print(f"png: {args.out_dir / 'report.png'}")
    except ImportError:
        print("png: skipped (needs matplotlib: pip install 'epp-bench[plots]')")
    return 0
