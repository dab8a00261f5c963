"""Run one workload once per routing policy, each on fresh simulators, and compare.

Per policy: start N simulators (one subprocess), the policy's router (Envoy + epp, Envoy alone,
or a peer router: peers.py), send the workload through it, read the simulators' own prefix-cache
counters, stop everything. All processes bind 127.0.0.1 on free ports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from epp_bench.floor import (
    FLOOR_POLICY,
    FLOOR_ROUTER,
    floor_sim_args,
    floor_workload,
    prewarm,
    prewarm_seconds,
)
from epp_bench.gateway import EnvoyGateway, EppProcess, announcing_process
from epp_bench.load import LoadResult, run_load
from epp_bench.peers import PEERS, peer_router
from epp_bench.sim.__main__ import parse_args as parse_sim_args
from epp_bench.workloads import Workload, oracle_hit_rate

LOAD_ONLY_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
"""

PREFIX_ONLY_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 1}
"""

# The named config that keeps prefix groups together at moderate load (docs/benchmarks.md).
TUNED_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "epp-tuned.yaml"


def sim_prefill_tokens_per_s(sim_args: Sequence[str]) -> float:
    """The simulators' uncached prefill rate in real time: 1 / (prefill time a token x time factor),
    with their own defaults for what `sim_args` leaves out."""
    args = parse_sim_args(list(sim_args))
    return 1.0 / (float(args.prefill_time_per_token_s) * float(args.time_factor))


def _shipped_config(path: Path, policy: str) -> str:
    """The text of a config under examples/configs, which only a source checkout has."""
    if not path.is_file():
        raise ValueError(f"policy {policy!r} needs {path} (a source checkout)")
    return path.read_text()


def tuned_config(sim_args: Sequence[str]) -> str:
    """examples/configs/epp-tuned.yaml with `peakPrefillThroughput` set to the simulators' prefill
    rate, as its comment tells an operator to set it to their model server's (the file's 4,000 is
    the simulator's at its default speed; `--sim-arg=--time-factor=4` makes it 1,000)."""
    doc = yaml.safe_load(_shipped_config(TUNED_CONFIG, "epp-tuned"))
    for plugin in doc["plugins"]:
        if plugin["type"] == "prefix-cache-affinity-filter":
            plugin["parameters"]["peakPrefillThroughput"] = round(sim_prefill_tokens_per_s(sim_args))
    return yaml.safe_dump(doc, sort_keys=False)


# The named config that keeps prefix groups whole until a pod's wait outweighs a cold prefill
# (docs/benchmarks.md, ladder D); not in the demo.
ADAPTIVE_CONFIG = TUNED_CONFIG.with_name("epp-adaptive.yaml")


def adaptive_config(sim_args: Sequence[str]) -> str:
    """examples/configs/epp-adaptive.yaml as it is (its idleThreshold is the ladder's 4 slots - 1;
    its latency model learns the simulators' speed from their responses)."""
    return _shipped_config(ADAPTIVE_CONFIG, "epp-adaptive")


# epp's default config behind an Envoy that does not send epp the response body (ext_proc's
# response_body_mode NONE): the same routing without the per-chunk ext_proc round trip that the
# inference extension's gateway configs add to every streamed token (docs/benchmarks.md).
REQUEST_ONLY_POLICY = "epp-request-only"
# Policy name -> epp config text, or what makes it from the simulators' flags (None = epp's
# built-in default config).
EPP_POLICIES: dict[str, str | Callable[[Sequence[str]], str] | None] = {
    "epp": None,
    "epp-tuned": tuned_config,
    "epp-adaptive": adaptive_config,
    REQUEST_ONLY_POLICY: None,
    "epp-load-only": LOAD_ONLY_CONFIG,
    "epp-prefix-only": PREFIX_ONLY_CONFIG,
}
BASELINE_POLICIES = ("round-robin", "vllm-router")
ALL_POLICIES = (
    "round-robin",
    "epp",
    "epp-tuned",
    REQUEST_ONLY_POLICY,
    "epp-load-only",
    "epp-prefix-only",
    *PEERS,
)
# Every policy name `--policy` takes: the demo's (ALL_POLICIES), the ones run only when named, and
# the shared-cache floor (floor.py: a reference row, not a router).
KNOWN_POLICIES = (
    *ALL_POLICIES,
    *(name for name in EPP_POLICIES if name not in ALL_POLICIES),
    FLOOR_POLICY,
)


@dataclass
class PolicyResult:
    name: str
    summary: dict[str, Any]
    hit_rate: float
    served_by: dict[str, int]
    load: LoadResult


@dataclass
class BenchConfig:
    workload: Workload
    policies: Sequence[str] = ALL_POLICIES
    simulators: int = 8
    model: str = "sim-model"
    sim_args: Sequence[str] = ()
    max_seconds: float = 120.0
    custom_configs: dict[str, Path] = field(default_factory=dict)  # extra policies: name -> epp config file
    epp_args: Sequence[str] = ()


