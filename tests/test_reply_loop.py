"""Conversation unit tests: the reply loop and the three doors over a scripted backend, a collecting reply target
and a fake clock (no model, no network, no sleeping: the whole file runs in well under a second)."""

from __future__ import annotations

import asyncio
import json

import pytest
from fake_backend import Collecting as Target
from fake_backend import FakeBackend, FakeClock, fake_core

from core import admin
from core.access import REFUSAL, Access, StoredAccess
from core.conversation import Buttons, Conversation, Who, error_text
from core.errors import NotAllowed, QuotaExceeded, RateLimited, ShuttingDown, UserError
from core.followups import EXPIRED, NOT_A_RESULT, button_data, stop_data
from core.models import Models
from core.replies import APOLOGY
from core.settings import Settings, load_settings
from core.types import GenRequest

STEPS = 10  # the fake backend writes ten words, one a step, 0.25 s of fake time each


_LOADED: dict[str, Settings] = {}


def shipped(**sections: dict) -> Settings:
    """The shipped settings.toml with `sections` overriding it: read once per variant, a private copy each time."""
    key = json.dumps(sections, sort_keys=True)
    if key not in _LOADED:
        _LOADED[key] = load_settings(store={"path": ":memory:"}, **sections)
    return _LOADED[key].model_copy(deep=True)


def make(clock: FakeClock | None = None, access: Access | None = None, **sections: dict):
    """A conversation over the shipped settings.toml (best_of 4 included), `sections` overriding it."""
    clock = clock or FakeClock()
    core = fake_core(shipped(**sections), clock)
    return Conversation(core, access or Access({"chat": [], "user": []}), clock=clock), core, clock


async def bounded(awaitable):
    """`awaitable`, or a failure if it is still pending after 10 s: a broken stop fails by name, not as a hang."""
    return await asyncio.wait_for(awaitable, 10)


def counted(core, outcome: str, frontend: str = "telegram") -> float:
    return core.engine.telemetry.metrics.requests.labels(frontend, outcome)._value.get()


WHO = Who("telegram:1", "telegram:7", {"chat": 1, "user": 7})


# ---- the reply loop -------------------------------------------------------------------------------------------
async def test_first_state_is_sent_then_edits_at_most_once_per_interval_then_the_result():
    talk, core, clock = make()
    target = Target(edit_interval=1.0)
    gen = await talk.reply(target, talk.from_text("긍정 아 정말", WHO))
    # Steps land at 0.25 s, 0.5 s, … 2.5 s: the first due at 1.0 s (step 4), the throttle re-armed to 2.0 s (step 8).
    assert target.shown() == [("send", 4), ("edit", 8), ("edit", STEPS)]
    assert gen is target.calls[-1][1].generation and gen.done
    assert core.engine.closed == 1


async def test_a_partial_the_chat_cannot_spare_is_skipped_and_does_not_rearm_the_throttle():
    clock = FakeClock()
    talk, core, _ = make(clock)
    target = Target(edit_interval=1.0, spare=lambda: clock.now >= 1.25)
    await talk.reply(target, talk.from_text("긍정 아 정말", WHO))
    assert target.shown() == [("send", 5), ("edit", 9), ("edit", STEPS)]  # due from 1.0 s, spared at 1.25 s, 2.25 s
    assert target.typed == 0  # "typing…" only when the chat can spare it


async def test_a_busy_chat_gets_only_the_result_and_an_idle_one_typing():
    talk, _, _ = make()
    busy, idle = Target(spare=lambda: False), Target(edit_interval=100.0)
    await talk.reply(busy, talk.from_text("긍정 아 정말", WHO))
    await talk.reply(idle, talk.from_text("긍정 아 정말", Who("telegram:1", "telegram:8")))
    assert busy.shown() == [("send", STEPS)] and idle.shown() == [("send", STEPS)]
    assert busy.typed == 0 and idle.typed == 1


async def test_the_result_carries_its_rendering_and_buttons_that_regenerate_it():
    talk, core, _ = make()
    target = Target()
    gen = await talk.reply(target, talk.from_text("긍정 아 정말 n=2 seed=5", WHO))
    reply = target.calls[-1][1]
    assert reply.final and not reply.error and reply.text == Conversation.render(gen, target.style)
    assert reply.buttons == Buttons(reply.buttons.key, 2)
    again = core.followups.regenerate(reply.buttons.key)
    assert again.knobs.seed is None and again.knobs.n == 2 and again.prompt == "아 정말" and again.label == "긍정"
    assert all(r.buttons is None for _, r in target.calls[:-1])  # partials have none


@pytest.mark.parametrize(("error", "text"), [
    (UserError("너무 길어요 (too long)"), "<너무 길어요 (too long)>"),
    (RateLimited("기다려 (wait)"), "<기다려 (wait)>"),
])
@pytest.mark.parametrize(("fail_at", "shown"), [(1, [("send", "error")]), (6, [("send", 4), ("edit", "error")])])
async def test_an_error_becomes_the_reply_in_place_of_the_result(error, text, fail_at, shown):
    talk, core, _ = make()
    core.engine.error, core.engine.fail_at = error, fail_at
    target = Target()
    assert await talk.reply(target, talk.from_text("긍정 아 정말", WHO)) is None
    assert target.shown() == shown
    last = target.calls[-1][1]
    assert last.text == text and last.final and last.buttons is None
    assert core.engine.closed == 1


async def test_an_unexpected_error_is_an_apology_with_a_request_id_and_a_quiet_one_says_nothing(caplog):
    talk, core, _ = make()
    core.engine.error, core.engine.fail_at = RuntimeError("secret detail"), 2
    target = Target()
    await talk.reply(target, talk.from_text("긍정 아 정말", WHO))
    text = target.calls[-1][1].text
    assert text.startswith(f"<{APOLOGY} [요청 ID ") and "secret detail" not in text
    assert text[-10:-2] in caplog.text  # the id is in the log line
    core.engine.error = RateLimited("기다려", quiet=True)
    quiet = Target()
    assert await talk.reply(quiet, talk.from_text("긍정 아 정말", Who("telegram:1", "telegram:8"))) is None
    assert quiet.calls == []


