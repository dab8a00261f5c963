"""`python -m epp_bench overload`: flow control under overload (docs/flow-control.md).

Open-loop Poisson arrivals at about twice what the simulators serve, in three classes named by
InferenceObjectives (critical priority 100, standard 0, sheddable -10, given to epp with
`--inference-objectives-file`) and several fairness ids (`x-llm-d-inference-fairness-id`),
through real Envoy and epp, once per policy, each on fresh simulators:

- `epp`: epp's default config (flow control off; its legacy admission refuses sheddable requests
  while the utilization detector reads saturated);
- `epp-flow-control`: the same scorers with the `flowControl` gate on, a `concurrency-detector`
  sized to what a simulator runs at once (and first filter of the profile), bands 100 / 0 / -10
  (round-robin fairness, FCFS), a `priority-holdback-policy` (minCeiling 0.25 by priority value:
  ceilings 1.0 / 0.32 / 0.25 of the pool, so critical requests keep most of it) and a request
  TTL; the sheddable band holds one request, so sheddable requests are refused at once while the
  pool is saturated.

First an unloaded run (critical requests only, at a tenth of the capacity) gives the reference
TTFT. Per class: TTFT p50/p90 of the served requests, goodput (served requests/s), 429s (of which
TTL time-outs: `x-llm-d-request-dropped-reason: rejected-ttl-expired`), other errors, and the p90
time to a refusal. Every loop is bounded by the request count and by `--max-seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from epp_bench.gateway import EnvoyGateway, EppProcess
from epp_bench.runner import simulators

# (class, InferenceObjective priority, default share of the requests). At 2x overload a 20 %
# critical share is about 40 % of what the pool serves; at 30 % (the first runs' mix) critical
# requests alone take 60 % of it and already queue behind one another's prefills in the
# simulators (docs/flow-control.md, Measured).
CLASSES: tuple[tuple[str, int, float], ...] = (
    ("critical", 100, 0.2),
    ("standard", 0, 0.4),
    ("sheddable", -10, 0.4),
)
OBJECTIVE_HEADER = "x-llm-d-inference-objective"
FAIRNESS_HEADER = "x-llm-d-inference-fairness-id"
DROPPED_HEADER = "x-llm-d-request-dropped-reason"
POLICIES = ("epp", "epp-flow-control")

SCORERS = """\
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
"""
PROFILE_WITH_FILTER = """\
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: concurrency-detector}
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
"""


def flow_control_config(
    max_concurrency: int, ttl_s: float, sheddable_queue: int, min_ceiling: float, domain: str = "rank"
) -> str:
    """The upstream flow-control guide's shape, sized for the simulators; the detector is also
    the profile's first filter, so no simulator is given more than it runs at once, and a
    priority-holdback policy keeps headroom for the higher bands."""
    bands = "".join(
        f'  - priority: {priority}\n    maxRequests: "{size}"\n'
        "    fairnessPolicyRef: round-robin-fairness-policy\n    orderingPolicyRef: fcfs-ordering-policy\n"
        for priority, size in ((100, 500), (0, 200), (-10, sheddable_queue))
    )
    return f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
{SCORERS}- type: round-robin-fairness-policy
- type: priority-holdback-policy
  parameters: {{minCeiling: {min_ceiling:g}, domain: {domain}}}
- type: fcfs-ordering-policy
- type: concurrency-detector
  parameters: {{maxConcurrency: {max_concurrency}, concurrencyMode: requests}}
{PROFILE_WITH_FILTER}flowControl:
  defaultRequestTTL: "{ttl_s:g}s"
  usageLimitPolicyPluginRef: priority-holdback-policy
  saturationDetector: {{pluginRef: concurrency-detector}}
  priorityBands:
{bands}"""


def objectives_yaml() -> str:
    docs = [
        f"apiVersion: llm-d.ai/v1alpha2\nkind: InferenceObjective\nmetadata: {{name: {name}}}\n"
        f"spec: {{priority: {priority}, poolRef: {{name: pool}}}}\n"
        for name, priority, _ in CLASSES
    ]
    return "---\n".join(docs)


