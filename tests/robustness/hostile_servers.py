"""Model servers whose /metrics page misbehaves, on loopback, for the scraper's robustness tests
and for `measure_scrape_isolation` (the before/after figures of docs/architecture.md).

Kinds (`HostileServer(kind)`):
- `normal`: a realistic vLLM v1 page (one model, one engine: about 43 kB, 457 lines);
- `huge`: that page followed by `size` bytes of a high-cardinality histogram (100 MB by default),
  sent chunked as fast as the reader takes it, with no Content-Length;
- `huge-wanted`: `size` bytes made only of the series epp reads (every line is a wanted one);
- `huge-declared`: the `huge` page with its Content-Length;
- `endless`: the headers and the start of a page, then nothing, forever;
- `garbage`: `size` bytes of random binary, newlines included here and there;
- `slow`: the normal page, one line every 20 ms.

Run as a program it serves `--normal N` normal servers and a server of each `--hostile KIND` in
its own process and prints their ports as one JSON line (then serves until killed):

    python -m tests.robustness.hostile_servers --normal 7 --hostile huge
    python -m tests.robustness.hostile_servers --normal 2 --hostile huge --hostile garbage=8000000
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import random
import sys
from dataclasses import dataclass

import orjson
from aiohttp import web

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
KINDS = ("normal", "huge", "huge-wanted", "huge-declared", "endless", "garbage", "slow")
CHUNK = 256 * 1024


def vllm_page(waiting: int = 3, running: int = 5, kv: float = 0.4, engines: int = 1) -> str:
    """What vLLM v1 serves at /metrics for one model (process, HTTP and engine families, with
    vLLM's histogram buckets); `engines` > 1 gives the engine families a sample per data-parallel rank."""
    out: list[str] = []

    def family(name: str, kind: str, text: str) -> None:
        out.append(f"# HELP {name} {text}\n# TYPE {name} {kind}\n")

    family("python_gc_objects_collected_total", "counter", "Objects collected during gc")
    out.extend(
        f'python_gc_objects_collected_total{{generation="{g}"}} {1234.0 * (g + 1)}\n' for g in range(3)
    )
    family("python_info", "gauge", "Python platform information")
    out.append(
        'python_info{implementation="CPython",major="3",minor="12",patchlevel="11",version="3.12.11"} 1.0\n'
    )
    for name in ("process_virtual_memory_bytes", "process_resident_memory_bytes", "process_open_fds"):
        family(name, "gauge", "Process metric.")
        out.append(f"{name} 1.2345e+09\n")
    handlers = ("/v1/completions", "/v1/chat/completions", "/metrics", "/health", "/v1/models")
    family("http_requests_total", "counter", "Total number of requests by method, status and handler.")
    for h in handlers:
        out.extend(
            f'http_requests_total{{handler="{h}",method="POST",status="{s}"}} 1234.0\n'
            for s in ("2xx", "4xx")
        )
    family("http_request_duration_seconds", "histogram", "Latency with only few buckets by handler.")
    for h in handlers:
        for le in ("0.1", "0.5", "1.0", "+Inf"):
            out.append(
                f'http_request_duration_seconds_bucket{{handler="{h}",le="{le}",method="POST"}} 10.0\n'
            )
        out.append(f'http_request_duration_seconds_count{{handler="{h}",method="POST"}} 10.0\n')
    tokens = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 131072)
    latency = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
    ttft = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
    tpot = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0)  # fmt: skip
    histograms = (
        ("vllm:request_prompt_tokens", tokens),
        ("vllm:request_generation_tokens", tokens),
        ("vllm:iteration_tokens_total", (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)),
        ("vllm:request_max_num_generation_tokens", tokens),
        ("vllm:request_params_n", (1, 2, 5, 10, 20)),
        ("vllm:request_params_max_tokens", tokens),
        ("vllm:time_to_first_token_seconds", ttft),
        ("vllm:time_per_output_token_seconds", tpot),
        ("vllm:inter_token_latency_seconds", tpot),
        ("vllm:e2e_request_latency_seconds", latency),
        ("vllm:request_queue_time_seconds", latency),
        ("vllm:request_inference_time_seconds", latency),
        ("vllm:request_prefill_time_seconds", latency),
        ("vllm:request_decode_time_seconds", latency),
    )
    # One family each, a sample per data-parallel rank, as prometheus-client renders vLLM's
    # labelled metrics (the text format keeps a family's lines together).
    ranks = [f'engine="{engine}",model_name="{MODEL}"' for engine in range(engines)]
    for name, kind, text, value in (
        ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", running),
        ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", waiting),
        ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", kv),
    ):
        family(name, kind, text)
        out.extend(f"{name}{{{labels}}} {float(value)}\n" for labels in ranks)
    for name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions",
                 "vllm:prompt_tokens", "vllm:generation_tokens"):  # fmt: skip
        family(name + "_total", "counter", "A counter.")
        out.extend(f"{name}_total{{{labels}}} 123456.0\n" for labels in ranks)
    family("vllm:request_success_total", "counter", "Count of successfully processed requests.")
    out.extend(
        f'vllm:request_success_total{{{labels},finished_reason="{r}"}} 100.0\n'
        for labels in ranks
        for r in ("stop", "length")
    )
    for name, buckets in histograms:
        family(name, "histogram", "A histogram.")
        for labels in ranks:
            out.extend(f'{name}_bucket{{{labels},le="{float(b)}"}} 42.0\n' for b in buckets)
            out.append(f'{name}_bucket{{{labels},le="+Inf"}} 42.0\n')
            out.append(f"{name}_count{{{labels}}} 42.0\n{name}_sum{{{labels}}} 123.4\n")
    family("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig")
    out.append(
        'vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",'
        'gpu_memory_utilization="0.9",num_cpu_blocks="0",num_gpu_blocks="27000"} 1.0\n'
    )
    family("vllm:lora_requests_info", "gauge", "Running stats on lora requests.")
    out.append(
        'vllm:lora_requests_info{max_lora="0",running_lora_adapters="",waiting_lora_adapters=""} 1.7e+09\n'
    )
    return "".join(out)


