"""Write a small Hugging Face tokenizer directory that matches the simulator's token count, no hub needed.

Load tools such as inference-perf insist on a tokenizer (`AutoTokenizer.from_pretrained(path)`) to
build prompts of an exact token length and to count output tokens; this machine cannot download one.
This writes a word-level tokenizer whose every word is three lowercase letters, split on whitespace:
a prompt of N tokens is N words joined by spaces, 4N - 1 bytes, which the simulator (4 bytes a token,
rounded up) also counts as N tokens. The simulator's 16 output words ("the", "and", ...) are in the
vocabulary, so streamed output is counted token for token too. Client-side and server-side token
counts therefore agree, and a shared prefix of P tokens is 4P bytes of identical text.

The vocabulary holds every 3-letter word by default (the bench's workload texts use words from the
whole alphabet), then the chat roles `<|system|>`, `<|user|>`, `<|assistant|>`, `<|tool|>` as
special tokens, and tokenizer_config.json carries a chat template rendering messages exactly as the
simulator's chat template does (`<|role|>` newline content newline per message, then `<|assistant|>`
newline): a router that applies it with this tokenizer gets the ids the simulator runs.

Files written: tokenizer.json (the `tokenizers` serialization of a WordLevel model with a WhitespaceSplit
pre-tokenizer, no normalizer, post-processor or decoder: decoding joins words with single spaces),
tokenizer_config.json (PreTrainedTokenizerFast, model_max_length) and special_tokens_map.json.
Only the standard library is used; `--check` loads the result with transformers.AutoTokenizer (offline)
when transformers is installed, as in the inference-perf venv.

    python -m epp_bench.make_tokenizer .venv-perf/sim-tokenizer --check
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import string
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>")
UNK, BOS, EOS = SPECIAL_TOKENS
# The words epp_bench.sim generates (bench/epp_bench/sim/text.py WORDS, without their trailing space).
# Copied rather than imported so this script runs in any Python without the repo's dependencies.
SIM_WORDS: tuple[str, ...] = (
    "the", "and", "for", "you", "are", "not", "can", "its",
    "was", "but", "all", "has", "one", "may", "out", "use",
)  # fmt: skip
MAX_WORDS = 26**3
DEFAULT_VOCAB_SIZE = len(SPECIAL_TOKENS) + MAX_WORDS  # every 3-letter word
# The simulator's chat roles (epp_bench/sim/text.py chat_prompt), added after the vocabulary.
ROLE_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
# Jinja, as tokenizer_config.json's chat_template (string message contents).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
MODEL_MAX_LENGTH = 131072


def vocabulary(size: int = DEFAULT_VOCAB_SIZE) -> dict[str, int]:
    """Token -> id: the special tokens, the simulator's words, then 3-letter words in order."""
    smallest, largest = len(SPECIAL_TOKENS) + len(SIM_WORDS), len(SPECIAL_TOKENS) + MAX_WORDS
    if not smallest <= size <= largest:
        raise ValueError(f"vocab size must be between {smallest} and {largest}")
    vocab: dict[str, int] = {}
    words = itertools.chain(
        SPECIAL_TOKENS, SIM_WORDS, ("".join(t) for t in itertools.product(string.ascii_lowercase, repeat=3))
    )
    for word in words:
        if len(vocab) == size:
            break
        vocab.setdefault(word, len(vocab))
    return vocab


def with_roles(vocab: dict[str, int]) -> dict[str, int]:
    """The vocabulary with the chat role tokens appended."""
    return {**vocab, **{token: len(vocab) + i for i, token in enumerate(ROLE_TOKENS)}}


def tokenizer_json(vocab: dict[str, int]) -> dict[str, Any]:
    """The `tokenizers` (Rust) serialization, as `Tokenizer.to_str()` writes it."""
    added = [
        {
            "id": vocab[token],
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for token in (*SPECIAL_TOKENS, *ROLE_TOKENS)
        if token in vocab
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK},
    }


def tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "unk_token": UNK,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map() -> dict[str, str]:
    return {"unk_token": UNK, "bos_token": BOS, "eos_token": EOS, "pad_token": EOS}


def write_tokenizer(directory: Path, vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "tokenizer.json": tokenizer_json(with_roles(vocabulary(vocab_size))),
        "tokenizer_config.json": tokenizer_config(),
        "special_tokens_map.json": special_tokens_map(),
    }
    written = []
    for name, content in files.items():
        path = directory / name
        path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        written.append(path)
    return written


def check(directory: Path) -> str:
    """Load the directory with transformers.AutoTokenizer, offline, and round-trip a prompt.

    Returns a one-line description; raises if transformers is missing or the round trip fails.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    transformers = importlib.import_module("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(directory))
    ids = [tok.convert_tokens_to_ids(w) for w in ("abc", "the", "cab", "and")]
    text = tok.decode(ids, skip_special_tokens=True)
    again = tok(text, add_special_tokens=True).input_ids
    if text != "abc the cab and" or list(again) != ids:
        raise RuntimeError(f"round trip failed: {ids} -> {text!r} -> {list(again)}")
    if len(text.encode()) != 4 * len(ids) - 1:
        raise RuntimeError(f"{len(ids)} tokens should be {4 * len(ids) - 1} bytes, got {text!r}")
    return (
        f"{type(tok).__name__} vocab_size={tok.vocab_size} model_max_length={tok.model_max_length} "
        f"(transformers {transformers.__version__})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m epp_bench.make_tokenizer",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("directory", type=Path, help="where to write the tokenizer files")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--check", action="store_true", help="load it with transformers.AutoTokenizer")
    args = parser.parse_args(argv)
    try:
        for path in write_tokenizer(args.directory, args.vocab_size):
            print(f"wrote {path}")
        if args.check:
            print(f"loaded: {check(args.directory)}")
    except (ValueError, RuntimeError, ImportError, OSError) as e:
        print(f"make_tokenizer: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
