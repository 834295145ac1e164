"""One generation from a user's request to the final reply, the same for every front end.

Three doors lead in, each with the same checks in the same order (allowlist, parse, prompt length, rate limit;
every refusal counted): `from_text` (`/gen …`, `!gen …`), `from_fields` (Discord slash options, `/api` JSON) and
`from_button` (regenerate, continue). Each returns a PreparedRequest or raises a UserError; `reply` then streams it
to a ReplyTarget — the small protocol an adapter implements — throttled, rendered, with follow-up buttons, and with
every error turned into a reply. The conversation depends only on the generation-backend interface
(`prepare`, `stream`, `defaults`, `limits`, `telemetry`), never on a platform or on torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from core.access import REFUSAL, Access, Verdict
from core.errors import ClientLeft, NotAllowed, RateLimited, ShuttingDown, UserError
from core.followups import parse_button
from core.grammar import check_best_of, normalise_label, parse_gen, request_from_text
from core.knobs import knob_specs, resolve_key, validate_knobs
from core.replies import APOLOGY, render_generation
from core.types import Generation, PreparedRequest

if TYPE_CHECKING:
    from core.service import BotCore

log = logging.getLogger(__name__)

TYPING_REFRESH_S = 4.5  # chat platforms show "typing…" for about 5 s


def _plain(text: str) -> str:
    return text


# ---- what an adapter provides ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Who:
    """Where a request came from: chat and user keys ("telegram:123") and the ids the allowlist looks at."""

    chat: str
    user: str | None = None  # None: no per-user rate limit (the web API)
    ids: Mapping[str, int | None] = field(default_factory=dict)
    client: str | None = None  # whose share of the engine it uses when not `user` (the web: "web:<address>")

    @property
    def share(self) -> str:
        """The key the engine shares its rows fairly by: the client, else the user, else the chat."""
        return self.client or self.user or self.chat


@dataclass(frozen=True)
class Style:
    """How a platform shows text: its message length, escaping and emphasis (for the prompt)."""

    limit: int
    escape: Callable[[str], str] = _plain
    emphasize: Callable[[str], str] = _plain
    notice: Callable[[str], str] = _plain  # a whole plain-text message (errors): clipped, escaped if need be


@dataclass(frozen=True)
class Buttons:
    """Follow-up buttons under a final result: regenerate, and continue each of `candidates`."""

    key: str
    candidates: int


@dataclass(frozen=True)
class Reply:
    """One state of the reply: rendered `text`; the Generation behind it; buttons on the final result."""

    text: str
    generation: Generation | None = None
    buttons: Buttons | None = None
    error: bool = False

    @property
    def final(self) -> bool:
        return self.error or (self.generation is not None and self.generation.done)


class ReplyTarget(Protocol):
    """Where one generation is shown. `send` makes the reply, `edit` changes it; `typing` shows activity;
    `spare` says whether the chat can afford the non-essential calls (typing, partial edits) right now."""

    style: Style
    edit_interval: float

    async def send(self, reply: Reply) -> None: ...

    async def edit(self, reply: Reply) -> None: ...

    async def typing(self) -> None: ...

    def spare(self) -> bool: ...


# ---- errors ---------------------------------------------------------------------------------------------------
def request_id() -> str:
    return secrets.token_hex(4)


def error_text(exc: BaseException, where: str) -> str | None:
    """The reply for `exc`, or None when the user is to hear nothing (already told, or ignored on purpose).

    Unexpected exceptions are logged with a short request id, which the apology repeats, so a user's report can be
    found in the log."""
    if isinstance(exc, (RateLimited, NotAllowed)) and exc.quiet or isinstance(exc, ClientLeft):
        return None
    if isinstance(exc, UserError):
        return str(exc)
    rid = request_id()
    log.error("%s failed [request %s]", where, rid, exc_info=exc)
    return f"{APOLOGY} [요청 ID {rid}]"


# ---- the conversation -----------------------------------------------------------------------------------------
class Conversation:
    def __init__(self, core: BotCore, access: Access | None = None):
        self.core = core
        self.backend = core.engine
        self.access = access or Access({})

    # ---- the doors ---------------------------------------------------------------------------------------------
    def check_access(self, who: Who) -> None:
        """The allowlist; adapters call it for every command, the doors call it first."""
        verdict = self.access.check(**who.ids)
        if verdict is not Verdict.ALLOW:
            self._refused(who, "not_allowed")
            raise NotAllowed(REFUSAL, quiet=verdict is Verdict.IGNORE)

    def from_text(self, args: str, who: Who) -> PreparedRequest:
        """`/gen` arguments (the text after the command), with the chat's saved defaults."""
        self.check_access(who)
        return self._admit(who, lambda: parse_gen(args, self.core.chat_knobs(who.chat), self.backend.limits))

    def from_fields(self, fields: Mapping[str, object], who: Who, base: str = "chat") -> PreparedRequest:
        """Typed fields: `prompt` (text, taken literally; a leading label word counts as the label when `label` is
        not given), `label` ("긍정"/"부정"/aliases, or empty), and knobs by name or alias (None or "" = default).
        `base`: "chat" starts from the chat's saved defaults, "server" from the server's (the web page), "tutorial"
        from the server's with best_of 1 (POST /api, which keeps the tutorial's one-sample behaviour)."""
        self.check_access(who)

        def parse():  # noqa: ANN202
            values = dict(fields)
            prompt = values.pop("prompt", None)
            label = values.pop("label", None)
            if not isinstance(prompt, str):
                raise UserError('"prompt"에 문자열을 넣어 주세요. 예: {"prompt": "긍정 아 정말"} ("prompt" must be a string)')
            defaults = self.core.chat_knobs(who.chat) if base == "chat" else self.backend.defaults
            if base == "tutorial":  # the tutorial's API samples once unless asked: best_of is the chats' default
                defaults = replace(defaults, best_of=1)
            knobs = validate_knobs(values, defaults, self.backend.limits)
            request = request_from_text(prompt, knobs, self.backend.limits, label=_label(label))
            specs = knob_specs(self.backend.limits)
            check_best_of(request, {resolve_key(k, specs) for k, v in values.items() if v not in (None, "")})
            return request

        return self._admit(who, parse)

    def from_button(self, data: str, who: Who) -> PreparedRequest:
        """Callback data of a follow-up button (`r:<key>`, `c:<key>:<i>`), strictly parsed."""
        self.check_access(who)
        followups = self.core.followups
        try:
            press = parse_button(data)
            if press.candidate is None:
                prepared = self.backend.prepare(replace(followups.regenerate(press.key), origin=who.chat, user=who.share))
            else:
                prepared = followups.continuation(press.key, press.candidate, self.backend.prepare,
                                                  self.backend.limits.max_length)
        except UserError:
            self._refused(who, "user_error")
            raise
        self._charge(who)
        return replace(prepared, request=replace(prepared.request, user=who.share))  # a continuation's, too

    def _admit(self, who: Who, parse: Callable[[], object]) -> PreparedRequest:
        try:
            # The origin tells metrics and logs the front end; the user, whose fair share of the engine it uses.
            request = replace(parse(), origin=who.chat, user=who.share)
            prepared = self.backend.prepare(request)
        except UserError:
            self._refused(who, "user_error")
            raise
        self._charge(who)
        return prepared

    def _charge(self, who: Who) -> None:
        if self.core.draining.is_set():
            self._refused(who, "shutdown")
            raise ShuttingDown("봇이 다시 시작하는 중입니다. 잠시 후 다시 시도해 주세요. (the bot is restarting)")
        if who.user is None:
            return
        try:
            self.core.limiter.check(who.user)
        except RateLimited:
            self._refused(who, "rate_limited")
            raise

    def _refused(self, who: Who, outcome: str) -> None:
        self.backend.telemetry.refused(who.chat, outcome)

    # ---- the one streamed-reply loop ---------------------------------------------------------------------------
    async def reply(self, target: ReplyTarget, prepared: PreparedRequest, what: str = "/gen") -> Generation | None:
        """Stream `prepared` into one reply on `target`: partial edits at most every `target.edit_interval` (when
        the chat can spare them), then the result with its buttons; any error becomes the reply instead."""
        shown = _Shown(target)
        typing = asyncio.create_task(_keep_typing(target))
        stream = self.backend.stream(prepared)
        next_at = time.monotonic() + target.edit_interval
        try:
            async for gen in stream:
                if gen.done:
                    typing.cancel()  # no "typing…" after the answer is there
                    key = self.core.followups.remember(gen, len(prepared.prompt_ids))
                    await shown.show(Reply(self.render(gen, target.style), gen, Buttons(key, len(gen.continuations))))
                    return gen
                if time.monotonic() >= next_at and target.spare():
                    await shown.show(Reply(self.render(gen, target.style), gen))
                    next_at = time.monotonic() + target.edit_interval
        except Exception as exc:  # noqa: BLE001 (every failure becomes a reply; unexpected ones are logged)
            text = error_text(exc, what)
            if text is not None:
                with contextlib.suppress(Exception):
                    await shown.show(Reply(target.style.notice(text), error=True))
            return None
        finally:
            typing.cancel()
            await stream.aclose()  # stops the backend's work if we left early
        return None

    @staticmethod
    def render(gen: Generation, style: Style) -> str:
        return render_generation(gen, style.limit, escape=style.escape, emphasize=style.emphasize)


class _Shown:
    """The reply's message: sent the first time, edited afterwards."""

    def __init__(self, target: ReplyTarget):
        self.target = target
        self.sent = False

    async def show(self, reply: Reply) -> None:
        if self.sent:
            await self.target.edit(reply)
        else:
            await self.target.send(reply)
            self.sent = True


async def _keep_typing(target: ReplyTarget) -> None:
    while True:
        if target.spare():
            with contextlib.suppress(Exception):  # "typing…" is a nicety
                await target.typing()
        await asyncio.sleep(TYPING_REFRESH_S)


def _label(value: object) -> str | None:
    if value is None or value == "":
        return None
    label = normalise_label(value) if isinstance(value, str) else None
    if label is None:
        raise UserError('"label"은 "긍정" 또는 "부정"이어야 합니다. ("label" must be 긍정 or 부정)')
    return label
