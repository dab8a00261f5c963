"""Go EPP plugin types whose job epp does natively, outside the plugin system.

The Go EPP's Helm chart declares its metrics scraping and request parsing as plugins
(`metrics-data-source`, `core-metrics-extractor`, `openai-parser`, ...). epp always scrapes vLLM and
SGLang metrics and parses the OpenAI API itself, so these types are accepted, do nothing, and are
reported with a warning naming any parameter that epp does not honour.
"""

from __future__ import annotations

from collections.abc import Callable

from epp.framework import Params

# type -> what epp does instead
_NATIVE = {
    "metrics-data-source": "epp scrapes http://<endpoint>/metrics itself (--refresh-metrics-interval)",
    "core-metrics-extractor": "epp reads vLLM and SGLang metrics itself (engine: llm-d.ai/engine-type)",
    "openai-parser": "epp parses the OpenAI API itself",
    "vllmhttp-parser": "epp parses the OpenAI-compatible vLLM HTTP API itself",
}


class NativeEquivalent:
    """Stands in for a Go plugin type that epp covers natively. Not a scheduling plugin."""

    def __init__(self, type_name: str, name: str, params: Params) -> None:
        self.type_name = type_name
        self.name = name
        given = sorted(params.raw())
        note = f"built into epp ({_NATIVE[type_name]}); the entry has no effect"
        if given:
            note += f" and its parameters {', '.join(given)} are ignored"
        params.warn(note)


def _factory(type_name: str) -> Callable[[str, Params], NativeEquivalent]:
    def create(name: str, params: Params) -> NativeEquivalent:
        return NativeEquivalent(type_name, name, params)

    return create


ALL_NATIVE_EQUIVALENTS: dict[str, Callable[[str, Params], NativeEquivalent]] = {
    type_name: _factory(type_name) for type_name in _NATIVE
}