async def test_a_target_that_fails_to_send_ends_the_reply_quietly_and_stops_the_stream():
    talk, core, _ = make()
    target = Target()
    target.fail_send = ConnectionError("chat gone")
    assert await talk.reply(target, talk.from_text("긍정 아 정말", WHO)) is None
    assert core.engine.closed == 1


# ---- the doors: allowlist × rate limit × shutdown, the same for each ------------------------------------------
def _doors(talk: Conversation, core):
    """Each door with a valid request; the button's key is a remembered result."""
    prepared = Conversation(core).from_text("긍정 아 정말", Who("telegram:0", None))  # no allowlist
    key = core.followups.remember(core.engine.result(prepared, 3, True), len(prepared.prompt_ids))
    return {
        "text": lambda who: talk.from_text("긍정 아 정말", who),
        "fields": lambda who: talk.from_fields({"prompt": "아 정말", "label": "긍정"}, who),
        "regenerate": lambda who: talk.from_button(f"r:{key}", who),
        "continue": lambda who: talk.from_button(f"c:{key}:0", who),
        "reply": lambda who: talk.from_reply(SHOWN, "", who),
    }


DOORS = ("text", "fields", "regenerate", "continue", "reply")
SHOWN = "긍정 아 정말 하나 둘\n\nseed=100"  # a finished result as the chat shows it (a reply to it continues it)


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("refusal", ["reply", "ignore"])
def test_every_door_checks_the_allowlist_first(door, refusal):
    talk, core, _ = make(access=Access({"chat": [1], "user": []}, refusal), limits={"user_interval_s": 60})
    enter = _doors(talk, core)[door]
    prepared_before = len(core.engine.prepared)
    with pytest.raises(NotAllowed) as info:
        enter(Who("telegram:2", "telegram:9", {"chat": 2, "user": 9}))
    assert error_text(info.value, "test") == (REFUSAL if refusal == "reply" else None)
    assert len(core.engine.prepared) == prepared_before  # nothing parsed or tokenized for an outsider
    assert counted(core, "not_allowed") == 1
    enter(Who("telegram:1", "telegram:9", {"chat": 1, "user": 9}))  # the listed chat; the user was not charged


@pytest.mark.parametrize("door", ["text", "fields"])
def test_an_outsiders_bad_request_is_refused_as_an_outsider(door):
    talk, core, _ = make(access=Access({"chat": [1]}))
    outsider = Who("telegram:2", "telegram:9", {"chat": 2})
    with pytest.raises(NotAllowed):
        if door == "text":
            talk.from_text("긍정 아 정말 top_p=7", outsider)
        else:
            talk.from_fields({"prompt": "아 정말", "top_p": 7}, outsider)


@pytest.mark.parametrize("door", DOORS)
def test_every_door_is_rate_limited_and_the_notice_comes_again_after_the_window(door):
    talk, core, clock = make(limits={"user_interval_s": 10})
    enter = _doors(talk, core)[door]
    enter(WHO)
    texts = []
    for at in (1.0, 2.0, 9.5):
        clock.now = at
        with pytest.raises(RateLimited) as info:
            enter(WHO)
        texts.append(error_text(info.value, "test"))
    assert texts == ["조금만 천천히 해 주세요. 9초 후에 다시 시도해 주세요. (please wait 9 s)", None, None]
    clock.now = 10.0  # exactly one interval later: admitted
    enter(WHO)
    clock.now = 11.0
    with pytest.raises(RateLimited) as info:  # a new window: told again, once
        enter(WHO)
    assert error_text(info.value, "test") == "조금만 천천히 해 주세요. 9초 후에 다시 시도해 주세요. (please wait 9 s)"
    assert counted(core, "rate_limited") == 4
    enter(Who("telegram:1", "telegram:8"))  # another user is not affected
    enter(Who("web", None))  # no user key (the web API): no per-user limit
    enter(Who("web", None))


@pytest.mark.parametrize("door", DOORS)
def test_every_door_is_closed_while_draining(door):
    talk, core, _ = make()
    enter = _doors(talk, core)[door]
    core.draining.set()
    with pytest.raises(ShuttingDown):
        enter(WHO)
    assert counted(core, "shutdown") == 1


def test_a_refused_request_does_not_use_up_the_users_turn():
    talk, core, _ = make(limits={"user_interval_s": 60})
    for bad in ("긍정 아 정말 top_p=7", "긍정 " + "아 " * 70, "긍정 아 정말 max_length=3"):
        with pytest.raises(UserError) as info:
            talk.from_text(bad, WHO)
        assert not isinstance(info.value, RateLimited)
    with pytest.raises(UserError, match="만료"):
        talk.from_button("c:ABCDEFGH:0", WHO)
    talk.from_text("긍정 아 정말", WHO)
    assert counted(core, "user_error") == 4


# ---- best_of: asked for without a label is refused; a default without a label just doesn't apply ------------
def test_the_shipped_best_of_default_does_not_refuse_an_unlabelled_gen():
    talk, core, _ = make()
    assert core.engine.defaults.best_of == 4  # settings.toml's
    plain = talk.from_text("아 정말", WHO).request
    assert plain.label is None and plain.knobs.best_of == 4 and plain.rows == 1
    assert talk.from_fields({"prompt": "아 정말", "best_of": ""}, Who("web", None)).request.rows == 1
    assert talk.from_text("긍정 아 정말", Who("telegram:1", "telegram:8")).request.rows == 4
    core.set_chat_knobs("best_of=2 n=2", WHO.chat)  # a chat default, also without a label
    assert talk.from_text("아 정말", Who("telegram:1", "telegram:9")).request.rows == 2