@dataclass
class OverloadConfig:
    simulators: int = 2
    max_num_seqs: int = 4  # what one simulator runs at once; the rest waits in its queue
    prompt_tokens: int = 256
    output_tokens: int = 32
    rate: float = 14.0  # requests/s: about twice what 2 simulators x 4 sequences serve (measured)
    seconds: float = 30.0
    unloaded_rate: float = 1.0
    unloaded_seconds: float = 30.0  # about 30 requests: enough for a p90
    tenants: int = 4
    ttl_s: float = 5.0
    sheddable_queue: int = 1
    min_ceiling: float = 0.25  # priority-holdback-policy: the lowest band's share of the pool
    holdback_domain: str = "value"  # ceilings by priority value: standard (0) sits near sheddable (-10)
    mix: Sequence[float] = tuple(share for _, _, share in CLASSES)  # critical, standard, sheddable
    policies: Sequence[str] = POLICIES
    max_seconds: float = 90.0  # hard bound per run
    seed: int = 1
    model: str = "sim-model"


@dataclass
class Outcome:
    cls: str
    tenant: str
    status: int = 0
    ok: bool = False
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    dropped: str = ""
    error: str = ""


@dataclass
class RunResult:
    outcomes: list[Outcome] = field(default_factory=list)
    elapsed_s: float = 0.0


def _prompt(rng: random.Random, tokens: int) -> str:
    # Random words: every prompt distinct, so no prefix-cache hits blur the latency picture.
    return " ".join(f"w{rng.randrange(1_000_000)}" for _ in range(tokens))


async def _send(
    session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int, out: Outcome
) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    headers = {"content-type": "application/json", OBJECTIVE_HEADER: out.cls, FAIRNESS_HEADER: out.tenant}
    started = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/completions", data=orjson.dumps(body), headers=headers) as resp:
            out.status = resp.status
            out.dropped = resp.headers.get(DROPPED_HEADER, "")
            if resp.status != 200:
                await resp.read()
                out.e2e_s = time.perf_counter() - started
                return
            async for line in resp.content:
                if line.startswith(b"data:") and b"[DONE]" not in line and not out.ttft_s:
                    out.ttft_s = time.perf_counter() - started
            out.ok = out.ttft_s > 0
    except (aiohttp.ClientError, TimeoutError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    out.e2e_s = time.perf_counter() - started


async def run_load(
    url: str, cfg: OverloadConfig, rate: float, seconds: float, classes: Sequence[tuple[str, int, float]]
) -> RunResult:
    """Poisson arrivals for `seconds` (at most rate x seconds x 1.5 requests), each bounded by
    cfg.max_seconds overall."""
    rng = random.Random(cfg.seed)
    names = [c[0] for c in classes]
    weights = [c[2] for c in classes]
    result = RunResult()
    limit = int(rate * seconds * 1.5) + 1
    timeout = aiohttp.ClientTimeout(total=cfg.max_seconds)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=1024)) as session:
        started = loop.time()
        tasks: list[asyncio.Task[None]] = []
        at = 0.0
        while len(tasks) < limit:
            at += rng.expovariate(rate)
            if at > seconds:
                break
            delay = started + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            out = Outcome(rng.choices(names, weights)[0], f"tenant-{rng.randrange(cfg.tenants)}")
            result.outcomes.append(out)
            prompt = _prompt(rng, cfg.prompt_tokens)
            tasks.append(
                asyncio.ensure_future(_send(session, url, cfg.model, prompt, cfg.output_tokens, out))
            )
        remaining = max(1.0, cfg.max_seconds - (loop.time() - started))
        _done, pending = await asyncio.wait(tasks, timeout=remaining)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task, out in zip(tasks, result.outcomes, strict=True):
            if task in pending:
                out.error = "not finished before --max-seconds"
        result.elapsed_s = loop.time() - started
    return result


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def summarize(run: RunResult) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, _, _ in CLASSES:
        mine = [o for o in run.outcomes if o.cls == name]
        if not mine:
            continue
        served = [o for o in mine if o.ok]
        refused = [o for o in mine if o.status == 429]
        out[name] = {
            "requests": len(mine),
            "served": len(served),
            "ttft_p50_s": _pct([o.ttft_s for o in served], 0.5),
            "ttft_p90_s": _pct([o.ttft_s for o in served], 0.9),
            "goodput_rps": len(served) / (run.elapsed_s or 1e-9),
            "rejected_429": len(refused),
            "ttl_timeouts": sum(o.dropped == "rejected-ttl-expired" for o in mine),
            "refusal_p90_s": _pct([o.e2e_s for o in refused], 0.9),
            "other_errors": len(mine) - len(served) - len(refused),
        }
    return out


