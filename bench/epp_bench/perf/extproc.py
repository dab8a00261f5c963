"""`python -m epp_bench extproc`: epp's ext_proc cost against a do-nothing ext_proc server.

For each body size, the same client (its own process, grpc.aio, `--concurrency` streams) drives
first a built-in do-nothing ext_proc server (grpc.aio, answering each message with an empty
response: the floor of gRPC streaming in Python), then epp at each endpoint count. Per request,
one stream shaped as Envoy's FULL_DUPLEX_STREAMED one: request headers, the body, response
headers and a response body; the stream is half-closed and read to its end. Reported: requests/s,
latency percentiles, and the server's own CPU per request (user + system, from /proc/<pid>/stat,
over the timed requests only), each also as a ratio to the do-nothing server's, and split between
the server's event-loop thread and its other threads (gRPC's poller). With `--echo`, a built-in
echo server runs too, after the do-nothing one: only the replies Envoy's FULL_DUPLEX_STREAMED mode
requires of any ext_proc server, shaped as epp's (the routing reply and the body back, a
response-headers reply, the response body back), with no parsing and no pick; its ratio to the
do-nothing server is the protocol's own share of epp's. With `--repeat N` each case runs N times,
the servers alternated: the medians, and each round's ratios.

epp runs with its default config over endpoints where nothing listens; their metrics are scraped
once a minute (the cost of scraping is `python -m epp_bench scrape`'s), so this measures the
protocol, the parsing and the pick.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import orjson
from envoy.config.core.v3 import base_pb2 as core_pb
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.extproc import messages
from epp_bench.gateway import free_port
from epp_bench.perf import (
    cpu_seconds,
    loop_thread_cpu_seconds,
    machine,
    percentile,
    positive_ints,
    start_epp,
    stop,
    table,
    write_json,
)

COLUMNS = (
    ("server", "server", ""),
    ("endpoints", "endpoints", ""),
    ("body_kb", "body kB", "d"),
    ("requests_per_s", "req/s", ",.0f"),
    ("p50_ms", "p50 ms", ".2f"),
    ("p99_ms", "p99 ms", ".2f"),
    ("cpu_us_per_request", "CPU us/req", ",.0f"),
    ("loop_cpu_us_per_request", "loop thread", ",.0f"),
    ("other_cpu_us_per_request", "other threads", ",.0f"),
    ("rps_ratio", "req/s vs floor", ".0%"),
    ("cpu_ratio", "CPU vs floor", ".2f"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoints", type=positive_ints, default=[8, 100, 1000], help="N,N,... (default 8,100,1000)"
    )
    p.add_argument("--body-kb", type=positive_ints, default=[1, 10, 100], help="kB,kB,... (default 1,10,100)")
    p.add_argument(
        "--requests", type=int, default=3000, help="timed requests per run, at most (default 3000)"
    )
    p.add_argument(
        "--max-seconds", type=float, default=20.0, help="time bound of a run's timed part (default 20)"
    )
    p.add_argument("--concurrency", type=int, default=16, help="concurrent streams (default 16)")
    p.add_argument(
        "--repeat",
        type=_positive,
        default=1,
        help="run every case N times, the do-nothing server and epp alternated; the table shows each "
        "figure's median, the ratios the median of each round's own (default 1)",
    )
    p.add_argument(
        "--echo",
        action="store_true",
        help="also run the built-in echo server (the replies FULL_DUPLEX_STREAMED requires, no "
        "routing): the protocol's own cost against the do-nothing server's",
    )
    p.add_argument(
        "--epp-arg",
        action="append",
        default=[],
        help="a flag passed to epp, e.g. --epp-arg=--event-loop=asyncio (repeat for several)",
    )
    p.add_argument("--out", type=Path, help="write the JSON here")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


# --- the do-nothing server -------------------------------------------------------------------


class NothingServicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Answers every message with an empty ProcessingResponse."""

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for _ in request_iterator:
            yield pb.ProcessingResponse()


# What the echo server routes to (no request is ever sent there).
ECHO_DESTINATION = "127.0.0.1:9"


class EchoServicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """The replies FULL_DUPLEX_STREAMED requires of any ext_proc server, nothing else, built by
    epp's own reply builders (`epp.extproc.messages`, so they are shaped as epp's): once the
    request body is whole, the routing reply and the body back; a response-headers reply; each
    response body chunk back."""

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        body: list[bytes] = []
        async for msg in request_iterator:
            kind = msg.WhichOneof("request")
            if kind == "request_body":
                body.append(msg.request_body.body)
                if msg.request_body.end_of_stream:
                    whole = b"".join(body)
                    yield messages.request_headers_reply(ECHO_DESTINATION, len(whole))
                    for reply in messages.iter_body_replies(whole, request=True):
                        yield reply
            elif kind == "response_headers":
                yield messages.response_headers_reply()
            elif kind == "response_body":
                part = msg.response_body
                for reply in messages.iter_body_replies(
                    part.body, request=False, end_of_stream=part.end_of_stream
                ):
                    yield reply