@pytest.mark.parametrize("enter", [
    lambda talk: talk.from_text("아 정말 best_of=4", Who("x:1", None)),
    lambda talk: talk.from_text("아 정말 bo=2", Who("x:1", None)),
    lambda talk: talk.from_fields({"prompt": "아 정말", "best_of": 4}, Who("x:1", None)),
    lambda talk: talk.from_fields({"prompt": "아 정말", "label": "", "best": "2"}, Who("x:1", None)),
])
def test_best_of_asked_for_without_a_label_is_refused(enter):
    talk, _, _ = make()
    with pytest.raises(UserError, match="best_of는 라벨"):
        enter(talk)


def test_the_fields_door_starts_from_the_chat_the_server_or_the_tutorial():
    talk, core, _ = make()
    core.set_chat_knobs("best_of=2 top_p=0.5", "web")
    fields = {"prompt": "아 정말", "label": "긍정"}
    chat, server, tutorial = (talk.from_fields(fields, Who("web", None), base).request.knobs
                              for base in ("chat", "server", "tutorial"))
    assert (chat.best_of, chat.top_p) == (2, 0.5)
    assert (server.best_of, server.top_p) == (4, 1.0)
    assert (tutorial.best_of, tutorial.top_p) == (1, 1.0)


# ---- follow-ups ---------------------------------------------------------------------------------------------
def test_continue_gets_the_original_requests_budget_from_the_text_so_far():
    talk, core, _ = make(limits={"max_length": 16}, generation={"max_length": 16})
    first = talk.from_text("긍정 아 정말 max_length=10 top_p=0.8 seed=3 n=2", Who("telegram:1", None))
    assert len(first.prompt_ids) == 3
    gen = core.engine.result(first, 4, True)  # " 하나 둘 셋 넷"
    key = core.followups.remember(gen, len(first.prompt_ids))
    prepared = talk.from_button(f"c:{key}:1", Who("telegram:1", None))
    request = prepared.request
    assert request.prompt == "아 정말 하나 둘 셋 넷" and request.label == "긍정" and prepared.continuing
    assert len(prepared.prompt_ids) == 7
    # 7 tokens so far, plus the 7 the original could add (10 - its 3 prompt tokens); at least one new token
    assert (request.knobs.max_length, request.knobs.min_length) == (14, 8)
    assert (request.knobs.n, request.knobs.seed, request.knobs.top_p) == (1, None, 0.8)
    longer = core.followups.remember(core.engine.result(first, 9, True), 3)  # 12 tokens: capped at 16
    assert talk.from_button(f"c:{longer}:0", Who("telegram:1", None)).request.knobs.max_length == 16
    core.engine.words = (*core.engine.words, "열하나", "열둘", "열셋")
    full = core.followups.remember(core.engine.result(first, 13, True), 3)  # 16 tokens = the cap
    with pytest.raises(UserError, match=r"최대 길이\(16토큰\)에 도달해"):
        talk.from_button(f"c:{full}:0", Who("telegram:1", None))
    core.engine.words = (*core.engine.words, "열넷", "열다섯")
    past = core.followups.remember(core.engine.result(first, 15, True), 3)  # 18 tokens: past the cap, same sentence
    with pytest.raises(UserError) as info:
        talk.from_button(f"c:{past}:0", Who("telegram:1", None))
    assert str(info.value) == "최대 길이(16토큰)에 도달해 더 이어 쓸 수 없습니다. (reached the 16-token limit)"


def test_the_buttons_data_is_what_the_button_door_reads():
    talk, core, _ = make(limits={"user_interval_s": 0})
    first = talk.from_text("긍정 아 정말 n=2", WHO)
    key = core.followups.remember(core.engine.result(first, 2, True), 3)
    assert talk.from_button(button_data(key), WHO).request.prompt == "아 정말"
    assert talk.from_button(button_data(key, 1), WHO).request.prompt == "아 정말 하나 둘"
    assert max(len(button_data(key, 1)), len(stop_data(key))) <= 64  # Telegram's limit on callback data


@pytest.mark.parametrize("data", ["c:{key}:2", "c:ZZZZZZZZ:0", "r:{key}x", "x:{key}", "", "c:{key}:-1"])
def test_a_stale_or_forged_button_is_an_expired_button(data):
    talk, core, _ = make()
    first = talk.from_text("긍정 아 정말 n=2", Who("telegram:1", None))
    key = core.followups.remember(core.engine.result(first, 2, True), 3)
    with pytest.raises(UserError) as info:
        talk.from_button(data.format(key=key), Who("telegram:1", None))
    assert str(info.value) == EXPIRED


def test_regenerate_is_the_same_request_with_a_new_seed_from_the_pressing_chat():
    talk, core, _ = make()
    first = talk.from_text("부정 아 정말 seed=9 temperature=0.7", Who("telegram:1", None))
    key = core.followups.remember(core.engine.result(first, 2, True), 3)
    again = talk.from_button(f"r:{key}", Who("telegram:2", None)).request
    assert again.origin == "telegram:2" and again.knobs.seed is None and again.knobs.temperature == 0.7
    assert (again.label, again.prompt) == ("부정", "아 정말")


def test_the_follow_up_memory_forgets_the_oldest_first():
    talk, core, _ = make()
    core.followups.capacity = 2
    first = talk.from_text("긍정 아 정말", Who("telegram:1", None))
    keys = [core.followups.remember(core.engine.result(first, 2, True), 3) for _ in range(3)]
    with pytest.raises(UserError, match="만료"):
        talk.from_button(f"r:{keys[0]}", Who("telegram:1", None))
    for key in keys[1:]:
        talk.from_button(f"r:{key}", Who("telegram:1", None))


# ---- per-chat settings ----------------------------------------------------------------------------------------
def test_a_second_set_adds_to_the_first_and_reset_forgets_both():
    talk, core, _ = make()
    core.set_chat_knobs("top_p=0.5", "telegram:1")
    knobs = core.set_chat_knobs("temperature=0.7", "telegram:1")
    assert (knobs.top_p, knobs.temperature) == (0.5, 0.7)
    knobs = core.set_chat_fields({"top_k": 5, "top_p": None}, "telegram:1")
    assert (knobs.top_p, knobs.temperature, knobs.top_k) == (0.5, 0.7, 5)
    assert core.chat_knobs("telegram:2") == core.engine.defaults  # other chats keep the server's
    assert talk.from_text("긍정 아 정말", Who("telegram:1", None)).request.knobs.top_p == 0.5
    assert core.reset_chat_knobs("telegram:1") == core.engine.defaults


