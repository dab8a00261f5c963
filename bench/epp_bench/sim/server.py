"""The HTTP face of one simulated instance: vLLM's OpenAI endpoints, /metrics, /health.

Beside generation (`/v1/completions`, `/v1/chat/completions`) it serves the rest of vLLM's HTTP
surface that routers and tools call, in vLLM's request and response shapes: `/tokenize` and
`/detokenize`, `/v1/completions/render` and `/v1/chat/completions/render` (the prompt as vLLM would
hand it to its engine: a `GenerateRequest` with `token_ids` and `sampling_params`), `/v1/models`,
`/version`, `/ping`, `/health`, `/metrics` and `/reset_prefix_cache`. Token ids come from the
simulator's tokenizer (tokenizer.py: 4 bytes a token, prefix-consistent), chat messages go through
its chat template (text.chat_prompt); both are the ones generation uses, so a rendered or tokenized
prompt has exactly the token count, and shares exactly the prefixes, that the KV cache sees.

Every response names the instance in `x-served-by`. Streaming answers are SSE `data:` lines, one
token per event, several events per write when tokens arrived together, then an optional usage chunk
and `data: [DONE]`. A client that disconnects aborts its request (its slot and blocks are freed).

With a Hugging Face tokenizer (`--tokenizer DIR`) the token ids of /tokenize, the render endpoints
and generation are that tokenizer's, and a completion prompt sent as token ids is used as given (its
KV blocks are vLLM's hashes of those ids); KV events (`--kv-events-config`) report the blocks.

P/D: `kv_transfer_params.do_remote_decode` (sent to a prefill instance, usually with max_tokens 1)
answers with the `kv_transfer_params` a decode instance needs; `kv_transfer_params.do_remote_prefill`
(sent to a decode instance) has the prompt's KV transferred rather than computed. Each is refused
by the role that cannot do it.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeGuard

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST

from epp_bench.sim.config import SimConfig
from epp_bench.sim.engine import Engine, QueueFull, RequestTooLarge, SimRequest, SimStats
from epp_bench.sim.metrics import SimMetrics
from epp_bench.sim.text import WORD_JSON, WORDS, answer_text, chat_prompt
from epp_bench.sim.tokenizer import encode, ids_prompt

SERVED_BY = "x-served-by"
DONE = b"data: [DONE]\n\n"
MAX_TOKEN_ID = 2**63 - 1  # vLLM's DetokenizeRequest bound


class BadRequest(ValueError):
    pass


class ModelNotFound(LookupError):
    pass


def error_response(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def json_response(payload: object) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


def single_prompt(body: Mapping[str, Any]) -> object:
    """A completion request's prompt, a batch of one unwrapped."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        return prompt[0]
    return prompt


def completion_prompt(body: Mapping[str, Any]) -> str:
    prompt = single_prompt(body)
    if isinstance(prompt, str):
        return prompt
    if is_token_ids(prompt):
        return ids_prompt(prompt)
    raise BadRequest("prompt must be a string or a list of token ids (batches of several are not supported)")


