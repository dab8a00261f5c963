"""Benchmark workloads: what to send and when. Deterministic for a given seed.

- shared-prefix: `groups` system prompts, `prompts_per_group` questions each (inference-perf's
  shared_prefix, the llm-d and GIE benchmarks), sent in random order.
- multi-turn: `users` conversations of `rounds` turns; each turn appends the previous answer and a
  new question to the history (production-stack's multi-round QA), so prefixes grow.

Arrivals are Poisson at a fixed rate, or a ladder of (rate, seconds) stages. Lengths are in tokens
of 4 characters, the field's convention without a tokenizer.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

CHARS_PER_TOKEN = 4
# 4-character "tokens" (3 letters + space) so lengths in tokens are exact.
_SYLLABLES = [a + b + c + " " for a in "bcdfgklmnprstvz" for b in "aeiou" for c in "bdgklmnprst"]


def make_text(rng: random.Random, tokens: int) -> str:
    return "".join(rng.choices(_SYLLABLES, k=tokens))


@dataclass(frozen=True)
class Arrivals:
    """Poisson arrivals: `rate` requests/s, or `ladder` stages [(rate, seconds), ...]."""

    rate: float = 10.0
    ladder: tuple[tuple[float, float], ...] = ()

    def times(self, n: int, rng: random.Random) -> list[float]:
        """Arrival offsets (seconds from start) for n requests."""
        out: list[float] = []
        t = 0.0
        if not self.ladder:
            for _ in range(n):
                t += rng.expovariate(self.rate)
                out.append(t)
            return out
        stage_end = 0.0
        for rate, seconds in self.ladder:
            stage_end += seconds
            while len(out) < n:
                gap = rng.expovariate(rate)
                if t + gap > stage_end:
                    t = stage_end
                    break
                t += gap
                out.append(t)
        return out  # may be fewer than n when the ladder ends first


@dataclass(frozen=True)
class SharedPrefix:
    groups: int = 8
    prompts_per_group: int = 16
    system_tokens: int = 2048
    question_tokens: int = 128
    output_tokens: int = 64
    kind: str = "shared-prefix"


@dataclass(frozen=True)
class MultiTurn:
    users: int = 16
    rounds: int = 5
    system_tokens: int = 512
    question_tokens: int = 128
    output_tokens: int = 64
    kind: str = "multi-turn"


@dataclass
class Turn:
    """One request to send. For multi-turn, `user`/`round` order the conversation and the prompt is
    built when the turn is sent (it includes the previous answers)."""

    at: float
    max_tokens: int
    prompt: str = ""
    user: int = -1
    round: int = 0
    question: str = ""
    group: int = -1


@dataclass
class Workload:
    spec: SharedPrefix | MultiTurn
    arrivals: Arrivals
    seed: int = 1
    max_requests: int = 10_000  # every load loop is bounded
    system_prompts: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {**asdict(self.spec), "arrivals": asdict(self.arrivals), "seed": self.seed}

    def turns(self) -> list[Turn]:
        rng = random.Random(self.seed)
        spec = self.spec
        if isinstance(spec, SharedPrefix):
            self.system_prompts = [make_text(rng, spec.system_tokens) for _ in range(spec.groups)]
            pairs = [
                (g, make_text(rng, spec.question_tokens))
                for g in range(spec.groups)
                for _ in range(spec.prompts_per_group)
            ]
            rng.shuffle(pairs)
            pairs = pairs[: self.max_requests]
            times = self.arrivals.times(len(pairs), rng)
            return [
                Turn(at=t, max_tokens=spec.output_tokens, prompt=self.system_prompts[g] + q, group=g)
                for t, (g, q) in zip(times, pairs, strict=False)
            ]
        self.system_prompts = [make_text(rng, spec.system_tokens)]
        # Users start at Poisson times; their later rounds follow their own answers.
        starts = self.arrivals.times(spec.users, rng)
        turns = [
            Turn(
                at=start,
                max_tokens=spec.output_tokens,
                user=u,
                round=r,
                question=make_text(rng, spec.question_tokens),
            )
            for u, start in enumerate(starts)
            for r in range(spec.rounds)
        ]
        return turns[: self.max_requests]


def conversation_prompt(system: str, history: list[tuple[str, str]], question: str) -> str:
    """The completions prompt for a multi-turn round: system, every earlier Q/A, the new question."""
    parts = [system]
    for q, a in history:
        parts.append(f"\nUser: {q}\nAssistant: {a}")
    parts.append(f"\nUser: {question}\nAssistant:")
    return "".join(parts)


def block_hashes(text: str, block_chars: int = 64) -> Iterator[int]:
    """Chained block identities (Python's hash of the running prefix tuple is enough offline)."""
    prev = 0
    for i in range(0, len(text) - block_chars + 1, block_chars):
        prev = hash((prev, text[i : i + block_chars]))
        yield prev


def oracle_hit_rate(prompts: list[str], block_chars: int = 64) -> float:
    """Hit rate if every request met the cache holding most of its prefix: the longest prefix (whole
    blocks) it shares with any earlier request, over all prompt tokens; no eviction."""
    seen: set[int] = set()
    hit = total = 0
    for prompt in prompts:
        total += len(prompt)
        matched = True
        for h in block_hashes(prompt, block_chars):
            if matched and h in seen:
                hit += block_chars
            else:
                matched = False
                seen.add(h)
    return hit / total if total else 0.0
