"""Pretraining examples: GLM's autoregressive blank infilling, plus a copy task that extraction needs.

Every example has the layout the model (and fine-tuning) uses: a bidirectional context that holds one mask token,
then ``<sop>``, the text the mask stands for, ``<eop>``; the loss is on ``<sop>``'s successors only::

    infill:   text[:a] [MASK] text[b:]        <sop> text[a:b] <eop>     (a span of 10-40 % in the middle)
    continue: text[:k] [gMASK]                <sop> text[k:] <eop>      (GLM's generation objective)
    copy:     (prompt) text [gMASK]           <sop> s1 <n> s2 <n> ... <eop>

``copy`` asks for 1-4 short spans of the context (2-8 characters, cut inside clauses, in reading order), one per
line: an extraction answer is short spans of its text, one triple per line, and a base model that has never had to
reproduce a span of its context learns to invent spans instead (see ``../shared/spec/mini_feasibility.md``). No
relation name and no answer of any data set is used: the spans are drawn at random. Half the copy examples of the
triples texts start with the fine-tuning prompt, so the model has seen it ahead of a text.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

IGNORE = -100
_CLAUSE = re.compile(r"[^，。、；：！？,;:!?\s（）()“”\"'《》【】]+")


@dataclass(frozen=True)
class Specials:
    mask: int
    gmask: int
    sop: int
    eop: int


@dataclass(frozen=True)
class Mix:
    """Shares of each objective (normalised when drawn)."""

    infill: float = 1.0
    continuation: float = 1.0
    copy: float = 1.0
    whole_clauses: bool = False  # copy whole clauses instead of random 2-8-character spans


def _window(text: str, rng: random.Random, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    start = rng.randrange(len(text) - max_chars + 1)
    return text[start : start + max_chars]


def _spans(text: str, rng: random.Random, count: int, whole: bool = False) -> list[str]:
    """Up to ``count`` spans inside clauses (no punctuation), in the order they occur: 2-8 characters at random
    places, or (``whole``) whole clauses of at most 16 characters, whose every token after the first is fixed by the
    context, so the only way to predict them is to find the place and copy."""
    clauses = [m for m in _CLAUSE.finditer(text) if m.end() - m.start() >= 2]
    picked = sorted(rng.sample(clauses, min(count, len(clauses))), key=lambda m: m.start())
    out = []
    for m in picked:
        if whole:
            out.append(text[m.start() : min(m.end(), m.start() + 16)])
            continue
        length = rng.randint(2, min(8, m.end() - m.start()))
        start = rng.randint(m.start(), m.end() - length)
        out.append(text[start : start + length])
    return out


class Examples:
    """Draws (input_ids, labels) pairs from the corpus texts with a seeded ``random.Random``."""

    def __init__(self, tokenizer, specials: Specials, mix: Mix, max_chars: int = 240, prompt: str = "") -> None:
        self.encode = lambda s: tokenizer.encode(s, add_special_tokens=False) if s else []
        self.sp, self.max_chars, self.prompt = specials, max_chars, prompt
        self.kinds = [("infill", mix.infill), ("continuation", mix.continuation), ("copy", mix.copy)]
        self.whole = mix.whole_clauses

    def draw(self, text: str, rng: random.Random, with_prompt: bool = False) -> tuple[list[int], list[int]]:
        kind = rng.choices([k for k, _ in self.kinds], weights=[w for _, w in self.kinds])[0]
        text = _window(text, rng, self.max_chars)
        if len(text) < 4:
            kind = "continuation"
        return getattr(self, kind)(text, rng, with_prompt)

    def _pair(self, context: list[int], target: list[int]) -> tuple[list[int], list[int]]:
        answer = [self.sp.sop, *target, self.sp.eop]
        return context + answer, [IGNORE] * len(context) + answer

    def infill(self, text: str, rng: random.Random, _with_prompt: bool) -> tuple[list[int], list[int]]:
        n = len(text)
        length = max(1, int(n * rng.uniform(0.1, 0.4)))
        a = rng.randint(0, n - length)
        context = [*self.encode(text[:a]), self.sp.mask, *self.encode(text[a + length :])]
        return self._pair(context, self.encode(text[a : a + length]))

    def continuation(self, text: str, rng: random.Random, _with_prompt: bool) -> tuple[list[int], list[int]]:
        k = max(1, int(len(text) * rng.uniform(0.2, 0.6))) if len(text) > 1 else 0
        return self._pair([*self.encode(text[:k]), self.sp.gmask], self.encode(text[k:]))

    def copy(self, text: str, rng: random.Random, with_prompt: bool) -> tuple[list[int], list[int]]:
        spans = _spans(text, rng, rng.randint(1, 4), self.whole) or [text[:8]]
        source = (self.prompt if with_prompt and rng.random() < 0.5 else "") + text
        return self._pair([*self.encode(source), self.sp.gmask], self.encode("\n".join(spans)))