# ---- exact texts and what each door passes on -------------------------------------------------------------------
async def test_partials_and_the_result_are_rendered_in_the_targets_style():
    from core.conversation import Style
    from core.replies import CURSOR

    talk, _, _ = make()
    target = Target(edit_interval=1.0)
    target.style = Style(4096, escape=lambda s: s.replace("정", "&"), emphasize=lambda s: f"*{s}*")
    await talk.reply(target, talk.from_text("긍정 아 정말", WHO))
    assert target.calls[0][1].text == "*긍& 아 &말* 하나 둘 셋 넷" + CURSOR
    assert target.calls[-1][1].text == "*긍& 아 &말* 하나 둘 셋 넷 다섯 여섯 일곱 여덟 아홉 열\n\nseed=100"


async def test_a_result_shown_can_be_continued_with_its_own_budget():
    talk, core, _ = make()
    target = Target()
    await talk.reply(target, talk.from_text("긍정 아 정말 max_length=30", WHO))
    key = target.calls[-1][1].buttons.key
    knobs = talk.from_button(f"c:{key}:0", Who("telegram:1", None)).request.knobs
    assert (knobs.min_length, knobs.max_length) == (14, 13 + 27)  # 13 tokens so far, 30 - 3 more


async def test_an_unexpected_error_is_logged_with_its_traceback_and_an_eight_character_id(caplog):
    talk, core, _ = make()
    core.engine.error, core.engine.fail_at = RuntimeError("secret detail"), 1
    target = Target()
    await talk.reply(target, talk.from_text("긍정 아 정말", WHO))
    rid = target.calls[-1][1].text.rsplit(" ", 1)[1][:-2]
    assert len(rid) == 8 and int(rid, 16) >= 0
    record = next(r for r in caplog.records if r.levelname == "ERROR")
    assert record.getMessage() == f"/gen failed [request {rid}]" and record.exc_info[1] is core.engine.error


def test_the_fields_door_reads_the_prompt_and_label_and_keeps_the_origin():
    talk, core, _ = make()
    core.set_chat_knobs("top_p=0.5", "discord:3")
    who = Who("discord:3", None)
    prepared = talk.from_fields({"prompt": "아 정말", "label": "부정"}, who)
    assert (prepared.request.label, prepared.request.origin, prepared.request.knobs.top_p) == ("부정", "discord:3", 0.5)
    assert talk.from_text("긍정 아", who).request.origin == "discord:3"
    assert talk.from_fields({"prompt": "pos 아 정말"}, who).request.label == "긍정"
    for fields, message in (
        ({"label": "긍정"}, '"prompt"에 문자열을 넣어 주세요. 예: {"prompt": "긍정 아 정말"} ("prompt" must be a string)'),
        ({"prompt": "아", "label": "중립"}, '"label"은 "긍정" 또는 "부정"이어야 합니다. ("label" must be 긍정 or 부정)'),
        ({"prompt": "아", "label": 5}, '"label"은 "긍정" 또는 "부정"이어야 합니다. ("label" must be 긍정 or 부정)'),
    ):
        with pytest.raises(UserError) as info:
            talk.from_fields(fields, who)
        assert str(info.value) == message


def test_the_draining_sentence():
    talk, core, _ = make()
    core.draining.set()
    with pytest.raises(ShuttingDown) as info:
        talk.from_text("긍정 아", WHO)
    assert str(info.value) == "봇이 다시 시작하는 중입니다. 잠시 후 다시 시도해 주세요. (the bot is restarting)"


def test_continuing_a_label_only_result_and_a_one_token_budget():
    talk, core, _ = make()
    first = talk.from_text("긍정", Who("telegram:1", None))  # a label alone: a whole review
    key = core.followups.remember(core.engine.result(first, 2, True), len(first.prompt_ids))
    request = talk.from_button(f"c:{key}:0", Who("telegram:2", None)).request
    assert (request.prompt, request.origin) == ("하나 둘", "telegram:1")  # the result's own origin
    tight = talk.from_text("긍정 아 정말 max_length=4 min_length=1", Who("telegram:1", None))  # room for one token
    key = core.followups.remember(core.engine.result(tight, 1, True), len(tight.prompt_ids))
    assert talk.from_button(f"c:{key}:0", Who("telegram:1", None)).request.knobs.max_length == 5


async def test_typing_is_refreshed_even_after_a_failed_attempt(monkeypatch):
    import core.conversation as conversation

    monkeypatch.setattr(conversation, "TYPING_REFRESH_S", 0)  # refresh at every chance the loop gives it
    talk, _, _ = make()
    target = Target()
    attempts = []

    async def failing_typing():
        attempts.append(1)
        raise ConnectionError("chat unreachable")

    target.typing = failing_typing
    assert await talk.reply(target, talk.from_text("긍정 아 정말", WHO)) is not None
    assert len(attempts) > 1


# ---- the daily quota, the same for each door ---------------------------------------------------------------------
@pytest.mark.parametrize("door", DOORS)
def test_every_door_counts_against_the_daily_quota(door):
    talk, core, _ = make(limits={"user_interval_s": 0, "daily_requests_per_user": 2})
    enter = _doors(talk, core)[door]
    enter(WHO)
    with pytest.raises(UserError):
        talk.from_text("긍정 아 정말 top_p=7", WHO)  # refused: not counted
    enter(WHO)
    with pytest.raises(QuotaExceeded) as info:
        enter(WHO)
    assert str(info.value).startswith("오늘 쓸 수 있는 생성 2회를 모두 썼습니다. ")
    assert "(daily quota of 2 used up; it resets at 00:00 UTC" in str(info.value)
    assert counted(core, "quota") == 1
    enter(Who("telegram:1", "telegram:8"))  # another user has their own
    for _ in range(3):
        enter(Who("web", None))  # no user key (the web API): no per-user quota


