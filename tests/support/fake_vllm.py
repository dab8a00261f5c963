"""A small vLLM-shaped HTTP server for tests: real HTTP on loopback, metrics you set by hand.

It answers the OpenAI endpoints (JSON or SSE with usage), names itself in the `x-served-by`
response header, records what it received, and serves /metrics in vLLM's Prometheus names.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

SERVED_BY = "x-served-by"


@dataclass
class FakeVllm:
    name: str
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    metrics_status: int = 200  # set to 500 to make scrapes fail
    metrics_delay_s: float = 0.0
    response_delay_s: float = 0.0  # before a generation's response starts (a long prefill, a queue)
    metrics_hits: int = 0  # /metrics requests received
    received: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    async def scraped_since_now(self, polls: int = 3, timeout: float = 10.0) -> None:
        """Until `polls` more /metrics requests arrive: a scraper polling one page at a time has
        then read at least one page served after this call whole (the last may be in flight)."""
        target = self.metrics_hits + polls
        deadline = asyncio.get_running_loop().time() + timeout
        while self.metrics_hits < target:
            assert asyncio.get_running_loop().time() < deadline, f"{self.name} not scraped {polls} times"
            await asyncio.sleep(0.01)

    def metrics_text(self) -> str:
        return (
            "# HELP vllm:num_requests_waiting Waiting.\n# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="m"}} {self.waiting}\n'
            "# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="m"}} {self.running}\n'
            "# HELP vllm:kv_cache_usage_perc KV usage.\n# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{model_name="m"}} {self.kv_usage}\n'
            "# HELP vllm:cache_config_info Cache config.\n# TYPE vllm:cache_config_info gauge\n"
            'vllm:cache_config_info{block_size="16",num_gpu_blocks="4096"} 1.0\n'
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        self.metrics_hits += 1
        if self.metrics_delay_s:
            await asyncio.sleep(self.metrics_delay_s)
        if self.metrics_status != 200:
            return web.Response(status=self.metrics_status, text="broken")
        return web.Response(text=self.metrics_text(), content_type="text/plain")

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = orjson.loads(raw) if raw else {}
        self.received.append(
            {"path": request.path, "headers": dict(request.headers), "body": body, "raw": raw}
        )
        if self.response_delay_s:
            await asyncio.sleep(self.response_delay_s)
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        headers = {SERVED_BY: self.name}
        if body.get("stream"):
            resp = web.StreamResponse(headers={**headers, "content-type": "text/event-stream"})
            await resp.prepare(request)
            for token in ("a", "b", "c"):
                chunk = {"id": "x", "choices": [{"index": 0, "text": token}]}
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await resp.write(b"data: " + orjson.dumps({"id": "x", "choices": [], "usage": usage}) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        payload = {
            "id": "x",
            "object": "text_completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "text": "abc"}],
            "usage": usage,
            "served_by": self.name,
        }
        return web.json_response(payload, headers=headers)

    async def _models(self, request: web.Request) -> web.Response:
        self.received.append(
            {"path": request.path, "headers": dict(request.headers), "body": None, "raw": b""}
        )
        return web.json_response({"object": "list", "data": [{"id": "m"}]}, headers={SERVED_BY: self.name})

    async def start(self) -> FakeVllm:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses"):
            app.router.add_post(path, self._generate)
        self._runner = web.AppRunner(app, access_log=None)
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
