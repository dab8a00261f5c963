"""Go EPP request-parser types whose job epp does natively: `openai-parser` and `vllmhttp-parser`.

The Go EPP's Helm chart declares request parsing as a plugin. epp always parses the OpenAI API
(completions, chat completions, embeddings, responses) itself, outside the plugin system, so
these types are accepted so that such configs load, do nothing, and are reported with a warning
that names any parameters given (all are ignored).

- `openai-parser`: the OpenAI API.
- `vllmhttp-parser`: the OpenAI-compatible vLLM HTTP API.

Consumes: nothing. Produces: nothing. Parameters: any, all ignored.

    plugins:
    - type: openai-parser
"""

from __future__ import annotations

from typing import ClassVar, Self

from epp.framework import Params, Parser, PluginHandle


def warn_built_in(params: Params, instead: str) -> None:
    """Accept every parameter of a Go type that epp covers natively, and warn that the entry (and
    any parameter given) has no effect; `instead` says what epp does."""
    given = sorted(params.raw())
    note = f"built into epp ({instead}); the entry has no effect"
    if given:
        note += f" and its parameters {', '.join(given)} are ignored"
    params.warn(note)


class OpenAIParser(Parser):
    """Accepted for Go EPP configs and ignored: epp parses the OpenAI API itself."""

    type_name = "openai-parser"
    built_in: ClassVar[str] = "epp parses the OpenAI API itself"

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        warn_built_in(params, cls.built_in)
        return cls(name)


class VllmHttpParser(Parser):
    """Accepted for Go EPP configs and ignored: epp parses the OpenAI-compatible vLLM HTTP API
    itself."""

    type_name = "vllmhttp-parser"
    built_in: ClassVar[str] = "epp parses the OpenAI-compatible vLLM HTTP API itself"

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        warn_built_in(params, cls.built_in)
        return cls(name)
