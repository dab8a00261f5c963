"""A routing sidecar for simulated decode pods: what llm-d's pd-sidecar (NIXL v2 connector) does in
front of a vLLM decode instance.

A completion request carrying `x-prefiller-host-port: ip:port` (set by epp's P/D profile handler):

1. the prefill pod gets the request with `max_tokens` 1, `stream` false and
   `kv_transfer_params.do_remote_decode`, and prefills the prompt (its prefix cache keeps it);
2. the local decode instance gets the original request plus the `kv_transfer_params` the prefill
   pod returned (`do_remote_prefill`), pulls the KV it lacks and decodes; its answer streams back
   unchanged, with `x-prefilled-by` naming the prefill pod.

Without the header (epp decided decode-only) the request goes to the local decode instance as is.
Every other path (/metrics, /health, /v1/models, ...) is passed through, so epp scrapes the decode
instance through its sidecar, as it does in llm-d. A failed prefill is returned to the client.

    python -m epp_bench.sidecar --decode 127.0.0.1:8101 --decode 127.0.0.1:8102 [--listen 127.0.0.1:0 ...]

prints `listen-address decode-address` per sidecar once all listen, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from epp_bench.gateway import split_host_port
from epp_bench.sim.server import listen

PREFILL_HEADER = "x-prefiller-host-port"
PREFILLED_BY = "x-prefilled-by"
SERVED_BY = "x-served-by"
COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")
# Not forwarded either way: hop-by-hop headers, and those aiohttp computes for the new message.
_SKIP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade", "te", "trailer"}
)


def _forward_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _SKIP_HEADERS}


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "SidecarError", "param": None, "code": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


class Sidecar:
    """One sidecar in front of one decode instance. `await Sidecar(decode).start()`; `.address`."""

    def __init__(self, decode: str, timeout_s: float = 600.0) -> None:
        split_host_port(decode)
        self.decode = decode
        self.timeout_s = timeout_s
        self.host = ""
        self.port = 0
        self.prefills = 0  # requests this sidecar had prefilled remotely
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for path in COMPLETION_PATHS:
            app.router.add_post(path, self._completion)
        app.router.add_route("*", "/{tail:.*}", self._passthrough)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Sidecar:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
        )
        # A client that hangs up cancels the handler (listen() enables that), which closes the
        # upstream connection, which aborts the request on the decode instance.
        try:
            self._runner, self.port = await listen(self.make_app(), host, port)
        except OSError:
            await self._session.close()
            raise
        self.host = host
        return self

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        prefiller = request.headers.get(PREFILL_HEADER)
        if not prefiller:
            return await self._relay(request, raw, {})
        try:
            split_host_port(prefiller)
            body = orjson.loads(raw)
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
            return _error(400, f"sidecar: {exc}")
        if not isinstance(body, dict):
            return _error(400, "sidecar: request body must be a JSON object")
        prefilled = await self._prefill(request, prefiller, body)
        if isinstance(prefilled, web.Response):
            return prefilled
        kv_params, prefilled_by = prefilled
        self.prefills += 1
        body["kv_transfer_params"] = kv_params
        return await self._relay(request, orjson.dumps(body), {PREFILLED_BY: prefilled_by})

    async def _prefill(
        self, request: web.Request, prefiller: str, body: dict[str, Any]
    ) -> tuple[Any, str] | web.Response:
        """Have the prefill pod compute the prompt's KV: (its kv_transfer_params, its name), or the
        error response to give the client."""
        assert self._session is not None
        prefill = dict(body)
        prefill["kv_transfer_params"] = {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        }
        prefill["stream"] = False
        prefill.pop("stream_options", None)
        prefill["max_tokens"] = 1
        if request.path.endswith("/chat/completions"):
            prefill["max_completion_tokens"] = 1
        headers = {"content-type": "application/json"}
        if "x-request-id" in request.headers:
            headers["x-request-id"] = request.headers["x-request-id"]
        try:
            async with self._session.post(
                f"http://{prefiller}{request.path}", data=orjson.dumps(prefill), headers=headers
            ) as resp:
                payload = await resp.read()
                if resp.status != 200:
                    return web.Response(
                        status=resp.status, body=payload, content_type=resp.content_type or "application/json"
                    )
                name = resp.headers.get(SERVED_BY, prefiller)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return _error(502, f"sidecar: prefill at {prefiller} failed: {type(exc).__name__}: {exc}")
        try:
            answer = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return _error(502, f"sidecar: prefill at {prefiller} answered with invalid JSON")
        return (answer.get("kv_transfer_params") if isinstance(answer, dict) else None), name

    async def _relay(self, request: web.Request, body: bytes, extra: dict[str, str]) -> web.StreamResponse:
        """Send the request to the decode instance and stream its answer back as it comes."""
        assert self._session is not None
        headers = _forward_headers(request.headers)
        headers.pop(PREFILL_HEADER, None)
        url = f"http://{self.decode}{request.path_qs}"
        response: web.StreamResponse | None = None
        try:
            async with self._session.request(request.method, url, data=body, headers=headers) as up:
                response = web.StreamResponse(status=up.status, reason=up.reason)
                response.headers.update(_forward_headers(up.headers))
                if up.content_length is not None:
                    response.content_length = up.content_length
                response.headers.update(extra)
                await response.prepare(request)
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, TimeoutError) as exc:
            if response is not None and response.prepared:
                return response  # cut mid-answer: the client sees the stream end early
            return _error(502, f"sidecar: decode instance {self.decode} failed: {type(exc).__name__}: {exc}")

    async def _passthrough(self, request: web.Request) -> web.StreamResponse:
        return await self._relay(request, await request.read(), {})


async def start_sidecars(
    decodes: Sequence[str], listens: Sequence[str] = (), host: str = "127.0.0.1"
) -> list[Sidecar]:
    """One sidecar per decode instance, on the given listen addresses or free ports of `host`."""
    sidecars: list[Sidecar] = []
    try:
        for i, decode in enumerate(decodes):
            listen_host, listen_port = split_host_port(listens[i]) if i < len(listens) else (host, 0)
            sidecars.append(await Sidecar(decode).start(listen_host, listen_port))
    except BaseException:
        for sidecar in sidecars:
            await sidecar.stop()
        raise
    return sidecars


async def serve(decodes: Sequence[str], listens: Sequence[str]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sidecars = await start_sidecars(decodes, listens)
    try:
        for sidecar in sidecars:
            print(f"{sidecar.address} {sidecar.decode}", flush=True)
        await stop.wait()
    finally:
        for sidecar in sidecars:
            await sidecar.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epp_bench.sidecar", description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode", action="append", required=True, help="decode instance host:port (repeat)")
    parser.add_argument(
        "--listen", action="append", default=[], help="listen host:port, in --decode order (default: free)"
    )
    args = parser.parse_args(argv)
    try:
        for value in [*args.decode, *args.listen]:
            split_host_port(value)
    except ValueError as exc:
        parser.error(str(exc))
    if len(args.listen) > len(args.decode):
        parser.error("more --listen than --decode addresses")
    try:
        asyncio.run(serve(args.decode, args.listen))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
