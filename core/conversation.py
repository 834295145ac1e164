"""One generation from a user's request to the final reply, the same for every front end.

Four doors lead in, each with the same checks in the same order (allowlist, parse, prompt length, rate limit,
daily quota; every refusal counted): `from_text` (`/gen …`, `!gen …`, inline queries), `from_fields` (Discord slash
options, `/api` JSON), `from_button` (regenerate, continue, stop) and `from_reply` (a reply to one of the bot's
results continues it). Each returns a PreparedRequest or raises a UserError; `reply` then streams it
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
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from core import admin
from core.access import REFUSAL, Access, StoredAccess, Verdict
from core.errors import ClientLeft, NotAllowed, QuotaExceeded, RateLimited, ShuttingDown, UserError
from core.followups import parse_button, reply_continuation
from core.grammar import check_best_of, normalise_label, parse_gen, request_from_text
from core.knobs import knob_specs, resolve_key, validate_knobs
from core.models import take_model
from core.replies import APOLOGY, render_generation
from core.types import Generation, GenRequest, PreparedRequest

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
    """One state of the reply: rendered `text`; the Generation behind it; buttons on the final result; while it
    streams, the key of its stop button (core.followups.stop_data); `stopped` when the asker stopped it."""

    text: str
    generation: Generation | None = None
    buttons: Buttons | None = None
    error: bool = False
    stop: str | None = None
    stopped: bool = False

    @property
    def final(self) -> bool:
        return self.error or self.stopped or (self.generation is not None and self.generation.done)


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
    def __init__(self, core: BotCore, access: Access | StoredAccess | None = None, admins: frozenset[str] = frozenset(),
                 clock: Callable[[], float] = time.monotonic):
        self.core = core
        self.backend = core.engine
        self.access = access or Access({})
        self.admins = admins  # user keys ("telegram:123")
        self.clock = clock  # the edit throttle's and the logged latency's (tests pass a fake one)

    def is_admin(self, who: Who) -> bool:
        return who.user is not None and who.user in self.admins

    def backend_of(self, request: GenRequest) -> object:
        """The backend of the request's model (`backend` is the default model's: limits, defaults, metrics)."""
        return self.core.served.get(request.model)

    def _model(self, who: Who, name: str | None) -> str:
        """`model=` if given (it must be served), else the chat's /model choice."""
        return self.core.served.check(name) if name else self.core.chat_model(who.chat)

    # ---- the doors ---------------------------------------------------------------------------------------------
    def check_access(self, who: Who) -> None:
        """The allowlist (admins always pass); adapters call it for every command, the doors call it first."""
        if self.is_admin(who):
            return
        verdict = self.access.check(**who.ids)
        if verdict is not Verdict.ALLOW:
            self._refused(who, "not_allowed")
            raise NotAllowed(REFUSAL, quiet=verdict is Verdict.IGNORE)

    def from_text(self, args: str, who: Who, candidates: int | None = None) -> PreparedRequest:
        """`/gen` arguments (the text after the command), with the chat's saved defaults. `candidates`: this door's
        default n (inline mode offers several), within the limits, unless the text sets n."""
        self.check_access(who)
        defaults = self.core.chat_knobs(who.chat)
        if candidates is not None:
            limits = self.backend.limits
            rows = max(1, limits.max_rows_per_request // max(1, defaults.best_of))
            defaults = replace(defaults, n=max(1, min(candidates, limits.max_candidates, rows)))

        def parse() -> GenRequest:
            text, name = take_model(args)
            return replace(parse_gen(text, defaults, self.backend.limits), model=self._model(who, name))

        return self._admit(who, parse)

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
            name = values.pop("model", None)
            if name is not None and not isinstance(name, str):
                raise UserError('"model"에는 모델 이름(문자열)을 넣어 주세요. ("model" must be a model name)')
            if not isinstance(prompt, str):
                raise UserError('"prompt"에 문자열을 넣어 주세요. 예: {"prompt": "긍정 아 정말"} ("prompt" must be a string)')
            defaults = self.core.chat_knobs(who.chat) if base == "chat" else self.backend.defaults
            if base == "tutorial":  # the tutorial's API samples once unless asked: best_of is the chats' default
                defaults = replace(defaults, best_of=1)
            knobs = validate_knobs(values, defaults, self.backend.limits)
            request = request_from_text(prompt, knobs, self.backend.limits, label=_label(label))
            specs = knob_specs(self.backend.limits)
            check_best_of(request, {resolve_key(k, specs) for k, v in values.items() if v not in (None, "")})
            return replace(request, model=self._model(who, name))

        return self._admit(who, parse)

    def from_button(self, data: str, who: Who) -> PreparedRequest | None:
        """Callback data of a button (`r:<key>`, `c:<key>:<i>`, `s:<key>`), strictly parsed. A stop button stops
        its reply (only for its asker) and returns None: nothing new to generate."""
        self.check_access(who)
        followups = self.core.followups
        try:
            press = parse_button(data)
            if press.stop:
                self.core.stops.stop(press.key, who.user)
                return None
            if press.candidate is None:
                request = replace(followups.regenerate(press.key), origin=who.chat)
                prepared = self.backend_of(request).prepare(request)
            else:
                backend = self.core.served.get(followups.model_of(press.key))
                prepared = followups.continuation(press.key, press.candidate, backend.prepare,
                                                  self.backend.limits.max_length)
        except UserError:
            self._refused(who, "user_error")
            raise
        self._charge(who)
        return replace(prepared, request=replace(prepared.request, user=who.share))  # a continuation's, too

    def from_reply(self, shown: str, args: str, who: Who) -> PreparedRequest:
        """A reply to one of the bot's results: `shown` is the replied message's plain text, `args` what the user
        added (words and knobs; the chat's saved defaults apply)."""
        self.check_access(who)
        try:
            text, name = take_model(args)
            model = self._model(who, name)
            prepared = reply_continuation(shown, text, self.core.chat_knobs(who.chat), self.backend.limits,
                                          self.core.served.get(model).prepare)
            prepared = replace(prepared, request=replace(prepared.request, origin=who.chat, model=model, user=who.share))
        except UserError:
            self._refused(who, "user_error")
            raise
        self._charge(who)
        return prepared

    def _admit(self, who: Who, parse: Callable[[], object]) -> PreparedRequest:
        try:
            # The origin tells metrics and logs the front end; the user, whose fair share of the engine it uses.
            request = replace(parse(), origin=who.chat, user=who.share)
            prepared = self.backend_of(request).prepare(request)
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
            self._log(who, "admitted")
            return
        try:
            self.core.limiter.check(who.user)
        except RateLimited:
            self._refused(who, "rate_limited")
            raise
        quota = self.core.settings.limits.daily_requests_per_user
        if quota and self.core.store.admitted_on(admin.today(), who.user) >= quota:
            self._refused(who, "quota")
            raise QuotaExceeded(admin.quota_text(quota))
        self._log(who, "admitted")

    def _refused(self, who: Who, outcome: str) -> None:
        self.backend.telemetry.refused(who.chat, outcome)
        self._log(who, outcome)

    def _log(self, who: Who, outcome: str, seconds: float | None = None) -> None:
        """The store's request log, behind quotas and /stats (it survives restarts, unlike the metrics)."""
        self.core.store.log_request(admin.today(), who.chat.partition(":")[0], who.user, outcome, seconds)

    # ---- admins: the allowlists at run time, and the request log -----------------------------------------------
    def _admin_only(self, who: Who) -> None:
        if not self.is_admin(who):
            self._refused(who, "not_allowed")
            raise NotAllowed(admin.NOT_ADMIN)

    def _require_admin(self, who: Who) -> StoredAccess:
        self._admin_only(who)
        if not isinstance(self.access, StoredAccess):
            raise UserError("이 봇의 허용 목록은 설정 파일로만 바꿀 수 있습니다. (allowlists come from the settings here)")
        return self.access

    def manage_access(self, who: Who, args: str, allowed: bool | None) -> str:
        """/allow (True), /deny (False), /allowed (None): the answer. Without an argument, this chat is the target."""
        access = self._require_admin(who)
        if allowed is not None:
            kind, id_ = admin.parse_target(args, access.kinds, who.ids)
            access.set(kind, id_, allowed)
        return admin.render_access(access.entries(), access.kinds)

    def choose_model(self, who: Who, args: str, command: str = "/model") -> str:
        """`/model`: the models, this chat's marked; `/model <name>`: switch this chat's (admins only when admins
        are configured)."""
        name = args.strip()
        if name:
            if self.admins:
                self._admin_only(who)
            try:
                self.core.set_chat_model(who.chat, name)
            except UserError:
                self._refused(who, "user_error")
                raise
        current = self.core.chat_model(who.chat)
        return (f"모델 (models; ▶ 이 채팅):\n{self.core.served.describe(current)}\n\n"
                f"바꾸기: {command} 이름 · 한 요청만: model=이름 (switch: {command} name; once: model=name)")

    def stats(self, who: Who) -> str:
        self._require_admin(who)
        return admin.render_stats(self.core.store.request_rows(admin.since()))

    # ---- the one streamed-reply loop ---------------------------------------------------------------------------
    async def reply(self, target: ReplyTarget, prepared: PreparedRequest, what: str = "/gen",
                    asker: str | None = None) -> Generation | None:
        """Stream `prepared` into one reply on `target`: partial edits at most every `target.edit_interval` (when
        the chat can spare them) with a stop button for `asker` (None: whoever was sent the key), then the result
        with its buttons; any error becomes the reply instead. Stopped, the text so far is the result, marked so."""
        shown = _Shown(target)
        typing = asyncio.create_task(_keep_typing(target))
        stream = self.backend_of(prepared.request).stream(prepared)
        stop_key, stop = self.core.stops.open(asker)
        started = self.clock()
        next_at = started + target.edit_interval
        last: Generation | None = None
        try:
            while True:
                gen = await _next_unless(stream, stop)
                if gen is None:
                    break
                if gen.done:
                    typing.cancel()  # no "typing…" after the answer is there
                    key = self.core.followups.remember(gen, len(prepared.prompt_ids))
                    await shown.show(Reply(self.render(gen, target.style), gen, Buttons(key, len(gen.continuations))))
                    self._log(Who(prepared.request.origin or "internal", asker), "ok", self.clock() - started)
                    return gen
                last = gen
                if self.clock() >= next_at and target.spare():
                    await shown.show(Reply(self.render(gen, target.style), gen, stop=stop_key))
                    next_at = self.clock() + target.edit_interval
            if stop.is_set() and last is not None:  # stopped: the backend's stream is closed below
                typing.cancel()
                await shown.show(Reply(self.render(last, target.style, stopped=True), last, stopped=True))
                return last
            # A backend's stream ends with a finished state or an error; a reply left with a cursor forever is not ok.
            raise RuntimeError("the generation stream ended without a result")
        except Exception as exc:  # noqa: BLE001 (every failure becomes a reply; unexpected ones are logged)
            typing.cancel()
            text = error_text(exc, what)
            if text is not None:
                with contextlib.suppress(Exception):
                    await shown.show(Reply(target.style.notice(text), error=True))
            return None
        finally:
            self.core.stops.close(stop_key)
            typing.cancel()
            await stream.aclose()  # stops the backend's work if we left early: its rows go at the next step

    @staticmethod
    def render(gen: Generation, style: Style, stopped: bool = False) -> str:
        return render_generation(gen, style.limit, escape=style.escape, emphasize=style.emphasize, stopped=stopped)


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


async def _next_unless(stream: AsyncIterator[Generation], stop: asyncio.Event) -> Generation | None:
    """The stream's next state, or None when it ended or `stop` was set first (then the pending read is cancelled,
    which closes the stream as leaving it early does)."""
    if stop.is_set():
        return None
    step = asyncio.ensure_future(anext(stream, None))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({step, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not step.done():
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await step
    return step.result() if not step.cancelled() else None


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
