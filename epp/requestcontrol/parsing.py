"""Turn a buffered OpenAI-style request body into an InferenceRequest, or a 400 saying why not."""

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


def _prompt_text(api: Api, body: Mapping[str, Any]) -> str:
    """The text the prefix index hashes; raises 400 when the API's required field is missing."""
    if api is Api.CHAT_COMPLETIONS:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("chat completions request needs a non-empty 'messages' list")
        return orjson.dumps(messages).decode()
    if api is Api.COMPLETIONS:
        prompt = body.get("prompt")
        if prompt is None or prompt == "" or prompt == []:
            raise _bad("completions request needs 'prompt'")
        return prompt if isinstance(prompt, str) else orjson.dumps(prompt).decode()
    if api in (Api.EMBEDDINGS, Api.RESPONSES):
        value = body.get("input")
        if value is None or value == "" or value == []:
            raise _bad(f"{api.value} request needs 'input'")
        text = value if isinstance(value, str) else orjson.dumps(value).decode()
        instructions = body.get("instructions")
        return f"{instructions}{text}" if isinstance(instructions, str) else text
    # Unknown API: route it on load alone, hashing whatever prompt-like field it has.
    for key in ("prompt", "messages", "input"):
        if key in body:
            value = body[key]
            return value if isinstance(value, str) else orjson.dumps(value).decode()
    return ""


def parse_request(
    request_id: str, path: str, headers: Mapping[str, str], raw_body: bytes
) -> InferenceRequest:
    try:
        body = orjson.loads(raw_body)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("request body needs a 'model' string")
    api = api_for_path(path)
    return InferenceRequest(
        request_id=request_id,
        model=model,
        api=api,
        prompt_text=_prompt_text(api, body),
        headers=headers,
        body=body,
        streaming=body.get("stream") is True,
    )
