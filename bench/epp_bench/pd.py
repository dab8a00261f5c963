"""Prefill/decode disaggregation against aggregated serving, on the same number of simulators.

    python -m epp_bench.pd [--simulators 4 --prefill 2 --rate 1.5 --requests 60 --out pd.json]

Both runs send the same workload (long prompts, short answers) through a real Envoy and epp:

- aggregated: N simulators (role both) behind epp's default config;
- P/D: K prefill simulators and N-K decode simulators, each decode one behind a routing sidecar
  (bench/epp_bench/sidecar.py). epp's endpoints, from an endpoints file, are the sidecars (labelled
  `llm-d.ai/role: decode`) and the prefill simulators (`llm-d.ai/role: prefill`); its config is
  PD_CONFIG: a decode and a prefill profile, `prefix-based-pd-decider`, `disagg-profile-handler`.

Prints TTFT, inter-token latency, throughput, and how many requests epp disaggregated (read from
its `llm_d_inference_scheduler_disagg_decision_total`). A run of the defaults takes about 80 seconds
on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from epp_bench.gateway import EnvoyGateway, EppProcess, announcing_process
from epp_bench.load import LoadResult, run_load
from epp_bench.report import table
from epp_bench.runner import prefix_cache_counters, simulators
from epp_bench.workloads import Arrivals, SharedPrefix, Workload, oracle_hit_rate

ROLE_LABEL = "llm-d.ai/role"
DECISION_METRIC = "llm_d_inference_scheduler_disagg_decision_total"

# The default config's scorers in both profiles; a prefill when the decode pod would have to
# compute at least 512 prompt tokens itself.
PD_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: decode-filter
- type: prefill-filter
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: prefix-based-pd-decider
  parameters:
    nonCachedTokens: 512
- type: disagg-profile-handler
  parameters:
    deciders:
      prefill: prefix-based-pd-decider
schedulingProfiles:
- name: decode
  plugins:
  - pluginRef: decode-filter
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
"""


