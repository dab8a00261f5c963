"""The simulator's tokenizer: 4 bytes of UTF-8 text a token, ids that are those 4 bytes.

The simulator counts a prompt as ceil(bytes / 4) tokens (`text.count_tokens`); this gives those
tokens ids, for vLLM's `/tokenize`, `/detokenize` and render endpoints and for prompts sent as token
ids. Token i of a text is its bytes [4i, 4i + 4), right-padded with NUL bytes when the text ends
inside it, read as a big-endian unsigned 32-bit integer. So

- the ids of a text are `count_tokens` many, the same on every simulator and every run;
- they are prefix-consistent: two texts that share their first 4k bytes share their first k ids,
  so a router that hashes or tree-matches token ids sees exactly the prefixes the simulator's
  KV cache (64-byte blocks, 16 tokens) reuses;
- decoding is exact: `decode(encode(t)) == t` for any text without NUL characters (NUL is the
  padding and is dropped when decoding).

Ids are < 2**32 (the range of a u32, what Rust routers store token ids in), not a dense vocabulary:
ASCII text gives ids from about 0x20202020 up. A prompt sent as a list of ids is turned back into
its text (`ids_prompt`), so `/tokenize` followed by `/v1/completions` with `prompt: [ids]` meets the
same cached blocks as the text itself. Ids that do not decode to UTF-8 (another tokenizer's) still
count one token each. The tokenizer directory `epp_bench.make_tokenizer` writes for load tools
counts its texts the same way (N words, 4N - 1 bytes, N tokens) but has ids of its own vocabulary.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Sequence

from epp_bench.sim.config import CHARS_PER_TOKEN

ID_MASK = 0xFFFFFFFF
_PAD = b"\0"
# An array type code of 4-byte unsigned items ("I" on every mainstream platform): encoding a long
# prompt is one C-level conversion, not a Python loop (routers render every prompt on every worker).
_U32 = next(code for code in "IL" if array.array(code).itemsize == CHARS_PER_TOKEN)


def encode_bytes(data: bytes) -> list[int]:
    """Token ids of raw prompt bytes: one per 4 bytes (the last one padded)."""
    pad = -len(data) % CHARS_PER_TOKEN
    ids = array.array(_U32, data + _PAD * pad if pad else data)
    if sys.byteorder == "little":
        ids.byteswap()  # big-endian ids: the id's hex digits read as the text's bytes
    return ids.tolist()


def encode(text: str) -> list[int]:
    """Token ids of a text (its UTF-8 bytes)."""
    return encode_bytes(text.encode())


def id_bytes(token_id: int) -> bytes:
    """The 4 bytes a token id stands for (ids are taken modulo 2**32)."""
    return (token_id & ID_MASK).to_bytes(CHARS_PER_TOKEN, "big")


def decode(ids: Sequence[int]) -> str:
    """The text of token ids: their bytes without the NUL padding; invalid UTF-8 becomes U+FFFD,
    as a real tokenizer's decode of a partial character does."""
    data = b"".join(id_bytes(i) for i in ids).replace(_PAD, b"")
    return data.decode("utf-8", errors="replace")


def token_strings(ids: Sequence[int]) -> list[str]:
    """Each token's own text (`return_token_strs`), padding dropped."""
    return [id_bytes(i).replace(_PAD, b"").decode("utf-8", errors="replace") for i in ids]


def ids_prompt(ids: Sequence[int]) -> str:
    """The prompt a list of token ids stands for, exactly 4 bytes an id so it counts len(ids)
    tokens: their bytes (padding kept) when those are UTF-8, as for ids from `encode`; otherwise 4
    hex digits an id."""
    data = b"".join(id_bytes(i) for i in ids)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"{i & 0xFFFF:04x}" for i in ids)
