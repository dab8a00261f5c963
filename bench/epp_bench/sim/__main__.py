"""Run N simulated vLLM instances in one process.

    python -m epp_bench.sim --count 4 --base-port 8100 --host 127.0.0.1 --model sim-model --time-factor 0.5

Prints `name host:port` per instance once all listen (with KV events on, then
`kv-events=ENDPOINT` and, with a replay socket, `kv-replay=ENDPOINT`: the addresses bound, so
`tcp://127.0.0.1:*` gives every instance a free port), then serves until SIGINT/SIGTERM. Every
SimConfig knob is a flag (`--kv-cache-blocks`, `--max-num-seqs`, `--inter-token-latency-s`,
`--tokenizer`, `--kv-events-config`, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
from collections.abc import Sequence

from epp_bench.sim.config import SimConfig
from epp_bench.sim.server import Simulator, start_simulators

_NOT_FLAGS = {"name"}  # instance names come from --name-prefix


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m epp_bench.sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1, help="number of instances")
    parser.add_argument("--base-port", type=int, default=8100, help="first port (0 = free ports)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name-prefix", default="sim", help="instances are named PREFIX-0, PREFIX-1, ...")
    defaults = SimConfig()
    for f in dataclasses.fields(SimConfig):
        if f.name in _NOT_FLAGS:
            continue
        default = getattr(defaults, f.name)
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(default), default=default, help=f"default {default}"
        )
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    return args


def configs(args: argparse.Namespace) -> list[SimConfig]:
    knobs = {f.name: getattr(args, f.name) for f in dataclasses.fields(SimConfig) if f.name not in _NOT_FLAGS}
    cfgs = [SimConfig(name=f"{args.name_prefix}-{i}", **knobs) for i in range(args.count)]
    for cfg in cfgs:
        cfg.validate()
    return cfgs


def kv_event_columns(sim: Simulator) -> list[str]:
    columns = []
    if sim.kv_events_endpoint:
        columns.append(f"kv-events={sim.kv_events_endpoint}")
    if sim.kv_events_replay_endpoint:
        columns.append(f"kv-replay={sim.kv_events_replay_endpoint}")
    return columns


async def serve(cfgs: Sequence[SimConfig], host: str, base_port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sims = await start_simulators(cfgs, host, base_port)
    try:
        for sim in sims:
            print(" ".join([sim.name, sim.address, *kv_event_columns(sim)]), flush=True)
        await stop.wait()
    finally:
        for sim in sims:
            await sim.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfgs = configs(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(cfgs, args.host, args.base_port))
    except (OSError, ValueError) as exc:  # e.g. a port already in use, an unreadable tokenizer
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