def test_without_a_quota_nobody_runs_out():
    talk, core, _ = make(limits={"user_interval_s": 0})
    assert core.settings.limits.daily_requests_per_user == 0  # settings.toml's: unlimited
    for _ in range(5):
        talk.from_text("긍정 아 정말", WHO)
    assert counted(core, "quota") == 0


# ---- who is asking: the engine's fair share, admins, the request log -----------------------------------------------
@pytest.mark.parametrize("door", DOORS)
def test_every_door_passes_on_whose_share_of_the_engine_it_uses(door):
    talk, core, _ = make(limits={"user_interval_s": 0})
    enter = _doors(talk, core)[door]
    assert enter(WHO).request.user == "telegram:7"
    assert enter(Who("web", None, client="web:203.0.113.7")).request.user == "web:203.0.113.7"
    assert enter(Who("discord:3", None)).request.user == "discord:3"  # no user key: the chat's


@pytest.mark.parametrize("door", DOORS)
def test_admins_pass_the_allowlist_on_every_door(door):
    talk, core, _ = make(access=Access({"chat": [1], "user": []}))
    talk.admins = frozenset({"telegram:9"})
    enter = _doors(talk, core)[door]
    enter(Who("telegram:2", "telegram:9", {"chat": 2, "user": 9}))
    with pytest.raises(NotAllowed):
        enter(Who("telegram:2", "telegram:8", {"chat": 2, "user": 8}))
    with pytest.raises(NotAllowed):  # no user key is nobody's admin
        enter(Who("telegram:2", None, {"chat": 2, "user": None}))


async def test_the_request_log_has_each_admission_refusal_and_finished_reply():
    talk, core, _ = make(limits={"user_interval_s": 60})
    await talk.reply(Target(), talk.from_text("긍정 아 정말", WHO), asker="telegram:7")
    with pytest.raises(RateLimited):
        talk.from_text("긍정 아 정말", WHO)
    await talk.reply(Target(), talk.from_fields({"prompt": "아 정말"}, Who("web", None)))
    await talk.reply(Target(), core.engine.prepare(GenRequest("긍정", "아", core.engine.defaults)))  # no origin
    rows = core.store.request_rows(admin.since())
    assert {row[0] for row in rows} == {admin.today()}
    # (platform, user, outcome, seconds): ten fake steps of 0.25 s each
    assert sorted((row[1:] for row in rows), key=str) == sorted([
        ("telegram", "telegram:7", "admitted", None), ("telegram", "telegram:7", "ok", 2.5),
        ("telegram", "telegram:7", "rate_limited", None),
        ("web", None, "admitted", None), ("web", None, "ok", 2.5),
        ("internal", None, "ok", 2.5),
    ], key=str)


def admins_talk(**sections: dict):
    """A conversation with one admin (telegram:7) and the store's allowlists (empty: everyone may use it)."""
    talk, core, clock = make(**sections)
    talk.access = StoredAccess(core.store, "telegram", {"chat": [], "user": []})
    talk.admins = frozenset({"telegram:7"})
    return talk, core, clock


async def test_stats_sum_up_the_request_log_for_admins_only():
    talk, core, _ = admins_talk(limits={"user_interval_s": 60})
    await talk.reply(Target(), talk.from_text("긍정 아 정말", WHO), asker="telegram:7")
    with pytest.raises(RateLimited):
        talk.from_text("긍정 아 정말", WHO)
    talk.from_fields({"prompt": "아 정말"}, Who("web", None))
    assert talk.stats(WHO) == (
        "최근 7일 통계, UTC (stats, last 7 days):\n날짜별 생성 요청 (requests per day):\n"
        f"• {admin.today()}: 2\n거절 사유별 (refusals by reason): rate_limited 1\n"
        "응답 시간 중앙값 (median latency): 2.50초 (1건)\n가장 많이 쓴 사용자 (busiest users): telegram:7 1")
    with pytest.raises(NotAllowed) as info:
        talk.stats(Who("telegram:1", "telegram:8"))
    assert str(info.value) == admin.NOT_ADMIN and error_text(info.value, "test") == admin.NOT_ADMIN
    assert counted(core, "not_allowed") == 1


def test_admins_change_the_allowlists_at_run_time():
    talk, core, _ = admins_talk()
    outsider = Who("telegram:2", "telegram:9", {"chat": 2, "user": 9})
    empty = "허용 목록 (allowed):\n• (없음 — 모두 쓸 수 있습니다 / empty: everyone)\n차단 목록 (denied):\n• (없음 / none)"
    assert talk.manage_access(WHO, "", None) == empty
    talk.from_text("긍정 아 정말", outsider)  # everyone, while the lists are empty
    assert talk.manage_access(WHO, "", True) == "허용 목록 (allowed):\n• chat 1\n차단 목록 (denied):\n• (없음 / none)"
    with pytest.raises(NotAllowed):
        talk.from_text("긍정 아 정말", outsider)
    assert talk.manage_access(WHO, "user 9", True).startswith("허용 목록 (allowed):\n• chat 1\n• user 9\n")
    assert talk.manage_access(WHO, "user 9", False) == (
        "허용 목록 (allowed):\n• chat 1\n차단 목록 (denied):\n• user 9")
    assert talk.manage_access(WHO, "", None).endswith("• user 9")  # /allowed changes nothing
    with pytest.raises(NotAllowed) as info:
        talk.manage_access(outsider, "user 9", True)
    assert str(info.value) == admin.NOT_ADMIN
    assert talk.manage_access(WHO, "", None).endswith("• user 9")
    talk.access = Access({"chat": [], "user": []})  # lists from the settings file
    with pytest.raises(UserError) as info:
        talk.manage_access(WHO, "", None)
    assert str(info.value) == "이 봇의 허용 목록은 설정 파일로만 바꿀 수 있습니다. (allowlists come from the settings here)"
    with pytest.raises(UserError, match="사용법"):
        admins_talk()[0].manage_access(WHO, "user nine", True)