async def run_policy(
    policy: str, cfg: OverloadConfig, workdir: Path, unloaded: bool = False
) -> dict[str, Any]:
    objectives = workdir / "objectives.yaml"
    objectives.write_text(objectives_yaml())
    args = ["--inference-objectives-file", str(objectives), "--log-level", "warning"]
    if policy == "epp-flow-control":
        text = flow_control_config(
            cfg.max_num_seqs, cfg.ttl_s, cfg.sheddable_queue, cfg.min_ceiling, cfg.holdback_domain
        )
        args += ["--config-text", text]
    elif policy != "epp":
        raise ValueError(f"unknown policy {policy!r} (known: {', '.join(POLICIES)})")
    sim_args = ["--max-num-seqs", str(cfg.max_num_seqs)]
    async with (
        simulators(cfg.simulators, cfg.model, sim_args) as backends,
        EppProcess(backends, extra_args=args) as epp,
        EnvoyGateway("epp", epp_grpc_port=epp.grpc_port) as gw,
    ):
        if unloaded:
            run = await run_load(gw.url, cfg, cfg.unloaded_rate, cfg.unloaded_seconds, CLASSES[:1])
        else:
            run = await run_load(gw.url, cfg, cfg.rate, cfg.seconds, mixed_classes(cfg))
        waits = await queue_waits(epp.metrics_url)
    classes = summarize(run)
    for name, priority, _ in CLASSES:
        if name in classes:
            classes[name]["queue_wait_mean_s"] = waits.get(str(priority), float("nan"))
    return {"policy": policy, "elapsed_s": run.elapsed_s, "classes": classes}


