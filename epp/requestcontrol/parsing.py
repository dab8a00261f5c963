"""Turn a buffered OpenAI-style request body into an InferenceRequest, or a 400 saying why not.

Whatever a client sends is a 400 with a reason, never an internal error: JSON nested deeper than
orjson reads (1,024 levels) or writes back (254 levels, for the prompt text of `messages` /
`input` / a list `prompt`) is "nested too deeply"."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from epp.errors import EppError, ErrorCode
from epp.framework import Api, InferenceRequest

_API_BY_PATH = {api.value: api for api in Api if api is not Api.OTHER}


def api_for_path(path: str) -> Api:
    """The API from the :path suffix (query string ignored), so prefixes like /openai/v1/... work."""
    path = path.split("?", 1)[0].rstrip("/")
    for suffix, api in _API_BY_PATH.items():
        if path.endswith(suffix):
            return api
    return Api.OTHER


def _bad(message: str) -> EppError:
    return EppError(ErrorCode.BAD_REQUEST, message)


def _too_deep(detail: str) -> EppError:
    return _bad(f"request JSON is nested too deeply ({detail})")


class _Prompt:
    """The prompt text and, when it was serialized from JSON, its UTF-8 bytes (kept, so the
    prefix index does not encode the text a second time)."""

    __slots__ = ("data", "text")

    def __init__(self, text: str, data: bytes | None = None) -> None:
        self.text = text
        self.data = data


def _serialized(value: Any) -> _Prompt:
    try:
        data = orjson.dumps(value)
    except orjson.JSONEncodeError as exc:  # the only one for parsed JSON: more than 254 levels
        raise _too_deep(f"{exc}: at most 254 levels in the prompt") from None
    return _Prompt(data.decode(), data)


def _text(value: Any) -> _Prompt:
    return _Prompt(value) if isinstance(value, str) else _serialized(value)


def _prompt(api: Api, body: Mapping[str, Any]) -> _Prompt:
    """The text the prefix index hashes; raises 400 when the API's required field is missing."""
    if api is Api.CHAT_COMPLETIONS:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("chat completions request needs a non-empty 'messages' list")
        return _serialized(messages)
    if api is Api.COMPLETIONS:
        prompt = body.get("prompt")
        if prompt is None or prompt == "" or prompt == []:
            raise _bad("completions request needs 'prompt'")
        return _text(prompt)
    if api in (Api.EMBEDDINGS, Api.RESPONSES):
        value = body.get("input")
        if value is None or value == "" or value == []:
            raise _bad(f"{api.value} request needs 'input'")
        text = _text(value)
        instructions = body.get("instructions")
        return _Prompt(f"{instructions}{text.text}") if isinstance(instructions, str) else text
    # Unknown API: route it on load alone, hashing whatever prompt-like field it has.
    for key in ("prompt", "messages", "input"):
        if key in body:
            return _text(body[key])
    return _Prompt("")


def parse_request(
    request_id: str, path: str, headers: Mapping[str, str], raw_body: bytes
) -> InferenceRequest:
    try:
        body = orjson.loads(raw_body)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):
            raise _too_deep(f"more than 1024 levels: {exc}") from None
        raise _bad(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("request body needs a 'model' string")
    api = api_for_path(path)
    prompt = _prompt(api, body)
    return InferenceRequest(
        request_id=request_id,
        model=model,
        api=api,
        prompt_text=prompt.text,
        headers=headers,
        body=body,
        streaming=body.get("stream") is True,
        _prompt_bytes=prompt.data,
    )