# ---- several models: each request goes to its model's backend ------------------------------------------------------
def two_models(core) -> FakeBackend:
    """Serve a second model, "other", next to the default ("base"); it writes other words."""
    other = FakeBackend(core.settings, core.engine.clock, words=("가", "나", "다"))
    other.sentiment, other.per_byte = False, True  # its own tokenizer: a token per byte
    core.models = Models({"base": core.engine, "other": other}, "base")
    return other


async def test_model_picks_the_backend_for_a_request_and_the_chat_default_for_the_rest():
    talk, core, _ = make(limits={"user_interval_s": 0})
    other = two_models(core)
    assert talk.from_text("긍정 아 정말", WHO).request.model == "base"
    prepared = talk.from_text("긍정 아 정말 model=other", WHO)
    assert prepared.request.model == "other" and other.prepared[-1] is prepared
    assert talk.from_fields({"prompt": "아", "model": "other"}, WHO).request.model == "other"
    continued = talk.from_reply(SHOWN, "model=other", WHO)
    assert continued.request.model == "other" and len(continued.prompt_ids) == 28  # counted by its tokenizer
    assert continued.request.knobs.max_length == 28 + 20
    target = Target()
    gen = await talk.reply(target, prepared)
    assert gen.continuations == (" 가 나 다",) and (other.closed, core.engine.closed) == (1, 0)
    key = target.calls[-1][1].buttons.key
    again, more = talk.from_button(f"r:{key}", WHO), talk.from_button(f"c:{key}:0", WHO)
    assert (again.request.model, more.request.model) == ("other", "other")
    assert [p.request.prompt for p in other.prepared[-2:]] == ["아 정말", "아 정말 가 나 다"]  # both by "other"
    core.set_chat_model(WHO.chat, "other")  # /model other: this chat's default
    assert talk.from_text("긍정 아 정말", WHO).request.model == "other"
    assert talk.from_fields({"prompt": "아"}, WHO).request.model == "other"
    assert talk.from_reply(SHOWN, "", WHO).request.model == "other"
    assert talk.from_text("긍정 아 정말", Who("telegram:2", "telegram:8")).request.model == "base"
    assert talk.from_text("긍정 아 정말 model=base", WHO).request.model == "base"


@pytest.mark.parametrize("enter", [
    lambda talk: talk.from_text("긍정 아 정말 model=nope", WHO),
    lambda talk: talk.from_fields({"prompt": "아", "model": "nope"}, WHO),
    lambda talk: talk.from_reply(SHOWN, "model=nope", WHO),
])
def test_an_unknown_model_is_refused_with_the_choices(enter):
    talk, core, _ = make()
    two_models(core)
    with pytest.raises(UserError) as info:
        enter(talk)
    assert str(info.value) == ("모델 'nope'은(는) 쓸 수 없습니다. 쓸 수 있는 모델: base, other "
                               "(unknown or unavailable model; choose one of base, other)")
    assert counted(core, "user_error") == 1
    talk.from_text("긍정 아 정말", WHO)  # the refusal did not use up the turn


def test_the_model_field_must_be_a_name():
    talk, core, _ = make()
    with pytest.raises(UserError) as info:
        talk.from_fields({"prompt": "아", "model": 5}, WHO)
    assert str(info.value) == '"model"에는 모델 이름(문자열)을 넣어 주세요. ("model" must be a model name)'


def test_choosing_a_chats_model():
    talk, core, _ = admins_talk()
    two_models(core)
    listing = ("모델 (models; ▶ 이 채팅):\n{}\n\n"
               "바꾸기: !model 이름 · 한 요청만: model=이름 (switch: !model name; once: model=name)")
    base = "▶ base — 라벨로 감성 조절됨 (labels steer it)\n• other — 라벨로 감성이 조절되지 않음 (labels do not steer it)"
    assert talk.choose_model(WHO, "  ", "!model") == listing.format(base)
    member = Who("telegram:1", "telegram:8")
    with pytest.raises(NotAllowed):  # with admins configured, only they switch
        talk.choose_model(member, "other")
    chosen = talk.choose_model(WHO, " other ")
    assert chosen.startswith("모델 (models; ▶ 이 채팅):\n• base — 라벨로 감성 조절됨 (labels steer it)\n▶ other")
    assert chosen.endswith("바꾸기: /model 이름 · 한 요청만: model=이름 (switch: /model name; once: model=name)")
    assert core.chat_model(WHO.chat) == "other" and core.chat_model("telegram:2") == "base"
    with pytest.raises(UserError, match="모델 'nope'"):
        talk.choose_model(WHO, "nope")
    assert counted(core, "user_error") == 1 and core.chat_model(WHO.chat) == "other"
    talk.admins = frozenset()  # no admins: anyone may switch their chat's
    talk.choose_model(member, "base")
    assert core.chat_model(WHO.chat) == "base"


# ---- the stop button ---------------------------------------------------------------------------------------------
class Stopping(Target):
    """A target where `who` presses the stop button of the `at`-th partial it is shown (`refused`: what they were
    told, if anything)."""

    def __init__(self, talk: Conversation, who: Who, at: int = 2):
        super().__init__(edit_interval=0.0)
        self.talk, self.who, self.at = talk, who, at
        self.refused: UserError | None = None

    async def edit(self, reply):
        await super().edit(reply)
        if reply.stop and len(self.calls) == self.at:
            try:
                assert self.talk.from_button(stop_data(reply.stop), self.who) is None  # nothing new to generate
            except UserError as exc:
                self.refused = exc


async def test_the_asker_stops_a_reply_and_keeps_the_text_so_far():
    talk, core, _ = make(limits={"user_interval_s": 60})
    target = Stopping(talk, WHO)
    gen = await talk.reply(target, talk.from_text("긍정 아 정말", WHO), asker=WHO.user)
    assert target.shown() == [("send", 1), ("edit", 2), ("edit", 2)]
    partial, last = target.calls[1][1], target.calls[-1][1]
    assert partial.stop and not partial.final and target.calls[0][1].stop == partial.stop  # one key per reply
    assert last.stopped and last.final and not last.error and last.stop is None and last.buttons is None
    assert last.generation is gen is partial.generation and not gen.done
    assert last.text == "긍정 아 정말 하나 둘\n\nseed=100 · ⏹ 중지됨 (stopped)"
    assert core.engine.closed == 1
    assert counted(core, "ok") == 0 and counted(core, "user_error") == 0
    with pytest.raises(UserError) as info:  # pressed again: it is over
        talk.from_button(f"s:{partial.stop}", WHO)
    assert str(info.value) == "이미 끝났거나 멈춘 생성입니다. (this generation has already finished or stopped)"


