"""`tokenizer` and `token-producer`: the request's prompt as token ids, for precise prefix-cache
routing (`precise-prefix-cache-scorer`, `precise-prefix-cache-producer`), computed as vLLM
computes them (epp_scorers.kvcache.tokenize: the chat template for chat completions, special
tokens for completions).

Both load a Hugging Face `tokenizers` tokenizer named by `modelName`: a directory holding
`tokenizer.json` (and `tokenizer_config.json` for the chat template), or a hub name already in the
local Hugging Face cache (epp never downloads). A tokenizer that cannot be loaded is reported at
start (`--check-config` prints it) and the plugin then publishes nothing: precise scoring sees
no match and the other scorers decide.

Upstream tokenizes out of process (`tokenizer`: a sidecar over a unix socket,
`udsTokenizerConfig`; `token-producer`: the model server's `/tokenize` or render endpoint,
`vllm.url`). epp tokenizes in-process with the same tokenizer files instead, because plugins
schedule synchronously and a network round trip per request would stall the event loop: those
parameters are accepted and reported as not acted on. Tokenizing runs on the request path, 1 to 5
ms per 1,000 prompt tokens on the loaded 2-core development machine (docs/kv-events.md);
`maxPromptBytes` bounds it: only the prompt's leading bytes are tokenized (of a chat request,
only the leading messages that fill them go through the template), which is what the prefix
match needs.

Consumes: nothing. Produces: `prompt-tokens` (the token ids; read by the precise plugins, which
find the tokenizer plugin by type). Parameters: `modelName` (string, required), `maxPromptBytes`
(int, epp's, default 32768; 0: no limit);
`tokenizer`: `udsTokenizerConfig` (mapping, not acted on); `token-producer`: `vllm` (mapping:
`url`, `timeout`, `mmTimeout`; not acted on).

    plugins:
    - type: tokenizer
      parameters:
        modelName: /models/Qwen3-32B   # or Qwen/Qwen3-32B from the local cache
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any, Self

from epp.framework import (
    CycleState,
    DataKey,
    DataProducer,
    Endpoint,
    InferenceRequest,
    ParamDoc,
    Params,
    PluginHandle,
)
from epp_scorers.kvcache.tokenize import PromptTokenizer, TokenizerError, load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_PROMPT_BYTES = 32768  # about 8,000 tokens: bounds the tokenizing on the request path

# A request's token ids, or () when it has none (an API without a prompt, a template failure).
PROMPT_TOKENS: DataKey[tuple[int, ...]] = DataKey("prompt-tokens", "tokenizer")

MODEL_NAME_DOC = ParamDoc(
    "modelName", "string", "", "A tokenizer directory, or a hub name in the local Hugging Face cache."
)
MAX_PROMPT_BYTES_DOC = ParamDoc(
    "maxPromptBytes",
    "int",
    str(DEFAULT_MAX_PROMPT_BYTES),
    "epp's: tokenize at most this many leading bytes of the prompt (0: all); bounds the work per request.",
)


class TokenizerPlugin(DataProducer):
    """Publishes the request's prompt token ids, computed in-process with the model's Hugging Face
    tokenizer (the chat template applied as vLLM applies it)."""

    type_name = "tokenizer"
    parameters = (
        MODEL_NAME_DOC,
        ParamDoc(
            "udsTokenizerConfig",
            "mapping",
            "",
            "Upstream's tokenizer sidecar (socketFile): accepted, not acted on.",
        ),
        MAX_PROMPT_BYTES_DOC,
    )

    def __init__(
        self,
        name: str = "",
        *,
        model_name: str = "",
        tokenizer: PromptTokenizer | None = None,
        max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
    ) -> None:
        super().__init__(name)
        self.model_name = model_name
        self.max_prompt_bytes = max_prompt_bytes
        self.key = PROMPT_TOKENS.for_producer(self.name)
        self.tokenizer = tokenizer
        self.load_error = ""
        if tokenizer is None and model_name:
            try:
                self.tokenizer = load_tokenizer(model_name)
            except TokenizerError as exc:
                self.load_error = str(exc)

    @classmethod
    def _read_params(cls, params: Params) -> str:
        params.sub("udsTokenizerConfig").unimplemented("socketFile", reason="epp tokenizes in-process")
        return params.get_str("modelName", "")

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        model_name = cls._read_params(params)
        limit = params.get_int("maxPromptBytes", DEFAULT_MAX_PROMPT_BYTES, minimum=0)
        plugin = cls(name, model_name=model_name, max_prompt_bytes=limit)
        if not plugin.model_name:
            params.warn("no modelName: no tokenizer, so precise prefix-cache scoring matches nothing")
        elif plugin.load_error:
            params.warn(f"{plugin.load_error}; precise prefix-cache scoring matches nothing until it loads")
        return plugin

    def produces(self) -> Collection[DataKey[Any]]:
        return (self.key,)

    def produce(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        self.tokens(cycle, request)

    def tokens(self, cycle: CycleState, request: InferenceRequest) -> tuple[int, ...]:
        """The request's token ids, computed once per request (kept in the cycle state)."""
        done = cycle.read(self.key)
        if done is not None:
            return done
        ids: tuple[int, ...] = ()
        if self.tokenizer is not None:
            try:
                ids = tuple(self.tokenizer.tokens(request, self.max_prompt_bytes) or ())
            except TokenizerError as exc:
                log.debug("request %s: not tokenized: %s", request.request_id, exc)
        cycle.write(self.key, ids)
        return ids


class TokenProducer(TokenizerPlugin):
    """Publishes the request's prompt token ids (upstream's split pipeline: token-producer ->
    precise-prefix-cache-producer -> prefix-cache-scorer), tokenizing in-process like `tokenizer`."""

    type_name = "token-producer"
    parameters = (
        MODEL_NAME_DOC,
        ParamDoc(
            "vllm",
            "mapping",
            "",
            "Upstream's vLLM HTTP tokenizer (url, timeout, mmTimeout): accepted, not acted on.",
        ),
        MAX_PROMPT_BYTES_DOC,
    )

    @classmethod
    def _read_params(cls, params: Params) -> str:
        params.sub("vllm").unimplemented(
            "url", "timeout", "mmTimeout", reason="epp tokenizes in-process with modelName's tokenizer"
        )
        return params.get_str("modelName", "")