async def serve_reference(servicer: pb_grpc.ExternalProcessorServicer, port: int) -> None:
    """A reference server on grpc.aio's defaults (asyncio's loop, grpcio's default experiments)."""
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


# --- the client ------------------------------------------------------------------------------


def _headers(items: dict[str, str], response: bool = False) -> pb.ProcessingRequest:
    header_map = core_pb.HeaderMap(
        headers=[core_pb.HeaderValue(key=k, raw_value=v.encode()) for k, v in items.items()]
    )
    headers = pb.HttpHeaders(headers=header_map)
    return (
        pb.ProcessingRequest(response_headers=headers)
        if response
        else pb.ProcessingRequest(request_headers=headers)
    )


def stream_messages(body: bytes) -> list[pb.ProcessingRequest]:
    request_headers = {
        ":method": "POST",
        ":path": "/v1/completions",
        "content-type": "application/json",
        "content-length": str(len(body)),
    }
    return [
        _headers(request_headers),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
        _headers({":status": "200", "content-type": "application/json"}, response=True),
        pb.ProcessingRequest(
            response_body=pb.HttpBody(body=b'{"usage":{"completion_tokens":1}}', end_of_stream=True)
        ),
    ]


def bodies(body_bytes: int, seed: int = 1) -> list[bytes]:
    """64 completion bodies of about `body_bytes` bytes: 16 shared system prompts (80 %) and a
    random question each."""
    rng = random.Random(seed)
    system = body_bytes * 4 // 5
    systems = ["".join(rng.choice("abcdefgh ") for _ in range(system)) for _ in range(16)]
    return [
        orjson.dumps(
            {
                "model": "m",
                "prompt": systems[i % 16] + "".join(rng.choice("xyz ") for _ in range(body_bytes - system)),
            }
        )
        for i in range(64)
    ]


async def one(stub: pb_grpc.ExternalProcessorStub, messages: list[pb.ProcessingRequest]) -> float:
    started = time.perf_counter()
    call = stub.Process(iter(messages))  # half-closed after the last message
    replies = 0
    async for _ in call:
        replies += 1
    if replies < 4:
        raise RuntimeError(f"the server answered {replies} messages, expected at least 4")
    return time.perf_counter() - started


async def drive(
    port: int, server_pid: int, body_bytes: int, requests: int, concurrency: int, max_s: float
) -> dict[str, Any]:
    streams = [stream_messages(b) for b in bodies(body_bytes)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        for i in range(100):  # warm-up
            await one(stub, streams[i % 64])
        latencies: list[float] = []
        counter = iter(range(requests))
        deadline = time.monotonic() + max_s

        async def worker() -> None:
            for i in counter:
                if time.monotonic() > deadline:
                    return
                latencies.append(await one(stub, streams[i % 64]))

        loop_before, cpu_before = loop_thread_cpu_seconds(server_pid), cpu_seconds(server_pid)
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout=max_s + 30)
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(server_pid) - cpu_before
        loop_cpu = loop_thread_cpu_seconds(server_pid) - loop_before
    latencies.sort()
    n = len(latencies)
    return {
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.5) * 1e3, 3),
        "p90_ms": round(percentile(latencies, 0.9) * 1e3, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1e3, 3),
        "cpu_us_per_request": round(cpu / n * 1e6, 1),
        "loop_cpu_us_per_request": round(loop_cpu / n * 1e6, 1),
        "other_cpu_us_per_request": round((cpu - loop_cpu) / n * 1e6, 1),
    }