async def test_only_the_asker_may_stop_a_reply():
    talk, core, _ = make()
    target = Stopping(talk, Who("telegram:1", "telegram:8"))
    assert (await talk.reply(target, talk.from_text("긍정 아 정말", WHO), asker=WHO.user)).done
    assert str(target.refused) == "요청한 사람만 멈출 수 있습니다. (only the person who asked can stop it)"
    assert target.shown()[-1] == ("edit", STEPS) and counted(core, "user_error") == 1
    # Without an asker (the web), whoever was sent the key may stop it.
    talk, core, _ = make()
    target = Stopping(talk, Who("web", None, client="web:1"))
    assert not (await talk.reply(target, talk.from_text("긍정 아 정말", Who("web", None)))).done


async def test_a_stop_pressed_while_the_backend_is_busy_ends_the_reply_at_once():
    talk, core, _ = make()
    core.engine.hold_at = 3  # the stream waits before its third step until released (it is not, here)
    target = Target(edit_interval=0.0)
    reply = asyncio.create_task(talk.reply(target, talk.from_text("긍정 아 정말", WHO), asker=WHO.user))
    await bounded(core.engine.holding.wait())
    assert talk.from_button(f"s:{target.calls[-1][1].stop}", WHO) is None
    gen = await bounded(reply)
    assert target.shown() == [("send", 1), ("edit", 2), ("edit", 2)] and target.calls[-1][1].stopped
    assert gen.new_tokens == 2 and core.engine.closed == 1  # the pending read was cancelled: the stream is closed


async def test_a_stream_that_ends_without_a_result_is_an_apology_not_a_silent_cursor(caplog):
    talk, core, _ = make()
    core.engine.final = False
    target = Target(edit_interval=0.0)
    assert await talk.reply(target, talk.from_text("긍정 아 정말", WHO)) is None
    last = target.calls[-1][1]
    assert last.error and last.text.startswith(f"<{APOLOGY} [요청 ID ") and not last.stopped
    record = next(r for r in caplog.records if r.levelname == "ERROR")
    assert str(record.exc_info[1]) == "the generation stream ended without a result" and core.engine.closed == 1


# ---- the reply door: a reply to a result continues it --------------------------------------------------------------
def test_a_reply_continues_the_shown_result_with_the_chats_knobs():
    talk, core, _ = make()
    core.set_chat_knobs("top_p=0.5 seed=4", WHO.chat)
    prepared = talk.from_reply(SHOWN, "", WHO)
    request = prepared.request
    assert (request.label, request.prompt, request.origin) == ("긍정", "아 정말 하나 둘", "telegram:1")
    assert request.model == core.served.default and request.user == "telegram:7"
    assert prepared.continuing and len(prepared.prompt_ids) == 5 and core.engine.prepared[-1].continuing
    # The chat's max_length (20) is how many tokens it may add to the 5 shown; at least one new one.
    knobs = request.knobs
    assert (knobs.max_length, knobs.min_length, knobs.top_p, knobs.seed) == (25, 6, 0.5, 4)


@pytest.mark.parametrize(("args", "label", "prompt", "lengths"), [
    ("그리고 또 top_k=5", "긍정", "아 정말 하나 둘 그리고 또", (27, 8)),
    ("부정 그런데", "부정", "아 정말 하나 둘 그런데", (26, 7)),
    ("부정 그런데 정말", "부정", "아 정말 하나 둘 그런데 정말", (27, 8)),
    ("neg", "부정", "아 정말 하나 둘", (25, 6)),
    ("   그리고   또  ", "긍정", "아 정말 하나 둘 그리고 또", (27, 8)),
    ("max_length=12", "긍정", "아 정말 하나 둘", (12, 6)),  # given: it counts the whole text, as in /gen
    ("max_length=12 min_length=8", "긍정", "아 정말 하나 둘", (12, 8)),
    ("min_length=3", "긍정", "아 정말 하나 둘", (25, 3)),
    ("max=11", "긍정", "아 정말 하나 둘", (11, 6)),
])
def test_a_reply_adds_words_switches_the_label_and_sets_knobs(args, label, prompt, lengths):
    talk, core, _ = make()
    request = talk.from_reply(SHOWN, args, WHO).request
    assert (request.label, request.prompt, (request.knobs.max_length, request.knobs.min_length)) == (
        label, prompt, lengths)
    assert request.knobs.top_k == (5 if "top_k" in args else 50)


def test_a_reply_is_held_to_the_length_cap():
    talk, core, _ = make(limits={"max_length": 16}, generation={"max_length": 16})
    assert talk.from_reply(SHOWN, "", WHO).request.knobs.max_length == 16  # 5 + 16 is past the cap
    fifteen = "긍정 " + " ".join(["말"] * 14) + "\n\nseed=1"
    knobs = talk.from_reply(fifteen, "", Who("telegram:1", "telegram:8")).request.knobs
    assert (knobs.min_length, knobs.max_length) == (16, 16)
    # At the cap or past it (the words added to the text), the same sentence.
    for who, shown, args in ((Who("telegram:1", "telegram:9"), fifteen, "말"),
                             (Who("telegram:1", "telegram:10"), fifteen.replace("말", "말 말", 1), ""),
                             (Who("telegram:1", "telegram:11"), fifteen, "말 말 말")):
        with pytest.raises(UserError) as info:
            talk.from_reply(shown, args, who)
        assert str(info.value) == "최대 길이(16토큰)에 도달해 더 이어 쓸 수 없습니다. (reached the 16-token limit)"


