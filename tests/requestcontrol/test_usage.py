"""Reading token usage from a response body as it streams past."""

from __future__ import annotations

from types import SimpleNamespace

import orjson
import pytest

from epp.requestcontrol import usage
from epp.requestcontrol.usage import Usage, UsageReader


def sse(*events: object) -> list[bytes]:
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def test_sse_usage_from_the_final_event_even_when_split_across_chunks() -> None:
    reader = UsageReader(streaming=True)
    stream = b"".join(
        sse(
            {"choices": [{"text": "a"}]},
            {
                "choices": [],
                "usage": {
                    "prompt_tokens": 12,
                    "completion_tokens": 3,
                    "prompt_tokens_details": {"cached_tokens": 8},
                },
            },
        )
    )
    for i in range(0, len(stream), 7):
        reader.feed(stream[i : i + 7])
    assert reader.finish() == Usage(prompt_tokens=12, completion_tokens=3, cached_tokens=8)


def test_json_body_usage_and_responses_api_names() -> None:
    reader = UsageReader(streaming=False)
    body = orjson.dumps({"usage": {"input_tokens": 5, "output_tokens": 2}})
    reader.feed(body[:10])
    reader.feed(body[10:])
    assert reader.finish() == Usage(prompt_tokens=5, completion_tokens=2)


def test_garbage_and_missing_usage_give_none() -> None:
    for streaming, chunks in ((True, [b"data: {not json\n\n", b"data: [DONE]\n\n"]), (False, [b"<html>"])):
        reader = UsageReader(streaming=streaming)
        for chunk in chunks:
            reader.feed(chunk)
        assert reader.finish() is None


def _fed(body: bytes, chunk: int = 65_536) -> UsageReader:
    reader = UsageReader(streaming=False)
    for i in range(0, len(body), chunk):
        reader.feed(body[i : i + chunk])
    return reader


def test_a_large_json_body_is_read_from_its_tail_and_never_held_whole() -> None:
    """An embeddings answer can be megabytes: only its tail is kept, and the usage after the data
    (where OpenAI-style servers write it) is found there."""
    vectors = [[0.001 * i] * 1024 for i in range(300)]  # about 2.4 MB of JSON
    body = orjson.dumps(
        {
            "object": "list",
            "data": [{"embedding": v, "index": i} for i, v in enumerate(vectors)],
            "usage": {
                "prompt_tokens": 300,
                "total_tokens": 300,
                "prompt_tokens_details": {"cached_tokens": 7},
            },
        }
    )
    assert len(body) > 2_000_000
    reader = UsageReader(streaming=False)
    held = 0
    for i in range(0, len(body), 65_536):
        reader.feed(body[i : i + 65_536])
        held = max(held, len(reader._buffer))
    assert held <= 3 * 65_536
    assert reader.finish() == Usage(prompt_tokens=300, cached_tokens=7)


def test_a_usage_key_inside_the_generated_text_is_not_taken_for_the_usage() -> None:
    text = 'the JSON was {"usage": {"prompt_tokens": 999}} and more ' * 3000  # escaped in the body
    body = orjson.dumps({"choices": [{"text": text}], "usage": {"prompt_tokens": 4, "completion_tokens": 9}})
    assert _fed(body).finish() == Usage(prompt_tokens=4, completion_tokens=9)
    no_usage = orjson.dumps({"choices": [{"text": text}]})
    assert _fed(no_usage).finish() is None  # the escaped one is text, not a key


def test_a_hostile_tail_costs_a_few_small_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    """No server's tail, however made, makes the reader parse it over and over: a few "usage"
    keys and a few closing braces after each are tried, not every one."""
    parses: list[int] = []

    def loads(data: bytes) -> object:
        parses.append(len(data))
        return orjson.loads(data)

    monkeypatch.setattr(usage, "orjson", SimpleNamespace(loads=loads, JSONDecodeError=orjson.JSONDecodeError))
    pad = b'{"pad": "' + b"x" * 200_000 + b'", '
    for tail in (b'"usage": {"a": ' + b"}" * 60_000, (b'"usage": {"a": [' + b"}" * 20) * 2000):
        parses.clear()
        assert _fed(pad + tail).finish() is None
        assert len(parses) <= 16 and sum(parses) < 65_536
