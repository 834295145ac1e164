"""Follow-ups of a result: the server-side state behind "regenerate" and "continue" buttons (platform callback data
is tiny), and a reply to a result, which needs no state (the text comes from the replied message)."""

from __future__ import annotations

import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from core.errors import UserError
from core.grammar import check_best_of, check_prompt, extract_knobs, normalise_label, reject_broken_text
from core.knobs import Knobs, knob_specs, resolve_key, validate_knobs
from core.replies import parse_result
from core.types import Generation, GenRequest, PreparedRequest

if TYPE_CHECKING:
    from core.settings import LimitsSettings

EXPIRED = "이 버튼은 만료되었습니다. /gen 으로 새로 생성해 주세요. (this button has expired)"
NOT_A_RESULT = ("답장한 메시지는 이어 쓸 수 있는 생성 결과가 아닙니다 (끝에 seed= 줄이 있는 완성된 결과에 답장해 주세요). "
                "(the replied message is not a finished result to continue)")
KEY_CHARS = 8  # secrets.token_urlsafe(6)
# `r:<key>` regenerate, `c:<key>:<candidate>` continue, `s:<key>` stop a reply being streamed: ASCII only, nothing
# else (callback data can be forged).
_DATA_RE = re.compile(r"([rs]):([A-Za-z0-9_-]{8})|(c):([A-Za-z0-9_-]{8}):([0-9]{1,2})", re.ASCII)


@dataclass(frozen=True)
class Press:
    """A parsed button: which result (or reply being streamed), and what to do with it."""

    key: str
    candidate: int | None  # None: regenerate (or stop); a number: continue that candidate
    stop: bool = False


def button_data(key: str, candidate: int | None = None) -> str:
    return f"r:{key}" if candidate is None else f"c:{key}:{candidate}"


def stop_data(key: str) -> str:
    return f"s:{key}"


def parse_button(data: str) -> Press:
    """Strictly parse callback data; anything malformed or forged is an expired button, never an exception."""
    match = _DATA_RE.fullmatch(data or "")
    if not match:
        raise UserError(EXPIRED)
    if match.group(1):
        return Press(match.group(2), None, stop=match.group(1) == "s")
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

    def model_of(self, key: str) -> str:
        return self._get(key).generation.request.model

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
        # the model sees exactly the text shown.
        written = gen.continuations[candidate]
        prompt = old.prompt + written if old.prompt else written.lstrip()
        draft = GenRequest(label=old.label, prompt=prompt, knobs=old.knobs, origin=old.origin, model=old.model)
        prepared = prepare(_with_room(draft, cap), continuing=True)
        used = len(prepared.prompt_ids)
        if used >= cap:
            raise reached_limit(cap)
        budget = old.knobs.max_length - found.prompt_tokens
        knobs = replace(old.knobs, seed=None, n=1, min_length=min(used + 1, cap), max_length=min(cap, used + max(1, budget)))
        return replace(prepared, request=replace(draft, knobs=knobs))


def _with_room(draft: GenRequest, cap: int) -> GenRequest:
    """`draft` with a max_length above any token count its text can have (a token covers at least one byte), so it
    is tokenized whatever its length and the caller's "reached the limit" check is the one a user sees."""
    return replace(draft, knobs=replace(draft.knobs, max_length=max(cap, len(draft.model_prompt.encode("utf-8"))) + 1))


def reached_limit(cap: int) -> UserError:
    return UserError(f"최대 길이({cap}토큰)에 도달해 더 이어 쓸 수 없습니다. (reached the {cap}-token limit)")


def reply_continuation(shown: str, args: str, defaults: Knobs, limits: LimitsSettings,
                       prepare: Callable[..., PreparedRequest]) -> PreparedRequest:
    """A reply to one of the bot's results: its text (read back from the message, so it works after a restart) is
    the prompt, its label stays the label, and `args` adds words and `key=value` knobs on top of `defaults`.

    A label word first in `args` switches the label. Without `max_length=` the continuation may add as many tokens
    as `defaults.max_length` (up to `limits.max_length` in all); with it, max_length counts the whole text as in
    /gen. At least one new token is written."""
    result = parse_result(shown)
    if result is None:
        raise UserError(NOT_A_RESULT)
    reject_broken_text(args)
    prose, raw = extract_knobs(args, limits)
    knobs = validate_knobs(raw, defaults, limits)
    specs = knob_specs(limits)
    given = {resolve_key(key, specs) for key, _ in raw}
    label = result.label
    words = prose.split(maxsplit=1)
    if words and normalise_label(words[0]):
        label, prose = normalise_label(words[0]), words[1] if len(words) > 1 else ""
    added = check_prompt(prose, limits)
    text = " ".join(part for part in (result.text, added) if part)
    cap = limits.max_length
    draft = GenRequest(label=label, prompt=text, knobs=knobs)
    check_best_of(draft, given)
    used = len(prepare(_with_room(draft, cap), continuing=True).prompt_ids)
    if used >= cap:
        raise reached_limit(cap)
    max_length = knobs.max_length if "max_length" in given else min(cap, used + knobs.max_length)
    min_length = knobs.min_length if "min_length" in given else min(used + 1, max_length)
    return prepare(replace(draft, knobs=replace(knobs, max_length=max_length, min_length=min_length)), continuing=True)
