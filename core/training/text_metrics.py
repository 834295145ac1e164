"""Measures of generated text that a rerank could game: diversity, repetition and length."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def _bigrams(words: Sequence[str]) -> list[tuple[str, str]]:
    return list(zip(words, words[1:]))


def distinct_2(texts: Sequence[str]) -> float:
    """Distinct word bigrams over all bigrams of all texts (Li et al., 2016): low means the texts repeat each other."""
    grams = [g for text in texts for g in _bigrams(text.split())]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(texts: Sequence[str]) -> float:
    """Share of texts in which some word bigram occurs twice or a word three times (a loop, not a style)."""
    def loops(text: str) -> bool:
        words = text.split()
        return any(c > 1 for c in Counter(_bigrams(words)).values()) or any(c > 2 for c in Counter(words).values())
    return sum(map(loops, texts)) / len(texts) if texts else 0.0


def mean_chars(texts: Sequence[str]) -> float:
    return sum(len(t.strip()) for t in texts) / len(texts) if texts else 0.0


def short_rate(texts: Sequence[str], chars: int = 5) -> float:
    """Share of continuations shorter than `chars` characters (empty or a word): a rerank must not prefer them."""
    return sum(len(t.strip()) < chars for t in texts) / len(texts) if texts else 0.0
