"""How much a hostile model server, or a large scrape of epp's own /metrics, changes ext_proc
latency: the figures behind docs/architecture.md ("Reliability: background work").

    python -m tests.robustness.measure_scrape_isolation --hostile huge
    python -m tests.robustness.measure_scrape_isolation --render-models 1000

epp runs as a subprocess pinned to one core, with `--endpoints` naming `--normal` realistic
vLLM pages plus, with `--hostile KIND`, one page from tests.robustness.hostile_servers (they run
in a second process). The load is bench/epp_bench/extproc_load.py's: one ext_proc stream per
request (headers, body, response headers, response body), `--concurrency` in a closed loop, then
`--rate` requests/s in an open loop. The same run without the hostile server is the baseline.

`--render-models N` first sends requests for N distinct model names (each a set of series), then
scrapes epp's /metrics in a loop while the load runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import aiohttp
import grpc
import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp_bench.extproc_load import one as _one
from epp_bench.gateway import free_port


@dataclass
class Figures:
    label: str
    closed_p50: float
    closed_p99: float
    closed_rps: float
    open_p50: float
    open_p99: float
    rss_mb: float
    cpu_per_s: float  # epp's CPU seconds per second of the open-loop load
    scrapes: int = 0
    scrape_s: float = 0.0

    def line(self) -> str:
        extra = f", {len(ERRORS)} failed streams" if ERRORS else ""
        extra += (
            f", {self.scrapes} /metrics scrapes (mean {self.scrape_s * 1e3:.0f} ms)" if self.scrapes else ""
        )
        return (
            f"{self.label}: closed loop p50 {self.closed_p50 * 1e3:.2f} ms "
            f"p99 {self.closed_p99 * 1e3:.2f} ms "
            f"({self.closed_rps:.0f} req/s); open loop p50 {self.open_p50 * 1e3:.2f} ms "
            f"p99 {self.open_p99 * 1e3:.2f} ms; epp RSS {self.rss_mb:.0f} MB, "
            f"CPU {self.cpu_per_s * 100:.0f}% of a core{extra}"
        )


ERRORS: list[str] = []


async def one(stub: pb_grpc.ExternalProcessorStub, body: bytes) -> float:
    """One request's latency; a failed stream counts as an error (and its time is kept)."""
    started = time.perf_counter()
    try:
        return await _one(stub, body)
    except grpc.aio.AioRpcError as exc:
        ERRORS.append(str(exc.code()))
        return time.perf_counter() - started


def _p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > cpu:  # type: ignore[operator]
        os.sched_setaffinity(0, {cpu})


def start_servers(normal: int, hostile: str | None, size: int) -> tuple[subprocess.Popen[bytes], list[int]]:
    args = [
        sys.executable,
        "-m",
        "tests.robustness.hostile_servers",
        "--normal",
        str(normal),
        "--size",
        str(size),
    ]
    if hostile:
        args += ["--hostile", hostile]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, preexec_fn=lambda: _pin(0))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return proc, orjson.loads(line)["ports"]


def start_epp(
    ports: list[int], extra: list[str], pythonpath: str | None = None
) -> tuple[subprocess.Popen[bytes], int, int, int]:
    grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "epp",
            "--endpoints",
            ",".join(f"127.0.0.1:{p}" for p in ports),
            "--grpc-port",
            str(grpc_port),
            "--grpc-health-port",
            str(health_port),
            "--metrics-port",
            str(metrics_port),
            "--bind-address",
            "127.0.0.1",
            "--log-level",
            "error",
            "--secure-serving=false",
            *extra,
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1", **({"PYTHONPATH": pythonpath} if pythonpath else {})},
        cwd=os.path.dirname(os.path.abspath(__file__)),  # `-m` puts it first on sys.path: no epp/ here
        preexec_fn=lambda: _pin(1),
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{health_port}") as ch:
                status = (
                    health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status
                )
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit("epp did not become ready")
        time.sleep(0.1)
    return proc, grpc_port, health_port, metrics_port


def _body(model: str, i: int) -> bytes:
    return orjson.dumps({"model": model, "prompt": f"request {i} " + "lorem ipsum " * 150})


async def _seed_models(stub: pb_grpc.ExternalProcessorStub, models: int) -> None:
    sem = asyncio.Semaphore(32)

    async def send(i: int) -> None:
        async with sem:
            await one(stub, _body(f"model-{i}", i))

    await asyncio.gather(*(send(i) for i in range(models)))


async def _scrape_loop(port: int, stop: asyncio.Event, times: list[float], pause: float) -> None:
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            started = time.perf_counter()
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                await resp.read()
            times.append(time.perf_counter() - started)
            await asyncio.sleep(pause)


