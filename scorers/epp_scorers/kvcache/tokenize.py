"""Prompt -> token ids, as vLLM tokenizes a request, with a Hugging Face `tokenizers` tokenizer.

- `/v1/completions`: the prompt (a string, or a list of token ids taken as they are) encoded
  with the tokenizer's special tokens (vLLM's `add_special_tokens` default for completions).
- `/v1/chat/completions`: the messages rendered through the tokenizer's chat template (Jinja, in
  a sandbox, with `trim_blocks` and `lstrip_blocks` as transformers renders it; `messages`,
  `add_generation_prompt` (default true), `continue_final_message`, `bos_token`, `eos_token`, the
  request's `chat_template_kwargs`), then encoded *without* special tokens (vLLM's chat default:
  the template has placed them). List-of-parts message content is joined text parts, "\n"-separated,
  as vLLM's "string" content format does.
- Anything else: no tokens (precise scoring then has nothing to match).

`load_tokenizer(source)` takes a directory holding `tokenizer.json` (and optionally
`tokenizer_config.json` with `chat_template`, `bos_token`, `eos_token`), or a Hugging Face hub
name that is already in the local cache (`HF_HOME`; epp never downloads: offline).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from epp.framework import Api, InferenceRequest

# tokenizers and jinja2 are imported when a tokenizer is loaded: an epp whose config has no
# precise plugin never loads them (with pyzmq and valkey, about 9 MB of its RSS and a tenth of a
# second of its start).
if TYPE_CHECKING:
    import jinja2
    from tokenizers import Tokenizer


class TokenizerError(ValueError):
    """The tokenizer cannot be loaded, or a request cannot be rendered."""


class PromptTokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str = "",
        eos_token: str = "",
        source: str = "",
    ) -> None:
        self.tokenizer = tokenizer
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template: jinja2.Template | None = None
        if chat_template:
            import jinja2.sandbox

            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            try:
                self._template = env.from_string(chat_template)
            except jinja2.TemplateError as exc:
                raise TokenizerError(
                    f"chat template of {source or 'the tokenizer'} does not parse: {exc}"
                ) from exc

    def encode(self, text: str, *, special_tokens: bool = True) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=special_tokens).ids
        return ids

    def render_chat(self, body: Mapping[str, Any]) -> str:
        if self._template is None:
            raise TokenizerError(f"tokenizer {self.source or ''} has no chat template".replace("  ", " "))
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise TokenizerError("messages must be a list of message objects")
        kwargs = body.get("chat_template_kwargs")
        context: dict[str, Any] = dict(kwargs) if isinstance(kwargs, Mapping) else {}
        context.update(
            messages=[_flatten(m) for m in messages],
            add_generation_prompt=bool(body.get("add_generation_prompt", True)),
            continue_final_message=bool(body.get("continue_final_message", False)),
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        if "tools" in body:
            context["tools"] = body["tools"]
        import jinja2

        try:
            rendered: str = self._template.render(**context)
            return rendered
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template failed: {exc}") from exc
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
            # A body valid as JSON that the template cannot take ("role": 5 where it adds strings,
            # tools nested past the recursion limit): no tokens, as for any malformed body.
            raise TokenizerError(f"chat template failed: {type(exc).__name__}: {exc}") from exc

    def tokens(self, request: InferenceRequest, max_bytes: int = 0) -> list[int] | None:
        """The request's prompt token ids as vLLM would compute them; None when there is no prompt
        to tokenize (an API without one, a malformed body). With `max_bytes`, only the text's
        first `max_bytes` bytes, cut back to a whitespace, are tokenized: the leading blocks
        keep their ids, the work per request is bounded."""
        body = request.body
        if request.api is Api.CHAT_COMPLETIONS:
            return self.encode(
                _head(self.render_chat(_leading_messages(body, max_bytes)), max_bytes), special_tokens=False
            )
        if request.api is Api.COMPLETIONS:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]  # a batch of one
            if isinstance(prompt, str):
                return self.encode(_head(prompt, max_bytes), special_tokens=True)
            if isinstance(prompt, list):
                # Already token ids; with `max_bytes`, as many as that many bytes of text make at
                # most (a token is a byte at least), so the blocks hashed, and the ids checked,
                # stay bounded.
                head = prompt[: max_bytes or None]
                if all(isinstance(t, int) and not isinstance(t, bool) for t in head):
                    return head
        return None


def _leading_messages(body: Mapping[str, Any], max_bytes: int) -> Mapping[str, Any]:
    """`body` with only as many leading messages as render `max_bytes` bytes at least: the chat
    template renders messages in order, so the rendered text's first `max_bytes` bytes are the
    same, and a body of a million messages is not rendered whole on the request path. Counted
    by their text (a character is at least a byte), and at most max_bytes / 4 messages and
    content parts together (a template writes a role marker of more than 4 bytes for each
    message; a message of millions of empty parts is cut, not walked)."""
    messages = body.get("messages")
    if max_bytes <= 0 or not isinstance(messages, list):
        return body
    chars, budget = 0, max_bytes // 4 + 1
    kept: list[Any] = []
    for message in messages:
        if budget <= 0 or chars >= max_bytes:
            break
        budget -= 1
        if isinstance(message, Mapping):
            content = message.get("content")
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                parts = 0
                for part in content:
                    if budget <= 0 or chars >= max_bytes:
                        break
                    budget -= 1
                    parts += 1
                    if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                        chars += len(part["text"])
                if parts < len(content):
                    message = {**message, "content": content[:parts]}
        kept.append(message)
    # Only the last message kept can have been cut (the budget ran out inside it).
    if len(kept) == len(messages) and (not kept or kept[-1] is messages[-1]):
        return body
    return {**body, "messages": kept}


def _head(text: str, max_bytes: int) -> str:
    """`text`, or its first `max_bytes` bytes cut back to the last whitespace (no token split)."""
    if max_bytes <= 0 or len(text) * 4 <= max_bytes:  # 4: the most bytes a character takes
        return text
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    head = data[:max_bytes].decode(errors="ignore")
    cut = max(head.rfind(" "), head.rfind("\n"))
    return head[:cut] if cut > 0 else head


def _raise(message: str) -> None:
    import jinja2

    raise jinja2.TemplateError(message)


def _flatten(message: Mapping[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
        return {**message, "content": "\n".join(t for t in texts if isinstance(t, str))}
    return dict(message)


def load_tokenizer(source: str) -> PromptTokenizer:
    """A tokenizer from a directory or a cached hub name; TokenizerError if neither works."""
    if not source:
        raise TokenizerError("no tokenizer named (modelName)")
    directory = Path(os.path.expanduser(source))
    if directory.is_dir():
        files = _files_in(directory)
    else:
        files = _files_in_hub_cache(source)
    tokenizer_json, config_json = files
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_json))
    except Exception as exc:  # tokenizers raises its own exception types
        raise TokenizerError(f"cannot load {tokenizer_json}: {exc}") from None
    config: dict[str, Any] = {}
    if config_json is not None:
        try:
            loaded = json.loads(config_json.read_text())
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"cannot read {config_json}: {exc}") from None
        config = loaded if isinstance(loaded, dict) else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return PromptTokenizer(
        tokenizer,
        chat_template=template if isinstance(template, str) else None,
        bos_token=_token_text(config.get("bos_token")),
        eos_token=_token_text(config.get("eos_token")),
        source=source,
    )


def _token_text(value: Any) -> str:
    if isinstance(value, Mapping):  # {"content": "<s>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _files_in(directory: Path) -> tuple[Path, Path | None]:
    tokenizer_json = directory / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise TokenizerError(f"{directory} has no tokenizer.json")
    config = directory / "tokenizer_config.json"
    return tokenizer_json, config if config.is_file() else None


def _files_in_hub_cache(name: str) -> tuple[Path, Path | None]:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "tokenizer.json")
    except ValueError as exc:  # not a valid hub name (e.g. an unexpanded "${MODEL_NAME}")
        raise TokenizerError(
            f"tokenizer {name!r} is neither a directory nor a valid hub name: {exc}"
        ) from None
    if not isinstance(found, str):
        raise TokenizerError(
            f"tokenizer {name!r} is neither a directory nor in the local Hugging Face cache "
            "(epp does not download: pre-fetch it, or name a directory)"
        )
    config = try_to_load_from_cache(name, "tokenizer_config.json")
    return Path(found), Path(config) if isinstance(config, str) else None