def run_client(
    port: int, server_pid: int, body_bytes: int, requests: int, concurrency: int, max_s: float
) -> dict[str, Any]:
    """The client, in its own process; its JSON result on its last line."""
    out = subprocess.run(
        [
            sys.executable, "-m", "epp_bench.perf.extproc", "--client", str(port), str(server_pid),
            str(body_bytes), str(requests), str(concurrency), str(max_s),
        ],
        capture_output=True,
        timeout=max_s + 120,
        check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"the ext_proc client failed: {out.stderr.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


# --- the runs --------------------------------------------------------------------------------


def run_reference(kind: str, body_bytes: int, args: argparse.Namespace) -> dict[str, Any]:
    """The do-nothing (`kind` "nothing") or the echo server ("echo"), in its own process."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "epp_bench.perf.extproc", f"--serve-{kind}", str(port)], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise SystemExit(f"the {kind} ext_proc server did not start")
        return run_client(port, proc.pid, body_bytes, args.requests, args.concurrency, args.max_seconds)
    finally:
        stop(proc)


def run_epp(endpoints: int, body_bytes: int, args: argparse.Namespace) -> dict[str, Any]:
    # Nothing listens there; scraped once a minute, so failing scrapes stay out of the figures.
    pool = ",".join(f"127.0.{1 + i // 250}.{1 + i % 250}:{20000 + i % 200}" for i in range(endpoints))
    proc, grpc_port = start_epp(["--endpoints", pool, "--refresh-metrics-interval", "60s", *args.epp_arg])
    try:
        return run_client(grpc_port, proc.pid, body_bytes, args.requests, args.concurrency, args.max_seconds)
    finally:
        stop(proc)


_FIGURES = (
    "requests",
    "requests_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "cpu_us_per_request",
    "loop_cpu_us_per_request",
    "other_cpu_us_per_request",
)


def _median_row(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a case's rounds: each figure's median; with several rounds, each round's
    ratios too (a round's epp against the same round's do-nothing server)."""
    row = dict(rounds[0])
    for key in _FIGURES:
        row[key] = round(statistics.median(r[key] for r in rounds), 3)
    for key in ("rps_ratio", "cpu_ratio"):
        if key in row:
            row[key] = round(statistics.median(r[key] for r in rounds), 3)
            if len(rounds) > 1:
                row[f"{key}_rounds"] = [r[key] for r in rounds]
    if len(rounds) > 1:
        row["rounds"] = len(rounds)
    return row


def main(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for kb in args.body_kb:
        floors: list[dict[str, Any]] = []
        echoes: list[dict[str, Any]] = []
        epps: dict[int, list[dict[str, Any]]] = {n: [] for n in args.endpoints}

        def against(floor: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
            row["rps_ratio"] = round(row["requests_per_s"] / floor["requests_per_s"], 3)
            row["cpu_ratio"] = round(row["cpu_us_per_request"] / floor["cpu_us_per_request"], 3)
            print(table([row], COLUMNS).splitlines()[-1], flush=True)
            return row

        for _ in range(args.repeat):
            floor = {
                "server": "do-nothing",
                "endpoints": "-",
                "body_kb": kb,
                **run_reference("nothing", kb * 1000, args),
            }
            floors.append(floor)
            print(table([floor], COLUMNS).splitlines()[-1], flush=True)
            if args.echo:
                echo = {
                    "server": "echo",
                    "endpoints": "-",
                    "body_kb": kb,
                    **run_reference("echo", kb * 1000, args),
                }
                echoes.append(against(floor, echo))
            for n in args.endpoints:
                row = {"server": "epp", "endpoints": n, "body_kb": kb, **run_epp(n, kb * 1000, args)}
                epps[n].append(against(floor, row))
        rows.append(_median_row(floors))
        if echoes:
            rows.append(_median_row(echoes))
        rows.extend(_median_row(epps[n]) for n in args.endpoints)
    print()
    print(table(rows, COLUMNS))
    if args.repeat > 1:
        print(f"(medians of {args.repeat} rounds; each round's CPU vs floor:)")
        for row in rows:
            if "cpu_ratio_rounds" in row:
                ratios = ", ".join(f"{r:.2f}" for r in row["cpu_ratio_rounds"])
                what = f"epp {row['endpoints']} endpoints" if row["server"] == "epp" else row["server"]
                print(f"  {what}, {row['body_kb']} kB: {ratios}")
    print(f"({args.concurrency} concurrent streams, client in its own process; {machine()})")
    write_json(
        args.out, {"concurrency": args.concurrency, "repeat": args.repeat, "machine": machine(), "runs": rows}
    )
    return 0


def _entry(argv: list[str]) -> None:
    """The helper processes: `--serve-nothing PORT`, `--serve-echo PORT` and
    `--client PORT PID BYTES N C S`."""
    if argv[0] == "--serve-nothing":
        asyncio.run(serve_reference(NothingServicer(), int(argv[1])))
    elif argv[0] == "--serve-echo":
        asyncio.run(serve_reference(EchoServicer(), int(argv[1])))
    elif argv[0] == "--client":
        port, pid, body, n, c = (int(v) for v in argv[1:6])
        print(json.dumps(asyncio.run(drive(port, pid, body, n, c, float(argv[6])))))
    else:
        raise SystemExit("use `python -m epp_bench extproc`")


if __name__ == "__main__":
    _entry(sys.argv[1:])
