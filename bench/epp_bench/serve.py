"""`python -m epp_bench.serve` keeps simulators behind a real gateway running, for an outside load tool.

It starts N vLLM-compatible simulators, then either epp + Envoy (ext_proc, the Gateway API inference
extension setup) or Envoy alone round-robining over them, all on 127.0.0.1, prints the gateway URL and
runs until SIGINT/SIGTERM (or --duration), then stops every process it started.

Examples:
    python -m epp_bench.serve                                   # 4 simulators, epp, a free port
    python -m epp_bench.serve --port 8080 --simulators 8 --sim-arg='--kv-cache-blocks 512'
    python -m epp_bench.serve --policy round-robin              # the baseline, same Envoy, no epp
    python -m epp_bench.serve --config-file my-epp-config.yaml  # epp with your EndpointPickerConfig
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import cast

from epp_bench.gateway import MODES, EnvoyGateway, EppProcess, GatewayError, Mode
from epp_bench.runner import simulators

DEFAULT_MODEL = "sim-model"


def _split_args(values: Sequence[str] | None) -> list[str]:
    """Each repeated --sim-arg/--epp-arg value is shell-split: '--kv-cache-blocks 512' is two args."""
    return [part for value in values or () for part in shlex.split(value)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m epp_bench.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--simulators", type=int, default=4, help="number of simulators (default 4)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name they serve (default {DEFAULT_MODEL})")
    p.add_argument("--policy", choices=MODES, default="epp", help="epp (default) or round-robin (no epp)")
    p.add_argument("--config-file", type=Path, help="EndpointPickerConfig YAML for epp (default: built in)")
    p.add_argument(
        "--port", type=int, default=0, help="gateway listen port on 127.0.0.1 (default: a free one)"
    )
    p.add_argument(
        "--sim-arg",
        action="append",
        metavar="ARGS",
        help="extra epp_bench.sim flags, repeatable, shell-split: --sim-arg='--kv-cache-blocks 512'",
    )
    p.add_argument(
        "--epp-arg", action="append", metavar="ARGS", help="extra epp flags, repeatable, shell-split"
    )
    p.add_argument(
        "--duration", type=float, default=0, help="stop by itself after this many seconds (default 0: never)"
    )
    p.add_argument("--access-log", action="store_true", help="Envoy logs every request to its log file")
    return p


@contextlib.asynccontextmanager
async def gateway(
    policy: Mode,
    backends: Sequence[str],
    *,
    port: int,
    config_file: Path | None,
    epp_args: Sequence[str],
    access_log: bool,
) -> AsyncIterator[tuple[EnvoyGateway, EppProcess | None]]:
    """Envoy (and epp for policy "epp") in front of the backends."""
    if policy == "round-robin":
        async with EnvoyGateway(
            "round-robin", backends=backends, listen_port=port, access_log=access_log
        ) as gw:
            yield gw, None
        return
    config_args = ["--config-file", str(config_file)] if config_file is not None else []
    async with (
        EppProcess(backends, extra_args=[*config_args, "--log-level", "warning", *epp_args]) as epp,
        EnvoyGateway("epp", epp_grpc_port=epp.grpc_port, listen_port=port, access_log=access_log) as gw,
    ):
        yield gw, epp


async def serve(args: argparse.Namespace, stop: asyncio.Event | None = None) -> None:
    """Start everything, print where it is, wait for a signal (or --duration), stop everything."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with (
            simulators(args.simulators, args.model, _split_args(args.sim_arg)) as backends,
            gateway(
                cast(Mode, args.policy),
                backends,
                port=args.port,
                config_file=args.config_file,
                epp_args=_split_args(args.epp_arg),
                access_log=args.access_log,
            ) as (gw, epp),
        ):
            print(f"simulators: {' '.join(backends)}", flush=True)
            if epp is not None:
                print(f"epp: grpc 127.0.0.1:{epp.grpc_port}  metrics {epp.metrics_url}", flush=True)
            print(f"envoy: admin {gw.admin_url}  log {gw.log_path}", flush=True)
            print(f"gateway: {gw.url}  model: {args.model}  policy: {args.policy}", flush=True)
            print("running; Ctrl-C (SIGINT) or SIGTERM stops it", flush=True)
            if args.duration > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=args.duration)
            else:
                await stop.wait()
            print("stopping", flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.simulators < 1:
        parser.error("--simulators must be at least 1")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0..65535")
    if args.config_file is not None:
        if args.policy != "epp":
            parser.error("--config-file applies to --policy epp only")
        if not args.config_file.is_file():
            parser.error(f"--config-file {args.config_file} is not a file")
        args.config_file = args.config_file.resolve()  # epp runs with the repo as its working directory
    if args.epp_arg and args.policy != "epp":
        parser.error("--epp-arg applies to --policy epp only")
    try:
        asyncio.run(serve(args))
    except (GatewayError, FileNotFoundError) as e:
        print(f"epp_bench.serve: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
