"""Load epp's ext_proc server directly over gRPC, as Envoy would, and report requests/s.

    python -m epp_bench.extproc_load --endpoints 100 --requests 4000 --concurrency 64 --prompt-bytes 10000

epp runs as a subprocess (its own core); this process plays Envoy: per request, one stream with
request headers, the body, response headers and a response body. Endpoints are addresses with
nothing listening, so their metrics stay empty: this measures epp's protocol and scheduling cost.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import grpc
import orjson
from envoy.config.core.v3 import base_pb2 as core_pb
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp_bench.perf import start_epp, stop


def _headers(items: dict[str, str], response: bool = False) -> pb.ProcessingRequest:
    values = [core_pb.HeaderValue(key=k, raw_value=v.encode()) for k, v in items.items()]
    hm = core_pb.HeaderMap(headers=values)
    h = pb.HttpHeaders(headers=hm)
    return pb.ProcessingRequest(response_headers=h) if response else pb.ProcessingRequest(request_headers=h)


async def one(stub: pb_grpc.ExternalProcessorStub, body: bytes) -> float:
    started = time.perf_counter()
    msgs = [
        _headers({":method": "POST", ":path": "/v1/completions", "content-type": "application/json"}),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
    ]
    response_body = pb.HttpBody(body=b'{"usage":{"completion_tokens":1}}', end_of_stream=True)
    msgs += [
        _headers({":status": "200", "content-type": "application/json"}, response=True),
        pb.ProcessingRequest(response_body=response_body),
    ]
    call = stub.Process(iter(msgs))
    n = 0
    async for _ in call:
        n += 1
        if n == 4:  # headers, body, response headers, response body
            break
    call.cancel()
    return time.perf_counter() - started


async def drive(port: int, requests: int, concurrency: int, prompt_bytes: int, seed: int) -> None:
    rng = random.Random(seed)
    systems = ["".join(rng.choice("abcdefgh ") for _ in range(prompt_bytes * 4 // 5)) for _ in range(16)]
    bodies = [
        orjson.dumps(
            {
                "model": "m",
                "prompt": systems[i % 16] + "".join(rng.choice("xyz ") for _ in range(prompt_bytes // 5)),
            }
        )
        for i in range(64)
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        latencies: list[float] = []
        counter = iter(range(requests))

        async def worker() -> None:
            for i in counter:
                latencies.append(await one(stub, bodies[i % 64]))

        for i in range(50):  # warm-up
            await one(stub, bodies[i % 64])
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout=300)
        elapsed = time.perf_counter() - started
    latencies.sort()
    print(
        f"{requests} requests, concurrency {concurrency}, {prompt_bytes} B prompts: "
        f"{requests / elapsed:.0f} requests/s, latency p50 {statistics.median(latencies) * 1e3:.2f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.2f} ms"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoints", type=int, default=8)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--prompt-bytes", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    endpoints = ",".join(f"127.0.0.{2 + i // 200}:{20000 + i % 200}" for i in range(args.endpoints))
    proc, grpc_port = start_epp(["--endpoints", endpoints, "--refresh-metrics-interval", "1s"], timeout_s=30)
    try:
        asyncio.run(drive(grpc_port, args.requests, args.concurrency, args.prompt_bytes, args.seed))
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