@pytest.mark.parametrize(("shown", "args", "message"), [
    ("그냥 메시지", "", "답장한 메시지는 이어 쓸 수 있는 생성 결과가 아닙니다"),
    ("긍정 아 정말 하나 ▌", "", "답장한 메시지는 이어 쓸 수 있는 생성 결과가 아닙니다"),  # still streaming
    (SHOWN, "top_p=7", "top_p"),
    (SHOWN, "\ud83d 아", "U+D83D"),
    (SHOWN, "아 seed=1\ud83d", "U+D83D"),  # in a knob's value too: the broken text is what is wrong
    (SHOWN, "아" * 501, "최대 500자"),
    (SHOWN.replace("긍정 ", ""), "best_of=2", "best_of는 라벨"),
])
def test_a_reply_that_cannot_continue_is_refused_and_costs_no_turn(shown, args, message):
    talk, core, _ = make(limits={"user_interval_s": 60})
    with pytest.raises(UserError) as info:
        talk.from_reply(shown, args, WHO)
    assert message in str(info.value) and not isinstance(info.value, RateLimited)
    if message.startswith("답장한"):
        assert str(info.value) == NOT_A_RESULT
    assert counted(core, "user_error") == 1
    talk.from_reply(SHOWN, "", WHO)


def test_a_reply_to_an_unlabelled_result_samples_once_unless_labelled():
    talk, core, _ = make()
    plain = SHOWN.replace("긍정 ", "")
    request = talk.from_reply(plain, "", WHO).request
    assert (request.label, request.prompt, request.rows) == (None, "아 정말 하나 둘", 1)  # best_of 4 does not apply
    labelled = talk.from_reply(plain, "긍정 best_of=2", Who("telegram:1", "telegram:8")).request
    assert (labelled.label, labelled.rows) == ("긍정", 2)


def test_continuing_counts_every_token_a_text_can_have():
    # A tokenizer may give one token per byte: the continuation is tokenized with room for that many, so a text
    # past the cap still gets the limit's sentence (not a prompt-length error), and one just under it continues.
    talk, core, _ = make(limits={"max_length": 40})
    core.engine.per_byte = True
    first = talk.from_text("긍정 아", Who("telegram:1", None))
    assert len(first.prompt_ids) == 10  # 6 + 1 + 3 bytes
    under = core.followups.remember(core.engine.result(first, 5, True), 10)  # " 하나 둘 셋 넷 다섯": 36 bytes in all
    knobs = talk.from_button(f"c:{under}:0", Who("telegram:1", None)).request.knobs
    assert (knobs.min_length, knobs.max_length) == (37, 40)
    past = core.followups.remember(core.engine.result(first, 6, True), 10)  # " 여섯" more: 43 bytes
    with pytest.raises(UserError) as info:
        talk.from_button(f"c:{past}:0", Who("telegram:1", None))
    assert str(info.value) == "최대 길이(40토큰)에 도달해 더 이어 쓸 수 없습니다. (reached the 40-token limit)"


# ---- "typing…" ends with the reply, however it ends ------------------------------------------------------------
class Slow(Target):
    """A target whose calls take a network round trip (other tasks run meanwhile), logging what it was asked."""

    def __init__(self, **kwargs):
        super().__init__(edit_interval=0.0, **kwargs)
        self.log: list[str] = []

    async def _trip(self, what: str) -> None:
        self.log.append(what)
        for _ in range(3):
            await asyncio.sleep(0)

    async def send(self, reply):
        await self._trip("final" if reply.final else "partial")
        await super().send(reply)

    async def edit(self, reply):
        await self._trip("final" if reply.final else "partial")
        await super().edit(reply)

    async def typing(self):
        self.log.append("typing")


@pytest.mark.parametrize("ending", ["result", "stopped", "error"])
async def test_no_typing_once_the_answer_or_the_error_is_there(monkeypatch, ending):
    import core.conversation as conversation

    monkeypatch.setattr(conversation, "TYPING_REFRESH_S", 0)  # refresh at every chance the loop gives it
    talk, core, _ = make()
    target = Slow()
    if ending == "error":
        core.engine.error, core.engine.fail_at = UserError("안 돼요 (no)"), 4
    if ending == "stopped":
        core.engine.hold_at = 4
    reply = asyncio.create_task(talk.reply(target, talk.from_text("긍정 아 정말", WHO), asker=WHO.user))
    if ending == "stopped":
        await bounded(core.engine.holding.wait())
        talk.from_button(f"s:{target.calls[-1][1].stop}", WHO)
    await bounded(reply)
    for _ in range(5):  # time for a typing task that was left running to show itself
        await asyncio.sleep(0)
    assert "typing" in target.log[: target.log.index("final")]
    assert "typing" not in target.log[target.log.index("final"):], target.log


async def test_a_reply_cancelled_from_outside_stops_typing_and_the_stream(monkeypatch):
    import core.conversation as conversation

    monkeypatch.setattr(conversation, "TYPING_REFRESH_S", 0)
    talk, core, _ = make()
    core.engine.hold_at = 3
    target = Slow()
    reply = asyncio.create_task(talk.reply(target, talk.from_text("긍정 아 정말", WHO)))
    await bounded(core.engine.holding.wait())
    reply.cancel()  # the adapter's task, at shutdown
    with pytest.raises(asyncio.CancelledError):
        await bounded(reply)
    typed = target.log.count("typing")
    for _ in range(5):
        await asyncio.sleep(0)
    assert target.log.count("typing") == typed and core.engine.closed == 1


async def test_a_reply_leaves_no_task_behind():
    talk, core, _ = make(limits={"user_interval_s": 0})
    await talk.reply(Target(), talk.from_text("긍정 아 정말", WHO))
    await talk.reply(Stopping(talk, WHO), talk.from_text("긍정 아 정말", WHO), asker=WHO.user)
    for _ in range(3):  # cancelled tasks finish on their next turn
        await asyncio.sleep(0)
    assert asyncio.all_tasks() == {asyncio.current_task()}  # no waiter per step, no typing loop