async def drive(
    grpc_port: int, metrics_port: int, args: argparse.Namespace, label: str, pid: int, scrape: bool
) -> Figures:
    bodies = [_body("m", i) for i in range(64)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        if args.render_models:
            await _seed_models(stub, args.render_models)
        for i in range(100):  # warm-up
            await one(stub, bodies[i % 64])
        await asyncio.sleep(args.settle)  # the hostile server has been polled a while by now
        stop = asyncio.Event()
        scrape_times: list[float] = []
        scraper = (
            asyncio.get_running_loop().create_task(
                _scrape_loop(metrics_port, stop, scrape_times, args.scrape_pause)
            )
            if scrape
            else None
        )
        closed: list[float] = []
        counter = iter(range(args.requests))

        async def worker() -> None:
            for i in counter:
                closed.append(await one(stub, bodies[i % 64]))

        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(args.concurrency))), 600)
        elapsed = time.perf_counter() - started
        opened: list[float] = []
        tasks = []
        t0 = time.perf_counter()
        cpu_started = _cpu_s(pid)
        for i in range(int(args.rate * args.open_seconds)):
            delay = t0 + i / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(stub, bodies[i % 64])))
        opened = list(await asyncio.wait_for(asyncio.gather(*tasks), 600))
        cpu_per_s = (_cpu_s(pid) - cpu_started) / (time.perf_counter() - t0)
        stop.set()
        if scraper is not None:
            await scraper
    return Figures(
        label,
        statistics.median(closed),
        _p99(closed),
        len(closed) / elapsed,
        statistics.median(opened),
        _p99(opened),
        _rss_mb(pid),
        cpu_per_s,
        len(scrape_times),
        statistics.mean(scrape_times) if scrape_times else 0.0,
    )


def run(
    args: argparse.Namespace,
    hostile: str | None,
    label: str,
    scrape: bool = False,
    pythonpath: str | None = None,
) -> Figures:
    normal = args.normal if hostile else args.normal + 1
    ERRORS.clear()
    servers, ports = start_servers(normal, hostile, args.size)
    try:
        epp, grpc_port, _, metrics_port = start_epp(ports, args.epp_flag, pythonpath)
        try:
            return asyncio.run(drive(grpc_port, metrics_port, args, label, epp.pid, scrape))
        finally:
            epp.terminate()
            epp.wait(timeout=30)
    finally:
        servers.kill()
        servers.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--normal", type=int, default=7, help="realistic pages besides the hostile one")
    p.add_argument("--hostile", help="a tests.robustness.hostile_servers kind (huge, endless, ...)")
    p.add_argument("--size", type=int, default=100 * 1024 * 1024, help="the hostile page's size")
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rate", type=float, default=200.0, help="open-loop requests/s")
    p.add_argument("--open-seconds", type=float, default=15.0)
    p.add_argument("--settle", type=float, default=3.0, help="seconds between start and load")
    p.add_argument("--render-models", type=int, default=0)
    p.add_argument("--scrape-pause", type=float, default=2.0, help="seconds between two scrapes of epp")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--epp-flag", action="append", default=[], help="an extra epp flag (repeatable)")
    p.add_argument("--rounds", type=int, default=1, help="alternate baseline and hostile runs this often")
    p.add_argument(
        "--compare-pythonpath",
        help="also run epp from this source tree (e.g. `git archive HEAD epp | tar -x -C DIR`), alternating",
    )
    args = p.parse_args()
    _pin(0)
    results: dict[str, list[Figures]] = {}
    for _ in range(args.rounds):
        runs: list[tuple[str | None, str, bool, str | None]] = []
        for tree, name in ((None, ""), (args.compare_pythonpath, "compared tree: ")):
            if name and not tree:
                continue
            if not args.no_baseline:
                runs.append((None, f"{name}baseline", False, tree))
            if args.hostile:
                runs.append((args.hostile, f"{name}hostile {args.hostile}", False, tree))
            elif args.render_models:
                runs.append((None, f"{name}scraping /metrics, {args.render_models} models", True, tree))
        for hostile, label, scrape, tree in runs:
            figures = run(args, hostile, label, scrape, tree)
            results.setdefault(label, []).append(figures)
            print(figures.line(), flush=True)
    if args.rounds > 1:
        for label, runs_of in results.items():
            med = statistics.median
            print(
                f"median of {len(runs_of)} {label}: closed p99 "
                f"{med(f.closed_p99 for f in runs_of) * 1e3:.2f} ms, "
                f"{med(f.closed_rps for f in runs_of):.0f} req/s, open p99 "
                f"{med(f.open_p99 for f in runs_of) * 1e3:.2f} ms, "
                f"CPU {med(f.cpu_per_s for f in runs_of) * 100:.0f}%"
            )


if __name__ == "__main__":
    main()