@contextlib.asynccontextmanager
async def simulators(count: int, model: str, extra: Sequence[str]) -> AsyncIterator[list[str]]:
    """N simulators in one subprocess; yields their host:port addresses."""
    args = [
        sys.executable,
        "-m",
        "epp_bench.sim",
        "--count",
        str(count),
        "--base-port",
        "0",
        "--model",
        model,
        *extra,
    ]
    async with announcing_process(args, count, "simulators", column=1) as addresses:
        yield addresses


@contextlib.asynccontextmanager
async def router(policy: str, backends: Sequence[str], cfg: BenchConfig) -> AsyncIterator[str]:
    """Start the policy's routing path in front of the backends; yields the URL clients use."""
    if policy == "round-robin":
        async with EnvoyGateway("round-robin", backends=backends) as gw:
            yield gw.url
        return
    if policy in PEERS:
        async with peer_router(PEERS[policy], backends) as url:
            yield url
        return
    if policy in cfg.custom_configs:
        config_args = ["--config-file", str(cfg.custom_configs[policy])]
    elif policy in EPP_POLICIES:
        config = EPP_POLICIES[policy]
        text = config(cfg.sim_args) if callable(config) else config
        config_args = [] if text is None else ["--config-text", text]
    else:
        raise ValueError(
            f"unknown policy {policy!r} (known: {', '.join((*KNOWN_POLICIES, *cfg.custom_configs))})"
        )
    async with (
        EppProcess(backends, extra_args=[*config_args, "--log-level", "warning", *cfg.epp_args]) as epp,
        EnvoyGateway("epp", epp_grpc_port=epp.grpc_port, response_body=policy != REQUEST_ONLY_POLICY) as gw,
    ):
        yield gw.url


