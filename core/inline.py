"""Inline mode's rules (`@bot 긍정 아 정말` typed in any chat): wait until the user stops typing, and remember recent
answers per query text (the text carries its knobs; inline queries have no chat defaults), so a query typed again
or by someone else costs no generation."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import replace

from core.types import Generation

DEBOUNCE_S = 0.7  # clients send a query per keystroke; only one that stays unchanged this long is generated
DEADLINE_S = 8.0  # Telegram drops an inline answer after about 10 s: answer within this, or not at all
CANDIDATES = 3  # results offered, unless the query sets n


class InlineAnswers:
    def __init__(self, debounce_s: float = DEBOUNCE_S, capacity: int = 512):
        self.debounce_s = debounce_s
        self.capacity = capacity
        self._latest: dict[str, object] = {}
        self._cache: OrderedDict[str, Generation] = OrderedDict()

    async def settled(self, user: str) -> bool:
        """Wait out the debounce; False when a newer query from `user` came meanwhile (this one is dropped)."""
        mine = object()
        self._latest[user] = mine
        await asyncio.sleep(self.debounce_s)
        if self._latest.get(user) is not mine:
            return False
        del self._latest[user]
        return True

    @staticmethod
    def key(query: str) -> str:
        return " ".join(query.split())

    def cached(self, query: str) -> Generation | None:
        found = self._cache.get(self.key(query))
        if found is not None:
            self._cache.move_to_end(self.key(query))
        return found

    def remember(self, query: str, gen: Generation) -> None:
        self._cache[self.key(query)] = gen
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)


def candidates(gen: Generation) -> list[Generation]:
    """One Generation per candidate (each its own message: prompt, continuation, its seed and confidence)."""
    return [replace(gen, continuations=(text,), seeds=(seed,),
                    confidence=None if gen.confidence is None else (gen.confidence[i],))
            for i, (text, seed) in enumerate(zip(gen.continuations, gen.seeds, strict=True))]
