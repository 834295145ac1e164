"""Server-side state behind "regenerate" and "continue" buttons (platform callback data is tiny)."""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import replace

from core.engine import Engine
from core.types import Generation
from core.errors import UserError
from core.grammar import GenRequest

EXPIRED = "이 버튼은 만료되었습니다. /gen 으로 새로 생성해 주세요. (this button has expired)"


class FollowUps:
    """Remembers the last `capacity` results under short random keys (8 characters)."""

    def __init__(self, engine: Engine, capacity: int = 5000):
        self.engine = engine
        self.capacity = capacity
        self._results: OrderedDict[str, Generation] = OrderedDict()

    def remember(self, gen: Generation) -> str:
        key = secrets.token_urlsafe(6)
        self._results[key] = gen
        while len(self._results) > self.capacity:
            self._results.popitem(last=False)
        return key

    def _get(self, key: str) -> Generation:
        gen = self._results.get(key)
        if gen is None:
            raise UserError(EXPIRED)
        return gen

    def regenerate(self, key: str) -> GenRequest:
        """The same request and knobs with a fresh random seed."""
        gen = self._get(key)
        return replace(gen.request, knobs=replace(gen.request.knobs, seed=None))

    def continuation(self, key: str, candidate: int = 0) -> GenRequest:
        """Extend candidate `candidate` by as many tokens as the original request was allowed to add."""
        gen = self._get(key)
        if not 0 <= candidate < len(gen.continuations):
            raise UserError(EXPIRED)
        old = gen.request
        text = gen.texts()[candidate]
        used = len(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])
        budget = old.knobs.max_length - len(self.engine.tokenizer(old.model_prompt, add_special_tokens=False)["input_ids"])
        cap = self.engine.limits.max_length
        if used >= cap:
            raise UserError(
                f"최대 길이({cap}토큰)에 도달해 더 이어 쓸 수 없습니다. (reached the {cap}-token limit)"
            )
        knobs = replace(old.knobs, seed=None, n=1, min_length=min(used + 1, cap), max_length=min(cap, used + max(1, budget)))
        # The text already carries the label, so it goes to the model as written.
        return GenRequest(label=None, prompt=text, knobs=knobs, origin=old.origin)