async def summed_samples(
    urls: Sequence[str], names: Sequence[str], timeout_s: float = 5.0
) -> dict[str, float]:
    """Each sample name of `names` summed over the Prometheus pages at `urls` (0 where absent)."""
    sums = dict.fromkeys(names, 0.0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        for url in urls:
            async with session.get(url) as resp:
                text = await resp.text()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name in sums:
                        sums[sample.name] += sample.value
    return sums


async def prefix_cache_counters(backends: Sequence[str]) -> tuple[float, float]:
    """Sum of the simulators' vllm:prefix_cache_hits_total and queries_total (tokens)."""
    hits, queries = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"
    sums = await summed_samples([f"http://{backend}/metrics" for backend in backends], (hits, queries))
    return sums[hits], sums[queries]


async def run_policy(
    policy: str, cfg: BenchConfig, progress: Callable[[int], object] | None = None
) -> PolicyResult:
    if policy == FLOOR_POLICY:
        return await run_floor(cfg, progress)
    async with (
        simulators(cfg.simulators, cfg.model, cfg.sim_args) as backends,
        router(policy, backends, cfg) as url,
    ):
        load = await run_load(cfg.workload, url, cfg.model, cfg.max_seconds, progress)
        hits, queries = await prefix_cache_counters(backends)
    return PolicyResult(policy, load.summary(), hits / queries if queries else 0.0, _served_by(load), load)


async def run_floor(cfg: BenchConfig, progress: Callable[[int], object] | None = None) -> PolicyResult:
    """The shared-cache floor (floor.py): simulators pre-warmed with every group's prefix, each
    group's first request cold, epp routing by load. Its hit rate counts the load's requests only."""
    workload = floor_workload(cfg.workload)
    workload.turns()  # draws the system prompts to pre-warm
    sim_args = floor_sim_args(cfg.sim_args, workload)
    async with simulators(cfg.simulators, cfg.model, sim_args) as backends:
        await prewarm(backends, cfg.model, workload.system_prompts, prewarm_seconds(sim_args, workload))
        hits_before, queries_before = await prefix_cache_counters(backends)
        async with router(FLOOR_ROUTER, backends, dataclasses.replace(cfg, sim_args=sim_args)) as url:
            load = await run_load(workload, url, cfg.model, cfg.max_seconds, progress)
        hits, queries = await prefix_cache_counters(backends)
    hits, queries = hits - hits_before, queries - queries_before
    hit_rate = hits / queries if queries else 0.0
    return PolicyResult(FLOOR_POLICY, load.summary(), hit_rate, _served_by(load), load)


def _served_by(load: LoadResult) -> dict[str, int]:
    served: dict[str, int] = {}
    for r in load.results:
        if r.ok:
            served[r.served_by] = served.get(r.served_by, 0) + 1
    return served


async def run_bench(cfg: BenchConfig, show_progress: bool = True) -> dict[str, Any]:
    """Every policy in turn; the result document of `python -m epp_bench run --out`.

    The progress bar is tqdm's (the `plots` extra); without tqdm there is none."""
    try:
        from tqdm import tqdm
    except ImportError:
        show_progress = False

    requests = len(cfg.workload.turns())
    policies: dict[str, Any] = {}
    oracle: float | None = None
    for policy in cfg.policies:
        if not show_progress:
            result = await run_policy(policy, cfg)
        else:
            bar = tqdm(
                total=requests,
                desc=f"{policy:>16}",
                unit="req",
                leave=True,
                file=sys.stderr,
            )
            try:
                result = await run_policy(policy, cfg, bar.update)
            finally:
                bar.close()
        policies[policy] = {**result.summary, "hit_rate": result.hit_rate, "served_by": result.served_by}
        if oracle is None and result.load.prompts and policy != FLOOR_POLICY:
            oracle = oracle_hit_rate(result.load.prompts)
    if oracle is None and FLOOR_POLICY in policies:  # the floor alone: the workload's own prompts
        sent = int(policies[FLOOR_POLICY]["requests"])
        oracle = oracle_hit_rate([turn.prompt for turn in cfg.workload.turns()[:sent]])
    return {
        "policies": policies,
        "oracle_hit_rate": oracle if oracle is not None else 0.0,
        "workload": cfg.workload.describe(),
        "simulators": cfg.simulators,
        "sim_args": list(cfg.sim_args),
    }


# The figures of each policy at each rate in a ladder's "summary".
LADDER_FIGURES = (
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "itl_mean_s",
    "hit_rate",
    "pods_per_group",
    "group_on_top_pod",
    "errors",
    "requests",
)


def ladder_config(
    cfg: BenchConfig, rate: float, seconds: float | None, seed: int | None = None
) -> BenchConfig:
    """The config for one rung of a load ladder: Poisson arrivals at `rate`, and with `seconds`
    at most rate x seconds requests (so a low rate does not run past the per-policy bound); with
    `seed`, the workload drawn from that seed (other prompts, order and arrival times)."""
    workload = cfg.workload
    max_requests = workload.max_requests
    if seconds is not None:
        max_requests = min(max_requests, max(1, round(rate * seconds)))
    rung = dataclasses.replace(
        workload,
        arrivals=dataclasses.replace(workload.arrivals, rate=rate, ladder=()),
        max_requests=max_requests,
        seed=workload.seed if seed is None else seed,
        system_prompts=[],
    )
    return dataclasses.replace(cfg, workload=rung)


def ladder_point(rate: float, docs: Sequence[dict[str, Any]], policy: str) -> dict[str, Any]:
    """One policy's point at one rate: each figure's median over the seeds' runs (the run itself
    with one seed), and each run's TTFT p90 and hit rate in seed order."""
    runs = [doc["policies"][policy] for doc in docs if policy in doc["policies"]]
    point: dict[str, Any] = {"rate": rate}
    for key in LADDER_FIGURES:
        values = [r.get(key) for r in runs]
        numbers = [float(v) for v in values if isinstance(v, int | float)]
        point[key] = statistics.median(numbers) if len(numbers) == len(values) and numbers else None
    point["oracle_hit_rate"] = statistics.median(doc["oracle_hit_rate"] for doc in docs)
    point["seeds"] = len(runs)
    point["ttft_p90_s_each"] = [r.get("ttft_p90_s") for r in runs]
    point["hit_rate_each"] = [r.get("hit_rate") for r in runs]
    return point


async def run_ladder(
    cfg: BenchConfig,
    rates: Sequence[float],
    seconds: float | None = None,
    show_progress: bool = True,
    seeds: int = 1,
) -> dict[str, Any]:
    """The workload at each rate, every policy at each rate (fresh simulators each time): one
    `run_bench` document per rung and seed under "runs", and "summary": policy -> one point per
    rate (TTFT p50/p90/p99, hit rate, errors; the median over `seeds` workloads drawn from
    seeds seed, seed+1, ..., every policy meeting the same ones) for the summary table and plot.

    One run's TTFT p90 at a rate where a tenth of the requests are a prefix group's first (cold)
    request sits on the edge of the cold prefills and moves by seconds with the draw of arrivals;
    several seeds tell a difference between policies from that noise."""
    if seeds < 1:
        raise ValueError("seeds must be at least 1")
    runs: list[dict[str, Any]] = []
    summary: dict[str, list[dict[str, Any]]] = {}
    for rate in rates:
        rung: list[dict[str, Any]] = []
        for seed in range(cfg.workload.seed, cfg.workload.seed + seeds):
            if show_progress:
                print(f"ladder: {rate:g} req/s" + (f", seed {seed}" if seeds > 1 else ""), file=sys.stderr)
            doc = await run_bench(ladder_config(cfg, rate, seconds, seed), show_progress)
            rung.append(doc)
            runs.append({"rate": rate, "seed": seed, **doc})
        for name in dict.fromkeys(name for doc in rung for name in doc["policies"]):
            summary.setdefault(name, []).append(ladder_point(rate, rung, name))
    return {
        "ladder": list(rates),
        "ladder_seconds": seconds,
        "ladder_seeds": seeds,
        "runs": runs,
        "summary": summary,
        "workload": cfg.workload.describe(),
        "simulators": cfg.simulators,
        "sim_args": list(cfg.sim_args),
    }
