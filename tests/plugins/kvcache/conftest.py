"""A small real Hugging Face tokenizer (word level, whitespace split) with a chat template, written
to a directory as `tokenizer.json` + `tokenizer_config.json`, as a model repository holds them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

WORDS = [f"w{i}" for i in range(200)]
CHAT_TEMPLATE = (
    "{{ bos_token }} {% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def write_tokenizer(directory: Path) -> Path:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|system|>": 3, "<|user|>": 4, "<|assistant|>": 5}
    vocab.update({w: i + len(vocab) for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Completions get a BOS token from the post-processor, as Llama-style tokenizers add one.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    return write_tokenizer(tmp_path / "tokenizer")


def words(start: int, count: int) -> str:
    return " ".join(WORDS[start : start + count])
