"""Server-side state behind "regenerate" and "continue" buttons (platform callback data is tiny)."""

from __future__ import annotations

import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from core.errors import UserError
from core.types import Generation, GenRequest, PreparedRequest

EXPIRED = "이 버튼은 만료되었습니다. /gen 으로 새로 생성해 주세요. (this button has expired)"
KEY_CHARS = 8  # secrets.token_urlsafe(6)
# `r:<key>` regenerate, `c:<key>:<candidate>` continue: ASCII only, nothing else (callback data can be forged).
_DATA_RE = re.compile(r"(r):([A-Za-z0-9_-]{8})|(c):([A-Za-z0-9_-]{8}):([0-9]{1,2})", re.ASCII)


@dataclass(frozen=True)
class Press:
    """A parsed button: which result, and what to do with it."""

    key: str
    candidate: int | None  # None: regenerate; a number: continue that candidate


def button_data(key: str, candidate: int | None = None) -> str:
    return f"r:{key}" if candidate is None else f"c:{key}:{candidate}"


def parse_button(data: str) -> Press:
    """Strictly parse callback data; anything malformed or forged is an expired button, never an exception."""
    match = _DATA_RE.fullmatch(data or "")
    if not match:
        raise UserError(EXPIRED)
    if match.group(1):
        return Press(match.group(2), None)
    return Press(match.group(4), int(match.group(5)))


@dataclass(frozen=True)
class _Remembered:
    generation: Generation
    prompt_tokens: int


class FollowUps:
    """Remembers the last `capacity` results under short random keys (8 characters)."""

    def __init__(self, capacity: int = 5000):
        self.capacity = capacity
        self._results: OrderedDict[str, _Remembered] = OrderedDict()

    def remember(self, gen: Generation, prompt_tokens: int) -> str:
        key = secrets.token_urlsafe(6)
        self._results[key] = _Remembered(gen, prompt_tokens)
        while len(self._results) > self.capacity:
            self._results.popitem(last=False)
        return key

    def _get(self, key: str) -> _Remembered:
        found = self._results.get(key)
        if found is None:
            raise UserError(EXPIRED)
        return found

    def regenerate(self, key: str) -> GenRequest:
        """The same request and knobs with a fresh random seed."""
        request = self._get(key).generation.request
        return replace(request, knobs=replace(request.knobs, seed=None))

    def continuation(self, key: str, candidate: int, prepare: Callable[..., PreparedRequest], cap: int) -> PreparedRequest:
        """Extend candidate `candidate` by as many tokens as the original request was allowed to add.

        `prepare` is the backend's (tokenizes once); `cap` is `limits.max_length`."""
        found = self._get(key)
        gen = found.generation
        if not 0 <= candidate < len(gen.continuations):
            raise UserError(EXPIRED)
        old = gen.request
        # The label stays the label (so best_of still reranks toward it) and the text so far becomes the prompt:
        # the model sees exactly the text shown. Tokenized with room for every token it could have (a token covers
        # at least one byte), so the "reached the limit" message below is the one a user sees.
        written = gen.continuations[candidate]
        prompt = old.prompt + written if old.prompt else written.lstrip()
        draft = GenRequest(label=old.label, prompt=prompt, knobs=old.knobs, origin=old.origin)
        room = max(cap, len(draft.model_prompt.encode("utf-8"))) + 1
        draft = replace(draft, knobs=replace(old.knobs, max_length=room))
        prepared = prepare(draft, continuing=True)
        used = len(prepared.prompt_ids)
        if used >= cap:
            raise UserError(f"최대 길이({cap}토큰)에 도달해 더 이어 쓸 수 없습니다. (reached the {cap}-token limit)")
        budget = old.knobs.max_length - found.prompt_tokens
        knobs = replace(old.knobs, seed=None, n=1, min_length=min(used + 1, cap), max_length=min(cap, used + max(1, budget)))
        return replace(prepared, request=replace(draft, knobs=knobs))