def _filler(size: int) -> bytes:
    """`size` bytes of a high-cardinality histogram nobody reads (a bug exporting one series per
    request id, say)."""
    line = 'http_request_size_bytes_bucket{handler="/v1/completions",le="%d",request_id="%08x"} 1.0\n'
    block = "".join(line % (i % 20, i) for i in range(2000)).encode()
    return (block * (size // len(block) + 1))[:size]


def _wanted_only(size: int) -> bytes:
    block = "".join(
        f'vllm:num_requests_waiting{{engine="{i}",model_name="{MODEL}"}} 1.0\n' for i in range(1000)
    ).encode()
    return (block * (size // len(block) + 1))[:size]


def _garbage(size: int, seed: int = 13) -> bytes:
    return random.Random(seed).randbytes(size)


@functools.lru_cache(maxsize=8)
def _body(kind: str, size: int) -> bytes:
    page = vllm_page().encode()
    if kind in ("huge", "huge-declared"):
        return page + _filler(size)
    if kind == "huge-wanted":
        return _wanted_only(size)
    if kind == "garbage":
        return _garbage(size)
    return page


@dataclass
class HostileServer:
    """One model server on 127.0.0.1 whose /metrics behaves as `kind` says; `hits` counts polls."""

    kind: str = "normal"
    size: int = 100 * 1024 * 1024
    port: int = 0
    hits: int = 0
    bytes_sent: int = 0
    _runner: web.AppRunner | None = None
    _body: bytes = b""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}: use one of {', '.join(KINDS)}")
        self._body = _body(self.kind, self.size)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.kind in ("normal", "huge-declared"):
            self.bytes_sent += len(self._body)
            return web.Response(body=self._body, content_type="text/plain")
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; version=0.0.4"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        body = memoryview(self._body)
        try:
            if self.kind == "endless":
                await resp.write(bytes(body[: len(body) // 2]))
                await asyncio.Event().wait()  # never finishes
            elif self.kind == "slow":
                for line in self._body.splitlines(keepends=True):
                    await resp.write(line)
                    await asyncio.sleep(0.02)
            else:
                for at in range(0, len(body), CHUNK):
                    await resp.write(bytes(body[at : at + CHUNK]))
                    self.bytes_sent += min(CHUNK, len(body) - at)
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the reader gave up: exactly what a scraper with limits does
        return resp

    async def _generate(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"id": "x", "choices": [{"index": 0, "text": "abc"}]})

    async def start(self) -> HostileServer:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/completions", self._generate)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def _serve(normal: int, hostile: list[str], size: int) -> None:
    servers = [await HostileServer("normal").start() for _ in range(normal)]
    for spec in hostile:
        kind, _, own_size = spec.partition("=")
        servers.append(await HostileServer(kind, size=int(own_size) if own_size else size).start())
    sys.stdout.write(orjson.dumps({"ports": [s.port for s in servers], "pid": os.getpid()}).decode() + "\n")
    sys.stdout.flush()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--normal", type=int, default=7)
    parser.add_argument(
        "--hostile",
        action="append",
        default=[],
        help="KIND or KIND=SIZE (repeatable); kinds: " + ", ".join(KINDS),
    )
    parser.add_argument("--size", type=int, default=100 * 1024 * 1024)
    args = parser.parse_args()
    asyncio.run(_serve(args.normal, args.hostile, args.size))


if __name__ == "__main__":
    main()