async def queue_waits(metrics_url: str) -> dict[str, float]:
    """Mean time dispatched requests spent in epp's flow-control queues, by priority, from epp's
    llm_d_epp_flow_control_request_queue_duration_seconds (empty without flow control)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(metrics_url) as resp,
    ):
        text = await resp.text()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "llm_d_epp_flow_control_request_queue_duration_seconds":
            continue
        for sample in family.samples:
            if sample.labels.get("outcome") != "Dispatched":
                continue
            prio = sample.labels["priority"]
            if sample.name.endswith("_sum"):
                sums[prio] = sums.get(prio, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                counts[prio] = counts.get(prio, 0.0) + sample.value
    return {p: sums.get(p, 0.0) / c for p, c in counts.items() if c}


async def run_overload(cfg: OverloadConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="epp-overload-") as tmp:
        workdir = Path(tmp)
        baseline = await run_policy("epp", cfg, workdir, unloaded=True)
        runs = [await run_policy(policy, cfg, workdir) for policy in cfg.policies]
    # The simulator's defaults: 15 ms + 0.25 ms per prompt token to prefill, ~20 ms a decode step.
    # A prefill holds up every running sequence's step, while a decode step serves all of them:
    # a simulator spends prefill + output x step / max_num_seqs on a request.
    service_s = 0.015 + cfg.prompt_tokens * 0.00025 + cfg.output_tokens * 0.02 / cfg.max_num_seqs
    capacity = cfg.simulators / service_s
    # What the pool really served with every class admitted (the `epp` run, saturated).
    served = next(
        (sum(c["goodput_rps"] for c in run["classes"].values()) for run in runs if run["policy"] == "epp"),
        None,
    )
    return {
        "config": {
            **cfg.__dict__,
            "policies": list(cfg.policies),
            "estimated_capacity_rps": capacity,
            "served_without_flow_control_rps": served,
        },
        "unloaded": baseline,
        "runs": runs,
    }


def table(doc: dict[str, Any]) -> str:
    unloaded = doc["unloaded"]["classes"].get("critical", {})
    lines = [
        f"unloaded critical TTFT p50 {unloaded.get('ttft_p50_s', float('nan')) * 1000:.0f} ms, "
        f"p90 {unloaded.get('ttft_p90_s', float('nan')) * 1000:.0f} ms; load "
        f"{doc['config']['rate']:g} req/s against an estimated capacity of "
        f"{doc['config']['estimated_capacity_rps']:.1f} req/s"
        + (
            f" (served without flow control: {served:.1f} req/s)"
            if (served := doc["config"].get("served_without_flow_control_rps")) is not None
            else ""
        ),
        "",
        "| policy | class | requests | served | TTFT p50 ms | TTFT p90 ms | queue wait mean ms "
        "| goodput req/s | 429s | of which TTL | refusal p90 ms | other errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in doc["runs"]:
        for name, s in run["classes"].items():
            lines.append(
                f"| {run['policy']} | {name} | {s['requests']} | {s['served']} "
                f"| {s['ttft_p50_s'] * 1000:.0f} | {s['ttft_p90_s'] * 1000:.0f} "
                f"| {s.get('queue_wait_mean_s', float('nan')) * 1000:.0f} "
                f"| {s['goodput_rps']:.2f} | {s['rejected_429']} | "
                f"{s['ttl_timeouts']} | {s['refusal_p90_s'] * 1000:.0f} | {s['other_errors']} |"
            )
    return "\n".join(lines).replace("| nan |", "| - |")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = OverloadConfig()
    p.add_argument("--simulators", type=int, default=d.simulators)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="what one simulator runs at once")
    p.add_argument("--rate", type=float, default=d.rate, help="overload arrivals, requests/s")
    p.add_argument("--seconds", type=float, default=d.seconds, help="how long arrivals go on")
    p.add_argument(
        "--unloaded-seconds", type=float, default=d.unloaded_seconds, help="the unloaded reference run"
    )
    p.add_argument("--ttl", type=float, default=d.ttl_s, help="flow control's defaultRequestTTL, seconds")
    p.add_argument("--tenants", type=int, default=d.tenants, help="fairness ids")
    p.add_argument(
        "--min-ceiling", type=float, default=d.min_ceiling, help="priority-holdback-policy's minCeiling"
    )
    p.add_argument(
        "--holdback-domain",
        choices=("rank", "value"),
        default=d.holdback_domain,
        help="priority-holdback-policy's domain: ceilings by band rank or by priority value",
    )
    p.add_argument(
        "--mix",
        default=",".join(f"{share:g}" for share in d.mix),
        help="shares of the critical, standard and sheddable classes, e.g. 0.3,0.4,0.3",
    )
    p.add_argument("--policy", action="append", choices=POLICIES, help="repeat for several (default: both)")
    p.add_argument("--max-seconds", type=float, default=d.max_seconds, help="hard bound per run")
    p.add_argument("--out", type=Path, help="write the results JSON here")


def _mix(text: str) -> tuple[float, ...]:
    try:
        shares = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise SystemExit(f"--mix: three numbers separated by commas, got {text!r}") from None
    if len(shares) != len(CLASSES) or any(s < 0 for s in shares) or not sum(shares) > 0:
        raise SystemExit(f"--mix: three non-negative shares, not all zero, got {text!r}")
    return shares


def config_from_args(args: argparse.Namespace) -> OverloadConfig:
    return OverloadConfig(
        simulators=args.simulators,
        max_num_seqs=args.max_num_seqs,
        rate=args.rate,
        seconds=args.seconds,
        unloaded_seconds=args.unloaded_seconds,
        ttl_s=args.ttl,
        tenants=args.tenants,
        min_ceiling=args.min_ceiling,
        holdback_domain=args.holdback_domain,
        mix=_mix(args.mix),
        policies=args.policy or POLICIES,
        max_seconds=args.max_seconds,
    )


def mixed_classes(cfg: OverloadConfig) -> list[tuple[str, int, float]]:
    """The classes with the shares of `--mix`."""
    return [(name, prio, share) for (name, prio, _), share in zip(CLASSES, cfg.mix, strict=True)]


def main(args: argparse.Namespace) -> int:
    doc = asyncio.run(run_overload(config_from_args(args)))
    print(table(doc))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2))
        print(f"results: {args.out}")
    return 0