def is_token_ids(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def completion_token_ids(
    body: Mapping[str, Any], encode: Callable[[str], list[int]] = encode
) -> list[list[int]]:
    """Each prompt of a completion request as token ids (/v1/completions/render): a string, a list of
    ids, or a batch of either."""
    prompt = body.get("prompt")
    prompts: list[Any] = [prompt] if isinstance(prompt, str) or is_token_ids(prompt) else []
    if isinstance(prompt, list) and not prompts:
        prompts = prompt
    if not prompts or not all(isinstance(p, str) or is_token_ids(p) for p in prompts):
        raise BadRequest("prompt must be a string, a list of token ids, or a list of either")
    rendered = [encode(p) if isinstance(p, str) else list(p) for p in prompts]
    if not all(rendered):
        raise BadRequest("No token_ids rendered")
    return rendered


def chat_messages_prompt(body: Mapping[str, Any]) -> str:
    """The prompt text of chat messages through the simulator's chat template, with vLLM's
    `add_generation_prompt` (default true) and `continue_final_message` (default false). A
    request's own `chat_template` / `chat_template_kwargs` are accepted and not applied: the
    simulator has one template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("messages must be a non-empty list of message objects")
    add_generation_prompt = body.get("add_generation_prompt", True)
    continue_final_message = body.get("continue_final_message", False)
    if not isinstance(add_generation_prompt, bool) or not isinstance(continue_final_message, bool):
        raise BadRequest("add_generation_prompt and continue_final_message must be booleans")
    if add_generation_prompt and continue_final_message and "add_generation_prompt" in body:
        raise BadRequest("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    try:
        return chat_prompt(messages, add_generation_prompt, continue_final_message)
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc


def requested_max_tokens(body: Mapping[str, Any]) -> int | None:
    """`max_completion_tokens`, else `max_tokens`, else None (validated: a positive integer)."""
    value = body.get("max_completion_tokens")
    if value is None:
        value = body.get("max_tokens")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest("max_tokens must be a positive integer")
    return value


def sampling_params(body: Mapping[str, Any], max_tokens: int) -> dict[str, Any]:
    """vLLM's SamplingParams of a request, as its render endpoints serialize them (the fields a
    request sets, vLLM's defaults for the rest)."""
    stop = body.get("stop")
    stop_list = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, list) else []
    logprobs = body.get("top_logprobs") if body.get("logprobs") is True else body.get("logprobs")
    return {
        "n": body.get("n", 1),
        "presence_penalty": body.get("presence_penalty") or 0.0,
        "frequency_penalty": body.get("frequency_penalty") or 0.0,
        "repetition_penalty": body.get("repetition_penalty") or 1.0,
        "temperature": 1.0 if body.get("temperature") is None else body["temperature"],
        "top_p": 1.0 if body.get("top_p") is None else body["top_p"],
        "top_k": body.get("top_k") or 0,
        "min_p": body.get("min_p") or 0.0,
        "seed": body.get("seed"),
        "stop": stop_list,
        "stop_token_ids": body.get("stop_token_ids") or [],
        "ignore_eos": bool(body.get("ignore_eos", False)),
        "max_tokens": max_tokens,
        "min_tokens": body.get("min_tokens") or 0,
        "logprobs": logprobs if isinstance(logprobs, int) and not isinstance(logprobs, bool) else None,
        "prompt_logprobs": body.get("prompt_logprobs"),
        "skip_special_tokens": body.get("skip_special_tokens", True),
        "spaces_between_special_tokens": body.get("spaces_between_special_tokens", True),
        "include_stop_str_in_output": bool(body.get("include_stop_str_in_output", False)),
    }


def kv_transfer_flags(body: Mapping[str, Any], role: str) -> tuple[bool, bool]:
    """(do_remote_prefill, do_remote_decode) from vLLM's `kv_transfer_params`, checked against the
    instance's role."""
    params = body.get("kv_transfer_params")
    if params is None:
        return False, False
    if not isinstance(params, dict):
        raise BadRequest("kv_transfer_params must be an object")
    remote_prefill = params.get("do_remote_prefill") is True
    remote_decode = params.get("do_remote_decode") is True
    if remote_prefill and remote_decode:
        raise BadRequest("kv_transfer_params: do_remote_prefill and do_remote_decode are exclusive")
    if remote_prefill and role == "prefill":
        raise BadRequest("this is a prefill instance: it does not take remote KV (do_remote_prefill)")
    if remote_decode and role == "decode":
        raise BadRequest("this is a decode instance: it does not prefill for others (do_remote_decode)")
    return remote_prefill, remote_decode


def usage(req: SimRequest) -> dict[str, Any]:
    return {
        "prompt_tokens": req.prompt_tokens,
        "completion_tokens": req.generated,
        "total_tokens": req.prompt_tokens + req.generated,
        "prompt_tokens_details": {"cached_tokens": req.cached_tokens},
    }


