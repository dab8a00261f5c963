"""The performance commands: `python -m epp_bench extproc | pick | scrape | memory`.

Each measures one cost of epp, prints a table and writes its figures as JSON (`--out`); the
README's Performance section and docs/performance.md are made from their output. Every run is
bounded in count and time. `extproc` and `scrape` run epp as a subprocess of this interpreter and
read its CPU time from /proc (Linux); `pick` and `memory` import epp in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp_bench.gateway import free_port

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def positive_ints(text: str) -> list[int]:
    """An argparse type: `N` or `N,N,...`, each a positive whole number."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or N,N,...") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: values must be positive")
    return values


def _stat_cpu_seconds(stat: Path) -> float:
    """User + system CPU seconds from a /proc `stat` file (a process's or a thread's)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime, stime (fields 14, 15)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc/<pid>/stat."""
    return _stat_cpu_seconds(Path(f"/proc/{pid}/stat"))


def loop_thread_cpu_seconds(pid: int) -> float:
    """CPU time so far of a process's main thread, where its event loop runs (the rest of its CPU,
    `cpu_seconds` less this, is its other threads': gRPC's poller, workers)."""
    return _stat_cpu_seconds(Path(f"/proc/{pid}/task/{pid}/stat"))


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process now, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc status")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table: columns are (key, header, format spec)."""
    cells = [
        [format(row[key], spec) if row.get(key) is not None else "-" for key, _, spec in columns]
        for row in rows
    ]
    widths = [max(len(header), *(len(r[i]) for r in cells)) for i, (_, header, _) in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths, strict=True))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def write_json(path: Path | None, doc: Any) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results: {path}")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], "load_avg_1m": os.getloadavg()[0]}


# Attempts at starting epp on freshly picked ports (see start_epp).
EPP_PORT_ATTEMPTS = 3


def _taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def start_epp(args: Sequence[str], timeout_s: float = 60.0) -> tuple[subprocess.Popen[bytes], int]:
    """`python -m epp ARGS` on free loopback ports (plaintext gRPC, errors only in its log), once its
    health says SERVING: the process and its ext_proc port. free_port() cannot reserve a port, so
    on a busy machine another process sometimes binds one between the pick and epp's bind; epp
    then exits at once, and is started again on other ports."""
    for attempt in range(1, EPP_PORT_ATTEMPTS + 1):
        ports = free_port(), free_port(), free_port()
        grpc_port, health_port, metrics_port = ports
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "epp", *args, "--secure-serving=false", "--log-level", "error",
                "--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
                "--metrics-port", str(metrics_port), "--bind-address", "127.0.0.1",
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            wait_serving(proc, health_port, timeout_s)
        except SystemExit:
            stop(proc)
            if attempt < EPP_PORT_ATTEMPTS and proc.returncode and any(_taken(p) for p in ports):
                print(f"epp's port was taken while it started (attempt {attempt}); retrying", file=sys.stderr)
                continue
            raise
        except BaseException:
            stop(proc)
            raise
        return proc, grpc_port
    raise AssertionError("unreachable")


def wait_serving(proc: subprocess.Popen[bytes], health_port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
                status = (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(), timeout=1)
                    .status
                )
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"epp exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise SystemExit(f"epp was not ready within {timeout_s:g}s")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
