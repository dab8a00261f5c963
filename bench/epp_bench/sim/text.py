"""Text without a tokenizer: prompt rendering, token counts, chained block hashes, generated words.

Tokens are 4 characters (counted as UTF-8 bytes). A KV block holds 16 tokens = 64 bytes of text, and
block i's identity is `xxh64(bytes of block i + hash of block i-1)` seeded with `xxh64(model)` (the
simulator's own chain: epp's prefix index chains through xxh64's seed instead, and the two are never
compared), so two prompts share a block only when they share the whole prefix up to its end.
Generated tokens are 4-byte words, so an answer pasted back into the next turn of a conversation
counts (and hashes) exactly as it was generated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import xxhash

from epp_bench.sim.config import BLOCK_CHARS, CHARS_PER_TOKEN

# 16 four-byte words; token i of an answer is WORDS[(seed + i) % 16].
WORDS: tuple[str, ...] = (
    "the ", "and ", "for ", "you ", "are ", "not ", "can ", "its ",
    "was ", "but ", "all ", "has ", "one ", "may ", "out ", "use ",
)  # fmt: skip
WORD_BYTES: tuple[bytes, ...] = tuple(w.encode() for w in WORDS)
WORD_JSON: tuple[bytes, ...] = tuple(orjson.dumps(w) for w in WORDS)  # pre-encoded for SSE chunks


def count_tokens(data: bytes) -> int:
    return -(-len(data) // CHARS_PER_TOKEN)


GENERATION_PROMPT = "<|assistant|>\n"


def chat_prompt(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """The simulator's chat template: `<|role|>\\ncontent\\n` per message, then the generation prompt
    `<|assistant|>\\n` (vLLM's `add_generation_prompt`, default true). An earlier turn's prompt plus
    its answer is therefore a prefix of the next turn's prompt. `continue_final_message` leaves the
    last message open (no newline after it, no generation prompt), as vLLM's option does."""
    parts: list[str] = []
    for message in messages:
        parts.append(f"<|{message.get('role', 'user')}|>\n{message_text(message.get('content'))}\n")
    if continue_final_message:
        if parts:
            parts[-1] = parts[-1][:-1]
    elif add_generation_prompt:
        parts.append(GENERATION_PROMPT)
    return "".join(parts)


def message_text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        texts = (
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
        return "".join(str(t) for t in texts)
    raise ValueError("message content must be a string or a list of content parts")


def model_seed(model: str) -> bytes:
    """The chain's starting value: 8 little-endian bytes of xxh64(model)."""
    return xxhash.xxh64_digest(model.encode())[::-1]


def block_hashes(data: bytes, seed: bytes, start_block: int = 0, end_block: int | None = None) -> list[int]:
    """Chained hashes of the full 64-byte blocks [start_block, end_block) of `data`. `seed` is the
    little-endian value to chain from: the model seed for block 0, else `prev_bytes(hash of the
    block before start_block)`."""
    full = len(data) // BLOCK_CHARS
    end = full if end_block is None else min(end_block, full)
    view = memoryview(data)
    prev = seed
    hashes: list[int] = []
    hasher = xxhash.xxh64()
    for i in range(start_block, end):
        hasher.reset()
        hasher.update(view[i * BLOCK_CHARS : (i + 1) * BLOCK_CHARS])
        hasher.update(prev)
        digest = hasher.digest()
        hashes.append(int.from_bytes(digest, "big"))
        prev = digest[::-1]
    return hashes


def prev_bytes(block_hash: int) -> bytes:
    """The chain value a block hash contributes to the next block (little-endian 8 bytes)."""
    return block_hash.to_bytes(8, "little")


def answer_seed(prompt: bytes) -> int:
    """Same prompt -> same answer (like greedy decoding), different prompts -> different answers."""
    return xxhash.xxh64_intdigest(prompt) % len(WORDS)


def answer_bytes(seed: int, n_tokens: int) -> bytes:
    return b"".join(WORD_BYTES[(seed + i) % len(WORDS)] for i in range(n_tokens))


def answer_text(seed: int, n_tokens: int) -> str:
    return "".join(WORDS[(seed + i) % len(WORDS)] for i in range(n_tokens))
