"""`python -m epp_bench run ...` compares routing policies; `python -m epp_bench demo` is the default
comparison.

Examples:
    python -m epp_bench demo
    python -m epp_bench run --policy round-robin --policy epp --simulators 4 --rate 8 --out results.json
    python -m epp_bench run --policy epp --policy mine=my-config.yaml     # your config against the default
    python -m epp_bench run --workload multi-turn --users 16 --rounds 5 --rate 2
    python -m epp_bench demo --ladder 8,14,20 --plot ladder.png   # quality against load
    python -m epp_bench overload --rate 21 --seconds 20   # flow control at 2x load (docs/flow-control.md)
    python -m epp_bench soak --duration 10m        # lost requests, epp's RSS growth, p99 (epp_bench.soak)
    python -m epp_bench extproc | pick | scrape | memory   # epp's own costs (epp_bench.perf)
    python -m epp_bench report --gateway http://GW --pods 10.0.0.7:8000,10.0.0.8:8000   # docs/report.md
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
from pathlib import Path

from epp_bench import gateway_report, overload, soak
from epp_bench.floor import FLOOR_POLICY
from epp_bench.perf import extproc, memory, pick, scrape
from epp_bench.report import ladder_plot, ladder_tables, plot, table
from epp_bench.runner import ALL_POLICIES, EPP_POLICIES, KNOWN_POLICIES, BenchConfig, run_bench, run_ladder
from epp_bench.workloads import Arrivals, MultiTurn, SharedPrefix, Workload

# The performance commands (epp_bench.perf): name, module, help.
_PERF = (
    ("extproc", extproc, "ext_proc requests/s and CPU per request: epp against a do-nothing server"),
    ("pick", pick, "the cost of one pick (scheduling cycle) at N endpoints and C prompt characters"),
    ("scrape", scrape, "an idle epp's CPU scraping N pods' realistic vLLM /metrics"),
    ("memory", memory, "the prefix index's bytes per entry and RSS at 100 pods x 31,250 blocks"),
)


def demo_config() -> BenchConfig:
    """The demo: 8 simulators, a shared-prefix workload near the saturation of round-robin routing,
    about four to five minutes for the ten policies on a 2-core machine.

    Each simulator holds 512 blocks (8k tokens): about 5 of the 16 system prompts. Spread over all
    8 simulators (round-robin), prompts keep missing and prefill work saturates the simulators at
    ~20 req/s; kept on one simulator per group, the prompts fit."""
    spec = SharedPrefix(
        groups=16, prompts_per_group=24, system_tokens=1536, question_tokens=64, output_tokens=32
    )
    return BenchConfig(
        workload=Workload(spec, Arrivals(rate=20.0), seed=1),
        simulators=8,
        sim_args=["--kv-cache-blocks", "512", "--max-num-seqs", "16"],
        max_seconds=60.0,
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _ladder(text: str) -> list[float] | tuple[tuple[float, float], ...]:
    """RATE,RATE,...: a load ladder (the whole run once per rate), a list; RATE:SECONDS,...:
    arrival stages within one run, a tuple of (rate, seconds)."""
    if ":" not in text:
        try:
            rates = [float(r) for r in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError("--ladder takes RATE,RATE,... or RATE:SECONDS,...") from None
        if not rates or any(r <= 0 for r in rates):
            raise argparse.ArgumentTypeError("--ladder rates must be positive")
        return rates
    try:
        stages = tuple((float(r), float(s)) for r, s in (part.split(":") for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError("--ladder takes RATE:SECONDS,RATE:SECONDS,...") from None
    if not stages or any(r <= 0 or s <= 0 for r, s in stages):
        raise argparse.ArgumentTypeError("--ladder rates and durations must be positive")
    return stages


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m epp_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a workload once per policy")
    demo = sub.add_parser("demo", help="the default comparison: ten policies (about five minutes)")
    soak.add_arguments(
        sub.add_parser("soak", help="steady load with pod churn and failing scrapes (10 minutes)")
    )
    for name, module, what in _PERF:
        module.add_arguments(sub.add_parser(name, help=what, description=module.__doc__))
    overload.add_arguments(
        sub.add_parser(
            "overload",
            help="flow control at twice the pods' capacity, three priority classes (docs/flow-control.md)",
            description=overload.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    gateway_report.add_arguments(
        sub.add_parser(
            "report",
            help="cache-hit rate, TTFT/TPOT and stickiness through a live gateway (docs/report.md)",
            description=gateway_report.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    for q in (run, demo):
        q.add_argument("--out", type=Path, help="write the results JSON here")
        q.add_argument("--plot", type=Path, help="write a PNG of TTFT and throughput per policy here")
        q.add_argument("--no-progress", action="store_true")
        q.add_argument(
            "--ladder",
            type=_ladder,
            help="load ladder RATE,RATE,...: every policy at each rate, a table per rate and a summary "
            "(--plot: TTFT p90 and hit rate against rate); for run also RATE:SECONDS,... (arrival "
            "stages within one run, instead of --rate)",
        )
        q.add_argument(
            "--ladder-seconds",
            type=float,
            default=24.0,
            help="load ladder: at most RATE x this many requests per rate (default 24)",
        )
        q.add_argument(
            "--ladder-seeds",
            type=_positive_int,
            default=1,
            help="load ladder: run each rate with this many workloads (the workload's seed, +1, ...); "
            "the summary gives each figure's median and each seed's TTFT p90 (default 1)",
        )
    run.add_argument(
        "--policy",
        action="append",
        default=[],
        help=f"one of {', '.join(KNOWN_POLICIES)}, or NAME=CONFIG.yaml for epp with that config; "
        f"repeat for several (default: {', '.join(ALL_POLICIES)})",
    )
    run.add_argument("--simulators", type=int, default=8)
    run.add_argument("--workload", choices=("shared-prefix", "multi-turn"), default="shared-prefix")
    run.add_argument("--groups", type=int, default=8)
    run.add_argument("--prompts-per-group", type=int, default=16)
    run.add_argument("--system-tokens", type=int, default=2048)
    run.add_argument("--question-tokens", type=int, default=128)
    run.add_argument("--output-tokens", type=int, default=64)
    run.add_argument("--users", type=int, default=16)
    run.add_argument("--rounds", type=int, default=5)
    run.add_argument(
        "--rate", type=float, default=10.0, help="Poisson arrivals, requests/s (users/s for multi-turn)"
    )
    run.add_argument("--max-requests", type=int, default=10_000)
    run.add_argument("--max-seconds", type=float, default=120.0, help="hard bound per policy")
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--model", default="sim-model")
    run.add_argument(
        "--sim-arg",
        action="append",
        default=[],
        help="flag passed to every simulator, e.g. --sim-arg=--kv-cache-blocks=512",
    )
    run.add_argument("--epp-arg", action="append", default=[], help="flag passed to epp")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    if args.command == "demo":
        if isinstance(args.ladder, tuple):
            raise SystemExit("epp_bench: error: demo --ladder takes RATE,RATE,...")
        return demo_config()
    spec: SharedPrefix | MultiTurn
    if args.workload == "shared-prefix":
        spec = SharedPrefix(
            args.groups, args.prompts_per_group, args.system_tokens, args.question_tokens, args.output_tokens
        )
    else:
        spec = MultiTurn(
            args.users, args.rounds, args.system_tokens, args.question_tokens, args.output_tokens
        )
    arrivals = Arrivals(rate=args.rate, ladder=args.ladder if isinstance(args.ladder, tuple) else ())
    policies: list[str] = []
    custom: dict[str, Path] = {}
    for item in args.policy or list(ALL_POLICIES):
        name, sep, path = item.partition("=")
        if sep and name in KNOWN_POLICIES and name not in EPP_POLICIES:
            raise SystemExit(f"epp_bench: error: policy {name!r} is not run by epp; it takes no config file")
        if sep:
            if not Path(path).is_file():
                raise SystemExit(f"epp_bench: error: config file for policy {name!r} not found: {path}")
            custom[name] = Path(path)
        elif name not in KNOWN_POLICIES:
            raise SystemExit(
                f"epp_bench: error: unknown policy {name!r}; use one of {', '.join(KNOWN_POLICIES)} "
                "or NAME=CONFIG.yaml"
            )
        policies.append(name)
    if FLOOR_POLICY in policies and not isinstance(spec, SharedPrefix):
        raise SystemExit(f"epp_bench: error: {FLOOR_POLICY} needs the shared-prefix workload")
    return BenchConfig(
        workload=Workload(spec, arrivals, seed=args.seed, max_requests=args.max_requests),
        policies=policies,
        simulators=args.simulators,
        model=args.model,
        sim_args=[a for arg in args.sim_arg for a in arg.split("=", 1)],
        max_seconds=args.max_seconds,
        custom_configs=custom,
        epp_args=[a for arg in args.epp_arg for a in arg.split("=", 1)],
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "soak":
        return soak.main(args)
    for name, module, _ in _PERF:
        if args.command == name:
            return int(module.main(args))
    if args.command == "report":
        return gateway_report.main(args)
    if args.command == "overload":
        return overload.main(args)
    cfg = config_from_args(args)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("epp_bench: error: --plot needs matplotlib: pip install 'epp-bench[plots]'")
    show_progress = not args.no_progress and sys.stderr.isatty()
    if isinstance(args.ladder, list):
        doc = asyncio.run(run_ladder(cfg, args.ladder, args.ladder_seconds, show_progress, args.ladder_seeds))
        print(ladder_tables(doc))
    else:
        doc = asyncio.run(run_bench(cfg, show_progress=show_progress))
        print(table(doc))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2))
        print(f"results: {args.out}")
    if args.plot:
        (ladder_plot if "ladder" in doc else plot)(doc, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