@dataclass
class PdBenchConfig:
    simulators: int = 4
    prefill: int = 2  # of the simulators, how many prefill in the P/D run
    rate: float = 1.5  # requests/s, Poisson
    requests: int = 60
    system_tokens: int = 256  # shared by the requests of a group
    groups: int = 4
    prompt_tokens: int = 3072  # each request's own long part (a document)
    output_tokens: int = 64
    model: str = "sim-model"
    sim_args: Sequence[str] = ()
    max_seconds: float = 60.0  # bound on each run's load
    seed: int = 1
    modes: Sequence[str] = ("aggregated", "pd")
    config_text: str = PD_CONFIG
    epp_args: Sequence[str] = field(default_factory=lambda: ["--log-level", "warning"])

    def workload(self) -> Workload:
        """Long prompts, short answers: a small shared instruction and a long document each."""
        per_group = -(-self.requests // self.groups)
        spec = SharedPrefix(
            groups=self.groups,
            prompts_per_group=per_group,
            system_tokens=self.system_tokens,
            question_tokens=self.prompt_tokens,
            output_tokens=self.output_tokens,
        )
        return Workload(spec, Arrivals(rate=self.rate), seed=self.seed, max_requests=self.requests)

    def validate(self) -> None:
        if self.simulators < 2:
            raise ValueError("--simulators must be at least 2 (P/D needs a prefill and a decode one)")
        if not 1 <= self.prefill < self.simulators:
            raise ValueError(f"--prefill must be between 1 and {self.simulators - 1}")
        if self.requests < 1 or self.rate <= 0 or self.max_seconds <= 0:
            raise ValueError("--requests, --rate and --max-seconds must be positive")


@contextlib.asynccontextmanager
async def sidecars(decodes: Sequence[str]) -> AsyncIterator[list[str]]:
    """One routing sidecar per decode simulator, in one subprocess; yields their addresses."""
    args = [sys.executable, "-m", "epp_bench.sidecar", *[a for d in decodes for a in ("--decode", d)]]
    async with announcing_process(args, len(decodes), "sidecars", column=0) as addresses:
        yield addresses


def endpoints_yaml(prefill: Sequence[str], decode: Sequence[str]) -> str:
    """epp's endpoints file: prefill simulators and decode sidecars, labelled with their role."""
    entries = []
    for role, addresses in (("prefill", prefill), ("decode", decode)):
        for i, address in enumerate(addresses):
            host, _, port = address.rpartition(":")
            entries.append(
                {"address": host, "port": int(port), "name": f"{role}-{i}", "labels": {ROLE_LABEL: role}}
            )
    return yaml.safe_dump(entries, sort_keys=False)


async def disagg_decisions(epp: EppProcess) -> dict[str, int]:
    """decision_type -> count, from epp's llm_d_inference_scheduler_disagg_decision_total."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(epp.metrics_url) as resp,
    ):
        text = await resp.text()
    out: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == DECISION_METRIC:
                kind = sample.labels["decision_type"]
                out[kind] = out.get(kind, 0) + int(sample.value)
    return out


def _p90(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(0.9 * len(values)))] if values else math.nan


def summarize(load: LoadResult, hits: float, queries: float, decisions: dict[str, int]) -> dict[str, Any]:
    ok = [r for r in load.results if r.ok]
    return {
        **load.summary(),
        "itl_p90_s": _p90([r.itl_s for r in ok if r.itl_s is not None]),
        "e2e_p50_s": sorted(r.e2e_s for r in ok)[len(ok) // 2] if ok else math.nan,
        "hit_rate": hits / queries if queries else 0.0,
        "decisions": decisions,
    }


async def run_aggregated(cfg: PdBenchConfig) -> dict[str, Any]:
    async with (
        simulators(cfg.simulators, cfg.model, [*cfg.sim_args]) as backends,
        EppProcess(backends, extra_args=list(cfg.epp_args)) as epp,
        EnvoyGateway("epp", epp_grpc_port=epp.grpc_port) as gateway,
    ):
        load = await run_load(cfg.workload(), gateway.url, cfg.model, cfg.max_seconds)
        hits, queries = await prefix_cache_counters(backends)
        decisions = await disagg_decisions(epp)
    return summarize(load, hits, queries, decisions)


async def run_pd(cfg: PdBenchConfig) -> dict[str, Any]:
    decode_count = cfg.simulators - cfg.prefill
    prefill_args = ["--role", "prefill", "--name-prefix", "prefill", *cfg.sim_args]
    decode_args = ["--role", "decode", "--name-prefix", "decode", *cfg.sim_args]
    with tempfile.TemporaryDirectory(prefix="bench-pd-") as tmp:
        endpoints_file = Path(tmp) / "endpoints.yaml"
        async with (
            simulators(cfg.prefill, cfg.model, prefill_args) as prefills,
            simulators(decode_count, cfg.model, decode_args) as decodes,
            sidecars(decodes) as fronts,
        ):
            endpoints_file.write_text(endpoints_yaml(prefills, fronts))
            extra = ["--endpoints-file", str(endpoints_file), "--config-text", cfg.config_text, *cfg.epp_args]
            async with (
                EppProcess([], extra_args=extra) as epp,
                EnvoyGateway("epp", epp_grpc_port=epp.grpc_port) as gateway,
            ):
                load = await run_load(cfg.workload(), gateway.url, cfg.model, cfg.max_seconds)
                hits, queries = await prefix_cache_counters([*prefills, *decodes])
                decisions = await disagg_decisions(epp)
    return summarize(load, hits, queries, decisions)


async def run_pd_bench(cfg: PdBenchConfig) -> dict[str, Any]:
    """Each mode in turn on fresh processes; the document `--out` writes."""
    cfg.validate()
    runners = {"aggregated": run_aggregated, "pd": run_pd}
    results = {}
    for mode in cfg.modes:
        results[mode] = await runners[mode](cfg)
    return {
        "policies": results,
        "oracle_hit_rate": oracle_hit_rate([turn.prompt for turn in cfg.workload().turns()]),
        "workload": cfg.workload().describe(),
        "simulators": cfg.simulators,
        "prefill": cfg.prefill,
        "sim_args": list(cfg.sim_args),
    }


def _seconds(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}s"


def pd_table(doc: dict[str, Any]) -> str:
    """epp_bench.report's table plus the P/D figures."""
    lines = table(doc).splitlines()
    n, k = doc["simulators"], doc["prefill"]
    lines.append("")
    lines.append(f"{'mode':<16} {'ITL p90':>9} {'E2E p50':>9} {'decode-only':>12} {'prefill-decode':>15}")
    for name, f in doc["policies"].items():
        decisions = f.get("decisions", {})
        lines.append(
            f"{name:<16} {_seconds(f.get('itl_p90_s')):>9} {_seconds(f.get('e2e_p50_s')):>9} "
            f"{decisions.get('decode-only', '-'):>12} {decisions.get('prefill-decode', '-'):>15}"
        )
    setups = {
        "aggregated": f"aggregated: {n} simulators (role both)",
        "pd": f"pd: {k} prefill + {n - k} decode simulators, the decode ones behind sidecars",
    }
    lines.append("; ".join(setups[name] for name in doc["policies"] if name in setups))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    d = PdBenchConfig()
    p = argparse.ArgumentParser(
        prog="python -m epp_bench.pd",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--simulators", type=int, default=d.simulators, help="simulators in each run")
    p.add_argument("--prefill", type=int, default=d.prefill, help="of them, prefill ones in the P/D run")
    p.add_argument("--rate", type=float, default=d.rate, help="Poisson arrivals, requests/s")
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="each request's own part")
    p.add_argument("--system-tokens", type=int, default=d.system_tokens, help="shared within a group")
    p.add_argument("--groups", type=int, default=d.groups)
    p.add_argument("--output-tokens", type=int, default=d.output_tokens)
    p.add_argument("--max-seconds", type=float, default=d.max_seconds, help="hard bound per run")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--mode", action="append", choices=("aggregated", "pd"), help="default: both")
    p.add_argument("--config-file", type=Path, help="epp config for the P/D run (default: PD_CONFIG)")
    p.add_argument(
        "--sim-arg", action="append", default=[], help="simulator flag, e.g. --sim-arg=--time-factor=0.5"
    )
    p.add_argument("--out", type=Path, help="write the results JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = PdBenchConfig(
        simulators=args.simulators,
        prefill=args.prefill,
        rate=args.rate,
        requests=args.requests,
        system_tokens=args.system_tokens,
        groups=args.groups,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        max_seconds=args.max_seconds,
        seed=args.seed,
        modes=args.mode or ("aggregated", "pd"),
        config_text=args.config_file.read_text() if args.config_file else PD_CONFIG,
        sim_args=[a for arg in args.sim_arg for a in arg.split("=", 1)],
    )
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"epp_bench.pd: error: {exc}", file=sys.stderr)
        return 2
    doc = asyncio.run(run_pd_bench(cfg))
    print(pd_table(doc))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2))
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