class _QuietMalformedRequests(logging.Filter):
    """aiohttp logs a full traceback for every request it cannot parse. sglang-router probes each
    worker for gRPC (an HTTP/2 connection preface) before it settles on HTTP; this keeps those
    probes to one line each instead of filling the simulator's stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            reason = str(exc.message).strip().split("\n", 1)[0][:120]
            record.msg, record.args = "%s (malformed HTTP request: %s)", (record.getMessage(), reason)
            record.exc_info = record.exc_text = None
        return True


_SERVER_LOG = logging.getLogger("aiohttp.server")
if not any(isinstance(f, _QuietMalformedRequests) for f in _SERVER_LOG.filters):
    _SERVER_LOG.addFilter(_QuietMalformedRequests())


async def listen(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0 = a free port); returns the runner and the bound port.

    handler_cancellation: a client that hangs up cancels its handler, which aborts its request
    (otherwise work would run to the end for nobody). Raises OSError, cleaned up, when the port
    cannot be bound."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        await runner.cleanup()
        raise
    await web.SockSite(runner, sock, backlog=1024).start()
    return runner, int(sock.getsockname()[1])


class Simulator:
    """One vLLM-like instance: engine + metrics + aiohttp server. Use `start_simulator` to make one."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.engine = Engine(cfg)
        self.metrics = SimMetrics(self.engine)
        self.host = ""
        self.port = 0
        self._model_json = orjson.dumps(cfg.model)
        self._runner: web.AppRunner | None = None

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def stats(self) -> SimStats:
        """Live counters (tokens, requests, prefix-cache hits/queries) of this instance."""
        return self.engine.stats

    @property
    def address(self) -> str:
        """host:port, as the EPP's static endpoint list wants it."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def max_model_len(self) -> int:
        """The longest prompt + output the KV cache can hold, in tokens (`/v1/models`, `/tokenize`)."""
        return self.cfg.kv_cache_blocks * 16

    def reset_prefix_cache(self) -> int:
        return self.engine.reset_prefix_cache()

    def restart(self) -> None:
        """Simulate a pod restart on the same address: running and queued requests fail, the KV
        cache is empty, and the KV event stream starts again (sequence 0) with AllBlocksCleared."""
        self.engine.restart()

    @property
    def kv_events_endpoint(self) -> str | None:
        """The address the KV event PUB socket is bound (or connected) to; None without events."""
        publisher = self.engine.publisher
        return publisher.endpoint if publisher is not None else None

    @property
    def kv_events_replay_endpoint(self) -> str | None:
        publisher = self.engine.publisher
        return publisher.replay_endpoint if publisher is not None else None

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.on_response_prepare.append(self._tag_response)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/reset_prefix_cache", self._reset_prefix_cache)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        app.router.add_post("/v1/completions/render", self._render_completion)
        app.router.add_post("/v1/chat/completions/render", self._render_chat)
        app.router.add_get("/version", self._version)
        app.router.add_get("/ping", self._health)  # vLLM (SageMaker's probe): GET and POST, 200
        app.router.add_post("/ping", self._health)
        app.router.add_post("/sim/restart", self._restart)  # the simulator's own, not vLLM's
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen, then start the engine (and its KV event sockets, whose topic may name the
        address: `{address}` in it becomes host:port); OSError when a port cannot be bound."""
        self._runner, self.port = await listen(self.make_app(), host, port)
        self.host = host
        try:
            self.engine.start(address=self.address)
        except OSError:
            await self.stop()
            raise

    async def stop(self) -> None:
        await self.engine.stop()  # first, so streams still open end instead of hanging the cleanup
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- handlers -------------------------------------------------------------------------------------
    async def _tag_response(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[SERVED_BY] = self.cfg.name

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        names = request.query.getall("name[]", ())
        return web.Response(body=self.metrics.render(names), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _models(self, request: web.Request) -> web.Response:
        model = {
            "id": self.cfg.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": self.cfg.model,
            "parent": None,
            "max_model_len": self.max_model_len,
        }
        return web.Response(
            body=orjson.dumps({"object": "list", "data": [model]}), content_type="application/json"
        )

    async def _reset_prefix_cache(self, request: web.Request) -> web.Response:
        self.engine.reset_prefix_cache()
        return web.Response(status=200)

    async def _restart(self, request: web.Request) -> web.Response:
        """POST /sim/restart: `restart()` (a pod restart on the same address), for benchmarks."""
        self.restart()
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.Response:
        return json_response({"version": self.cfg.vllm_version})

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        """The request's JSON object; raises BadRequest, or ModelNotFound for another model (vLLM
        takes a missing `model` as the served one)."""
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise BadRequest("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.cfg.model:
            raise ModelNotFound(f"The model `{model}` does not exist.")
        return body

    async def _tokenize(self, request: web.Request) -> web.Response:
        """vLLM's TokenizeRequest: `{"prompt": str}` or `{"messages": [...], "add_generation_prompt"}`
        -> `{"count", "max_model_len", "tokens", "token_strs"}`."""
        try:
            body = await self._json_body(request)
            if "messages" in body:
                text = chat_messages_prompt(body)
            elif isinstance(body.get("prompt"), str):
                text = body["prompt"]
            else:
                raise BadRequest("a tokenize request needs `prompt` (a string) or `messages`")
        except ModelNotFound as exc:
            return error_response(404, str(exc), "NotFoundError")
        except BadRequest as exc:
            return error_response(400, str(exc), "BadRequestError")
        tokens = self.engine.tokens
        ids = tokens.encode(text)
        return json_response(
            {
                "count": len(ids),
                "max_model_len": self.max_model_len,
                "tokens": ids,
                "token_strs": tokens.token_strings(ids) if body.get("return_token_strs") else None,
            }
        )

    async def _detokenize(self, request: web.Request) -> web.Response:
        """vLLM's DetokenizeRequest: `{"tokens": [int]}` -> `{"prompt": str}`."""
        try:
            body = await self._json_body(request)
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(
                type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in tokens
            ):
                raise BadRequest("tokens must be a list of non-negative integers")
        except ModelNotFound as exc:
            return error_response(404, str(exc), "NotFoundError")
        except BadRequest as exc:
            return error_response(400, str(exc), "BadRequestError")
        return json_response({"prompt": self.engine.tokens.decode(tokens)})

    def _generate_request(
        self, body: Mapping[str, Any], token_ids: list[int], chat: bool, max_tokens: int | None
    ) -> dict[str, Any]:
        """One vLLM GenerateRequest (what the render endpoints return): the prompt's token ids and
        the sampling params the server would run it with. max_tokens defaults to the simulator's
        default (as generation does) and is capped at what is left of max_model_len."""
        room = self.max_model_len - len(token_ids)
        if room <= 0:
            raise BadRequest(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"request has {len(token_ids)} input tokens."
            )
        limit = min(max_tokens if max_tokens is not None else self.cfg.default_max_tokens, room)
        stream = bool(body.get("stream"))
        return {
            "request_id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "token_ids": token_ids,
            "features": None,
            "sampling_params": sampling_params(body, limit),
            "model": body.get("model"),
            "stream": stream,
            "stream_options": body.get("stream_options") if stream else None,
            "cache_salt": body.get("cache_salt"),
            "priority": body.get("priority", 0),
            "kv_transfer_params": None,
        }

    async def _render_completion(self, request: web.Request) -> web.Response:
        """vLLM's /v1/completions/render: a CompletionRequest -> a list of GenerateRequest, one per
        prompt."""
        try:
            body = await self._json_body(request)
            max_tokens = requested_max_tokens(body)
            rendered = [
                self._generate_request(body, ids, False, max_tokens)
                for ids in completion_token_ids(body, self.engine.tokens.encode)
            ]
        except ModelNotFound as exc:
            return error_response(404, str(exc), "NotFoundError")
        except BadRequest as exc:
            return error_response(400, str(exc), "BadRequestError")
        return json_response(rendered)

    async def _render_chat(self, request: web.Request) -> web.Response:
        """vLLM's /v1/chat/completions/render: a ChatCompletionRequest -> one GenerateRequest, the
        messages through the chat template."""
        try:
            body = await self._json_body(request)
            max_tokens = requested_max_tokens(body)
            ids = self.engine.tokens.encode(chat_messages_prompt(body))
            rendered = self._generate_request(body, ids, True, max_tokens)
        except ModelNotFound as exc:
            return error_response(404, str(exc), "NotFoundError")
        except BadRequest as exc:
            return error_response(400, str(exc), "BadRequestError")
        return json_response(rendered)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return error_response(400, "request body is not valid JSON", "BadRequestError")
        if not isinstance(body, dict):
            return error_response(400, "request body must be a JSON object", "BadRequestError")
        model = body.get("model", self.cfg.model)
        if model != self.cfg.model:
            return error_response(404, f"The model `{model}` does not exist.", "NotFoundError")
        token_ids: list[int] | None = None
        try:
            if not chat and self.engine.vllm_block_keys and is_token_ids(prompt_ids := single_prompt(body)):
                token_ids = prompt_ids  # used as given, as vLLM does; the text is only for the answer
                prompt = self.engine.tokens.decode(token_ids)
            else:
                prompt = chat_messages_prompt(body) if chat else completion_prompt(body)
            max_tokens = requested_max_tokens(body) or self.cfg.default_max_tokens
            remote_prefill, remote_decode = kv_transfer_flags(body, self.cfg.role)
        except BadRequest as exc:
            return error_response(400, str(exc), "BadRequestError")
        stream = bool(body.get("stream"))
        salt = body.get("cache_salt") if self.engine.vllm_block_keys else None  # hashed with vLLM keys
        if salt is not None and (not isinstance(salt, str) or not salt):
            return error_response(400, "cache_salt must be a non-empty string", "BadRequestError")
        req = self.engine.new_request(prompt, max_tokens, stream, remote_prefill, token_ids, salt)
        try:
            self.engine.submit(req)
        except RequestTooLarge as exc:
            return error_response(400, str(exc), "BadRequestError")
        except QueueFull as exc:
            return error_response(429, str(exc), "TooManyRequests")
        try:
            if stream:
                options = body.get("stream_options")
                include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
                return await self._stream(request, req, chat, include_usage)
            return await self._respond(req, chat, remote_decode)
        finally:
            self.engine.abort(req)  # no-op once finished; frees the slot if the client went away

    def _kv_transfer_params(self, req: SimRequest) -> dict[str, Any]:
        """What a vLLM prefill instance returns for the decode instance to pull the KV from."""
        return {
            "do_remote_decode": False,
            "do_remote_prefill": True,
            "remote_engine_id": self.cfg.name,
            "remote_block_ids": list(range(len(req.hashes))),
            "remote_host": self.host,
            "remote_port": self.port,
            "tp_size": 1,
        }

    async def _respond(self, req: SimRequest, chat: bool, remote_decode: bool = False) -> web.Response:
        while not req.done:
            req.wakeup.clear()
            await req.wakeup.wait()
        if req.error is not None:
            return error_response(503, f"request {req.error}", "ServiceUnavailableError")
        text = answer_text(req.answer_seed, req.generated)
        choice: dict[str, Any] = {
            "index": 0,
            "logprobs": None,
            "finish_reason": "remote_decode" if remote_decode else "length",
            "stop_reason": None,
        }
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        payload = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{req.rid}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.cfg.model,
            "choices": [choice],
            "usage": usage(req),
        }
        if remote_decode:
            payload["kv_transfer_params"] = self._kv_transfer_params(req)
        return web.Response(body=orjson.dumps(payload), content_type="application/json")

    async def _stream(
        self, request: web.Request, req: SimRequest, chat: bool, include_usage: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        # Every token event is head + word + tail: built from pre-encoded pieces, no JSON per token.
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{req.rid}".encode()
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        envelope = b'{"id":"%s","object":"%s","created":%d,"model":%s,"choices":' % (
            rid,
            obj,
            int(time.time()),
            self._model_json,
        )
        close = b"}" if chat else b""  # a chat token sits inside "delta":{...}
        tail = close + b',"logprobs":null,"finish_reason":null}]}\n\n'
        last_tail = close + b',"logprobs":null,"finish_reason":"length"}]}\n\n'
        pending: list[bytes] = []
        if chat:
            head = b"data: " + envelope + b'[{"index":0,"delta":{"content":'
            pending.append(head + b'"","role":"assistant"' + tail)  # vLLM's first chat chunk names the role
        else:
            head = b"data: " + envelope + b'[{"index":0,"text":'
        seed, n_words, last = req.answer_seed, len(WORDS), req.max_tokens - 1
        sent = 0
        while True:
            if req.generated == sent and not req.done:  # else tokens arrived while we were writing
                req.wakeup.clear()
                await req.wakeup.wait()
            upto = req.generated
            for i in range(sent, upto):
                pending.append(head + WORD_JSON[(seed + i) % n_words] + (last_tail if i == last else tail))
            sent = upto
            if req.done:
                break
            if pending:
                await resp.write(b"".join(pending))
                pending.clear()
        if req.error is not None:
            error = {"error": {"message": f"request {req.error}", "type": "ServiceUnavailableError"}}
            pending.append(b"data: " + orjson.dumps(error) + b"\n\n")
        elif include_usage:
            pending.append(b"data: " + envelope + b'[],"usage":' + orjson.dumps(usage(req)) + b"}\n\n")
        pending.append(DONE)
        await resp.write(b"".join(pending))
        await resp.write_eof()
        return resp


async def start_simulator(cfg: SimConfig, host: str = "127.0.0.1", port: int = 0) -> Simulator:
    """Start one instance listening on host:port (0 = a free port, see `.port`)."""
    sim = Simulator(cfg)
    await sim.start(host, port)
    return sim


async def start_simulators(
    cfgs: Sequence[SimConfig], host: str = "127.0.0.1", base_port: int = 0
) -> list[Simulator]:
    """Start several instances: consecutive ports from `base_port`, or free ports if it is 0."""
    sims: list[Simulator] = []
    try:
        for i, cfg in enumerate(cfgs):
            sims.append(await start_simulator(cfg, host, base_port + i if base_port else 0))
    except BaseException:
        for sim in sims:
            await sim.stop()
        raise
    return sims
