"""`python -m epp_bench scrape`: an idle epp's CPU while it scrapes N pods' /metrics.

N simulated pods (one lean HTTP/1.1 server process listening on N ports, keep-alive) each serve a
realistic vLLM /metrics page (`epp_bench.perf.vllm_page`: every family of a vLLM 0.11 server,
histograms included), and answer `?name[]=...` as vLLM does (prometheus-client's exposition of a
registry restricted to those names: `vllm_page.only_families`). epp runs with these pods as its
endpoints at the default interval (50 ms) and no requests; its CPU time is read from /proc over
`--seconds`, after a warm-up. Four runs of epp: idle pods (nothing waiting or running: what an
idle pool reports) polled every interval, asking for the families it reads (epp's default); the
same reading whole pages (`--model-server-metrics-only-read-families=false`, as the Go EPP);
idle pods with `--idle-refresh-metrics-interval=1s` (epp's opt-in: idle endpoints polled every
second); and busy pods (the queue, running and KV gauges changing from poll to poll: every pod
polled every interval and every page parsed; epp has no request in flight, so it polls them in
its idle ticks, not the slices it uses under load). The pods' server counts the polls it
answered and the bytes of their pages, so the table says how many scrapes per second epp made
and how large a page was. Each answer carries the headers vLLM's server (uvicorn) adds, `date` and
`server`: an idle pod's answer is the same bytes for a second, then its date moves.

Two more rows are the floor: the same idle pods polled every interval by the least a client can
do (`floor_poll`: blocking sockets on keep-alive connections, the answer framed by its
Content-Length and parsed no further), in a process of its own whose CPU is read the same way,
once for whole pages and once for the families epp reads. What it spends is the kernel's side of
the traffic plus a few microseconds of Python a poll: what any scraper pays before it reads a
value.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from epp.datalayer.model_server_metrics import VLLM
from epp_bench.perf import cpu_seconds, machine, start_epp, stop, table, write_json
from epp_bench.perf.vllm_page import only_families, page

COLUMNS = (
    ("client", "client", ""),
    ("pages", "pages", ""),
    ("pods_state", "pods", ""),
    ("pods", "count", "d"),
    ("interval_ms", "interval ms", ".0f"),
    ("idle_interval", "idle polls", ""),
    ("page_bytes", "page bytes", ",d"),
    ("scrapes_per_s", "scrapes/s", ",.0f"),
    ("expected_scrapes_per_s", "expected/s", ",.0f"),
    ("cpu_percent", "CPU % of a core", ".1f"),
    ("cpu_us_per_scrape", "CPU us/scrape", ".0f"),
)
_VARIANTS = 8  # pages with different gauge values, served in turn


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pods", type=int, default=100, help="simulated pods (default 100)")
    p.add_argument("--interval", default="50ms", help="epp's --refresh-metrics-interval (default 50ms)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds (default 10)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring (default 3)")
    p.add_argument("--out", type=Path, help="write the JSON here")


# --- the pods' server ------------------------------------------------------------------------


class _PodProtocol(asyncio.Protocol):
    """Answers every GET on a keep-alive connection with the next page variant (only the families
    asked for, when the GET has `?name[]=...`)."""

    served = 0
    body_bytes = 0

    def __init__(self, pages: _Pages) -> None:
        self._pages = pages
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            target = self._buffer[: self._buffer.find(b"\r\n")].split(b" ")[1].decode()
            self._buffer = self._buffer[end + 4 :]
            assert self._transport is not None
            head, body = self._pages.answer(_PodProtocol.served % _VARIANTS, target.partition("?")[2])
            self._transport.write(_status_line() + head + body)
            _PodProtocol.served += 1
            _PodProtocol.body_bytes += len(body)


_date = (0, b"")


def _status_line() -> bytes:
    """The status line and the headers uvicorn (vLLM's server) adds: its Date moves every second,
    so even an idle pod's answer changes once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        stamp = email.utils.formatdate(now, usegmt=True)
        _date = (now, f"HTTP/1.1 200 OK\r\ndate: {stamp}\r\nserver: uvicorn\r\n".encode())
    return _date[1]


class _Pages:
    """Each variant's answer, whole and for each query seen (rendered once)."""

    def __init__(self, busy: bool) -> None:
        self._bodies = [
            page(waiting=i, running=4 + i, kv=0.1 * i) if busy else page(waiting=0, running=0, kv=0.0)
            for i in range(_VARIANTS)
        ]
        self._answers: dict[tuple[int, str], tuple[bytes, bytes]] = {}

    def answer(self, variant: int, query: str) -> tuple[bytes, bytes]:
        key = (variant, query)
        if key not in self._answers:
            body = self._bodies[variant]
            if "name%5B%5D=" in query or "name[]=" in query:
                body = only_families(body, query)
            head = (
                "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            self._answers[key] = (head.encode(), body)
        return self._answers[key]


async def serve_pods(count: int, busy: bool) -> None:
    """`count` pods on free ports of 127.0.0.1; their ports go out on the first line of stdout."""
    pages = _Pages(busy)
    loop = asyncio.get_running_loop()
    ports = []
    for _ in range(count):
        server = await loop.create_server(lambda: _PodProtocol(pages), "127.0.0.1", 0)
        ports.append(server.sockets[0].getsockname()[1])
    print(json.dumps(ports), flush=True)
    while True:  # report the polls answered and their pages' bytes, when asked on stdin
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        print(_PodProtocol.served, _PodProtocol.body_bytes, flush=True)


# --- the floor: the least a client can do ---------------------------------------------------------


def floor_poll(ports: list[int], interval_s: float, path: str = "/metrics") -> None:
    """Poll every port's `path` every `interval_s` until stdin closes: one keep-alive connection
    each, the answer read to its Content-Length and not parsed."""
    conns = []
    for port in ports:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append((sock, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()))
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    stop_reading = _stdin_closed()
    next_tick = time.monotonic()
    while not stop_reading.is_set():
        for sock, request in conns:
            sock.sendall(request)
            got, need = 0, -1
            while need < 0 or got < need:
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise SystemExit("a pod closed its connection")
                got += n
                if need < 0 and (end := buf.find(b"\r\n\r\n", 0, got)) >= 0:
                    at = buf.find(b"Content-Length: ", 0, end) + len(b"Content-Length: ")
                    need = end + 4 + int(buf[at : buf.find(b"\r\n", at)])
        next_tick += interval_s
        time.sleep(max(0.0, next_tick - time.monotonic()))


def _stdin_closed() -> threading.Event:
    """An event set when stdin closes (the bench's way of stopping a helper process)."""
    done = threading.Event()

    def watch() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=watch, daemon=True).start()
    return done


# --- the run ---------------------------------------------------------------------------------


def measure(
    pods: int,
    interval: str,
    seconds: float,
    warmup: float,
    busy: bool,
    idle_interval: str = "0",
    floor: bool = False,
    whole_pages: bool = False,
) -> dict[str, Any]:
    """One row: epp (or, with `floor`, `floor_poll`) polling `pods` pods every `interval`; with
    `whole_pages`, whole pages rather than the families epp reads."""
    if pods <= 0 or seconds <= 0 or warmup < 0:
        raise SystemExit("epp_bench scrape: --pods and --seconds must be positive")
    server = subprocess.Popen(
        [sys.executable, "-m", "epp_bench.perf.scrape", "--serve", str(pods), "busy" if busy else "idle"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert server.stdin is not None and server.stdout is not None

    def served() -> tuple[int, int]:
        assert server.stdin is not None and server.stdout is not None
        server.stdin.write(b"?\n")
        server.stdin.flush()
        polls, body_bytes = server.stdout.readline().split()
        return int(polls), int(body_bytes)

    try:
        ready = server.stdout.readline()
        if not ready.startswith(b"["):
            raise SystemExit("the pods' server did not start")
        ports: list[int] = json.loads(ready)
        client = (
            _start_floor(ports, interval, whole_pages)
            if floor
            else _start_epp(ports, interval, idle_interval, whole_pages)
        )
        try:
            time.sleep(warmup)
            if client.poll() is not None:
                raise SystemExit(f"the scraping client exited early ({client.returncode})")
            (polls0, bytes0), cpu0, t0 = served(), cpu_seconds(client.pid), time.monotonic()
            time.sleep(seconds)
            (polls1, bytes1), cpu1, t1 = served(), cpu_seconds(client.pid), time.monotonic()
        finally:
            if client.stdin is not None:
                client.stdin.close()
            stop(client)
    finally:
        server.stdin.close()
        stop(server)
    elapsed, cpu, polls = t1 - t0, cpu1 - cpu0, polls1 - polls0
    interval_s = _seconds(interval)
    return {
        "client": "floor" if floor else "epp",
        "pages": "whole" if whole_pages else "families read",
        "pods_state": "busy" if busy else "idle",
        "pods": pods,
        "interval_ms": interval_s * 1e3,
        "idle_interval": "every interval" if _seconds(idle_interval) == 0 else f"every {idle_interval}",
        "page_bytes": round((bytes1 - bytes0) / polls) if polls else 0,
        "whole_page_bytes": len(page()),
        "seconds": round(elapsed, 2),
        "scrapes_per_s": round(polls / elapsed, 1),
        "expected_scrapes_per_s": round(pods / interval_s, 1),
        "cpu_percent": round(cpu / elapsed * 100, 2),
        "cpu_us_per_scrape": round(cpu / polls * 1e6, 1) if polls else None,
    }


def _start_epp(
    ports: list[int], interval: str, idle_interval: str, whole_pages: bool
) -> subprocess.Popen[bytes]:
    proc, _ = start_epp(
        [
            "--endpoints", ",".join(f"127.0.0.1:{p}" for p in ports),
            "--refresh-metrics-interval", interval, "--idle-refresh-metrics-interval", idle_interval,
            f"--model-server-metrics-only-read-families={str(not whole_pages).lower()}",
        ]
    )  # fmt: skip
    return proc


def _start_floor(ports: list[int], interval: str, whole_pages: bool) -> subprocess.Popen[bytes]:
    path = "/metrics" if whole_pages else f"/metrics?{VLLM.families_query}"
    command = ["-m", "epp_bench.perf.scrape", "--floor", str(_seconds(interval)), json.dumps(ports), path]
    return subprocess.Popen([sys.executable, *command], stdin=subprocess.PIPE)


def _seconds(text: str) -> float:
    for suffix, factor in (("ms", 1e-3), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def main(args: argparse.Namespace) -> int:
    def run(busy: bool = False, idle: str = "0", floor: bool = False, whole: bool = False) -> dict[str, Any]:
        return measure(args.pods, args.interval, args.seconds, args.warmup, busy, idle, floor, whole)

    rows = [
        run(),
        run(whole=True),
        run(idle="1s"),
        run(busy=True),
        run(floor=True, whole=True),
        run(floor=True),
    ]
    print(table(rows, COLUMNS))
    print(f"(epp serving no requests; floor: blocking sockets, no parsing; {machine()})")
    write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        asyncio.run(serve_pods(int(sys.argv[2]), sys.argv[3] == "busy"))
    elif sys.argv[1:2] == ["--floor"]:
        floor_poll(json.loads(sys.argv[3]), float(sys.argv[2]), sys.argv[4])
    else:
        raise SystemExit("use `python -m epp_bench scrape`")
