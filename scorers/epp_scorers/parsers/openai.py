"""Go EPP request-parser types whose job epp does natively: `openai-parser` and `vllmhttp-parser`.

The Go EPP declares request parsing as plugins, listed in the config's `requestHandler.parsers`
(which the loader checks as Go does: every entry names a parser plugin). epp parses every
request itself, outside the plugin system: a JSON body with a `model` string, the prompt taken
from the OpenAI API's fields (completions, chat completions, embeddings, responses) for the
prefix index, any other path routed on load alone.

- `openai-parser`: the OpenAI API; what epp does. Takes no parameters (any given are ignored,
  with a warning).
- `vllmhttp-parser`: the Go type parses vLLM's `/inference/v1/generate` (pre-tokenized
  `token_ids`) and rejects other paths. epp routes a generate request like any other JSON
  request with a `model` (the Go type does not require one), on load: its token ids are not
  prefix-matched. Listed alone, the Go EPP rejects OpenAI paths; epp serves them. Reported with
  a warning.

Parser types that change what epp would have to read (`vllmgrpc-parser`: vLLM's gRPC API;
`passthrough-parser`: any payload, not parsed; `anthropic-parser`, `sglanghttp-parser`,
`vertexai-parser`) are not accepted: the loader names them as types epp does not have.

Consumes: nothing. Produces: nothing.

    plugins:
    - type: openai-parser
    requestHandler:
      parsers:
      - pluginRef: openai-parser
"""

from __future__ import annotations

from typing import ClassVar, Self

from epp.framework import Params, Parser, PluginHandle


def warn_ignored_parameters(params: Params, what: str) -> None:
    """Accept (and warn about) any parameters of a Go type whose work epp does itself."""
    given = sorted(params.raw())
    if given:
        params.warn(f"{what}; its parameters {', '.join(given)} are ignored")


class OpenAIParser(Parser):
    """The OpenAI API, which epp parses itself: accepted for Go EPP configs."""

    type_name = "openai-parser"
    built_in: ClassVar[str] = "epp parses the OpenAI API itself"

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        warn_ignored_parameters(params, cls.built_in)
        return cls(name)


class VllmHttpParser(Parser):
    """vLLM's `/inference/v1/generate`: epp routes it like any JSON request with a `model`, on load
    (its token ids are not prefix-matched). Accepted for Go EPP configs, with a warning."""

    type_name = "vllmhttp-parser"
    built_in: ClassVar[str] = (
        "epp routes /inference/v1/generate like any JSON request with a 'model' (on load: token_ids "
        "are not prefix-matched) and keeps serving OpenAI paths"
    )

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        given = sorted(params.raw())
        note = f"parsed by epp itself: {cls.built_in}"
        if given:
            note += f"; its parameters {', '.join(given)} are ignored"
        params.warn(note)
        return cls(name)
