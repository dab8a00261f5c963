"""Where a simulated engine's token ids come from: its built-in 4-byte tokenizer, or a Hugging Face
tokenizer directory (`--tokenizer DIR`, e.g. the one `python -m epp_bench.make_tokenizer DIR` writes).

The engine keys its KV cache on vLLM's block hashes of these ids when KV events are on or a
tokenizer is given, so a router that tokenizes with the same tokenizer computes the same keys.
Generated tokens are the simulator's answer words (text.WORDS); their ids are the tokenizer's ids
of those words, so the full blocks an answer fills hash as vLLM would hash them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from epp_bench.sim import tokenizer as byte_tokenizer
from epp_bench.sim.text import WORDS


class TokenSource(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_strings(self, ids: Sequence[int]) -> list[str]: ...

    def answer_ids(self) -> tuple[int, ...]:
        """The id of each answer word, in text.WORDS order."""
        ...


class ByteTokens:
    """The built-in tokenizer (tokenizer.py): 4 bytes of UTF-8 a token."""

    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return byte_tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return byte_tokenizer.decode(ids)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return byte_tokenizer.token_strings(ids)

    def answer_ids(self) -> tuple[int, ...]:
        return tuple(byte_tokenizer.encode(word)[0] for word in WORDS)


class HFTokens:
    """A Hugging Face `tokenizers` tokenizer loaded from a directory's tokenizer.json (offline)."""

    def __init__(self, directory: str) -> None:
        from tokenizers import Tokenizer  # only when asked for: the default simulator does not need it

        path = Path(directory) / "tokenizer.json"
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception types for missing/bad files
            raise ValueError(f"cannot load a tokenizer from {path}: {exc}") from None
        self.name = directory
        ids = []
        for word in WORDS:
            token_id = self._tok.token_to_id(word.strip())
            if token_id is None:
                raise ValueError(f"tokenizer {directory} has no token for the answer word {word.strip()!r}")
            ids.append(token_id)
        self._answer_ids = tuple(ids)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self._tok.encode(text).ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self._tok.decode(list(ids), skip_special_tokens=False)
        return text

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.id_to_token(i) or "" for i in ids]

    def answer_ids(self) -> tuple[int, ...]:
        return self._answer_ids


def token_source(tokenizer_dir: str) -> TokenSource:
    return HFTokens(tokenizer_dir) if tokenizer_dir else ByteTokens()
