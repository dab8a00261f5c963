"""Reading token usage from a response body as it streams past."""

from __future__ import annotations

import orjson

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


def test_a_json_body_over_the_bound_is_not_kept() -> None:
    reader = UsageReader(streaming=False)
    reader.feed(b'{"pad": "' + b"x" * (9 * 1024 * 1024))
    reader.feed(b'", "usage": {"prompt_tokens": 1}}')
    assert reader.finish() is None
