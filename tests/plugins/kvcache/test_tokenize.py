"""Prompts tokenized as vLLM tokenizes them: completions with special tokens, chat through the
tokenizer's chat template without them; a tokenizer from a directory or the local hub cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from epp.testing import make_request
from epp_scorers.kvcache.tokenize import TokenizerError, load_tokenizer
from tests.plugins.kvcache.conftest import words


def test_completions_get_special_tokens_and_chat_the_template(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(str(tokenizer_dir))
    assert tok.tokens(make_request("w0 w1 w2")) == [1, 6, 7, 8]  # <s> w0 w1 w2
    assert tok.tokens(make_request(body={"prompt": [5, 6, 7]})) == [5, 6, 7]  # token ids as given
    chat = make_request(messages=[{"role": "user", "content": "w0 w1"}])
    # "<s><|user|> w0 w1 <|assistant|> ": BOS from the template, none added by the encoder
    assert tok.tokens(chat) == [1, 4, 6, 7, 5]
    parts = make_request(messages=[{"role": "user", "content": [{"type": "text", "text": "w0"}]}])
    assert tok.tokens(parts) == [1, 4, 6, 5]
    no_prompt = make_request(
        messages=[{"role": "user", "content": "w0"}], body={"add_generation_prompt": False}
    )
    assert tok.tokens(no_prompt) == [1, 4, 6]


def test_a_long_prompt(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(str(tokenizer_dir))
    ids = tok.tokens(make_request(words(0, 200)))
    assert ids is not None and len(ids) == 201


def test_sources_that_do_not_load_say_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(TokenizerError, match=r"has no tokenizer\.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(TokenizerError, match="nor in the local Hugging Face cache"):
        load_tokenizer("some-org/some-model")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(str(tmp_path / "bad"))


def test_a_byte_limit_keeps_the_leading_tokens_and_cuts_at_a_word(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(str(tokenizer_dir))
    request = make_request(words(0, 200))  # "w0 w1 ... w199": about 900 bytes
    whole = tok.tokens(request)
    head = tok.tokens(request, max_bytes=100)
    assert whole is not None and head is not None
    assert 20 < len(head) < 40 and head == whole[: len(head)]  # no split word at the cut
    assert tok.tokens(request, max_bytes=0) == whole


def test_a_byte_limit_renders_only_the_leading_messages(
    tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chat template runs over as many leading messages as fill the byte limit, not over every
    message a client sent (a body can hold a million): the ids are the same as the whole render's
    leading ids."""
    tok = load_tokenizer(str(tokenizer_dir))
    rendered: list[int] = []
    render = tok.render_chat
    monkeypatch.setattr(
        tok, "render_chat", lambda body: rendered.append(len(body["messages"])) or render(body)
    )
    roles = ("assistant", "user")
    messages = [{"role": roles[i % 2], "content": words(i % 50, 5)} for i in range(20_000)]
    request = make_request(messages=messages)
    head = tok.tokens(request, max_bytes=200)
    assert len(rendered) == 1 and rendered[0] < 50
    whole = tok.tokens(make_request(messages=messages[:50]))
    assert head is not None and whole is not None and len(head) > 20 and head == whole[: len(head)]
    empty = make_request(messages=[{"role": "user", "content": ""}] * 20_000)  # no text to count
    tok.tokens(empty, max_bytes=200)
    assert rendered[-1] <= 200 // 4 + 1
    rendered.clear()
    tok.tokens(request, max_bytes=0)  # no limit: the whole body, as before
    assert rendered == [20_000]


def test_a_message_of_a_million_parts_is_cut_not_walked(
    tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The byte limit bounds the content parts visited and rendered too, not only the messages:
    the ids are the leading ids of the whole render."""
    tok = load_tokenizer(str(tokenizer_dir))
    rendered: list[int] = []
    render = tok.render_chat
    monkeypatch.setattr(
        tok, "render_chat", lambda body: rendered.append(len(body["messages"][0]["content"])) or render(body)
    )
    parts = [{"type": "text", "text": words(i % 50, 1)} for i in range(1_000_000)]
    head = tok.tokens(make_request(messages=[{"role": "user", "content": parts}]), max_bytes=200)
    assert rendered == [200 // 4 + 1 - 1]  # the budget: the message itself, then its parts
    whole = tok.tokens(make_request(messages=[{"role": "user", "content": parts[:100]}]))
    assert head is not None and whole is not None and head == whole[: len(head)]
    empty = [{"type": "text", "text": ""}] * 1_000_000  # nothing to count: the part budget ends it
    tok.tokens(make_request(messages=[{"role": "user", "content": empty}]), max_bytes=200)
    assert rendered[-1] <= 200 // 4 + 1


def test_a_long_token_id_prompt_is_checked_only_as_far_as_it_is_used(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(str(tokenizer_dir))
    ids: list[object] = [*range(100), "not an id"]
    assert tok.tokens(make_request(body={"prompt": ids}), max_bytes=100) == list(range(100))
    assert tok.tokens(make_request(body={"prompt": ids}), max_bytes=0) is None  # all of it is used


def test_a_body_the_chat_template_cannot_take_gives_no_tokens(tokenizer_dir: Path) -> None:
    """Valid JSON that a real template would choke on (it adds `role` to a string): no tokens and a
    TokenizerError, as for any malformed body, never an error that fails the request."""
    tok = load_tokenizer(str(tokenizer_dir))
    tok._template = tok._template.environment.from_string(
        "{% for m in messages %}{{ '<|' + m['role'] }}{% endfor %}"
    )
    with pytest.raises(TokenizerError, match="TypeError"):
        tok.tokens(make_request(messages=[{"role": 5, "content": "w0"}]))


def test_token_id_prompts_are_bounded_like_text(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(str(tokenizer_dir))
    ids = list(range(1000))
    assert tok.tokens(make_request(body={"prompt": ids}), max_bytes=100) == ids[:100]
    assert tok.tokens(make_request(body={"prompt": ids}), max_bytes=0) == ids
