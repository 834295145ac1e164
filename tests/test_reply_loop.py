"""Conversation unit tests: the reply loop and the three doors over a scripted backend, a collecting reply target
and a fake clock (no model, no network, no sleeping: the whole file runs in well under a second)."""

from __future__ import annotations

import pytest
from fake_backend import Collecting as Target
from fake_backend import FakeClock, fake_core

from core.access import REFUSAL, Access
from core.conversation import Buttons, Conversation, Who, error_text
from core.errors import NotAllowed, RateLimited, ShuttingDown, UserError
from core.followups import EXPIRED
from core.replies import APOLOGY
from core.settings import load_settings

STEPS = 10  # the fake backend writes ten words, one a step, 0.25 s of fake time each


def make(clock: FakeClock | None = None, access: Access | None = None, **sections: dict):
    """A conversation over the shipped settings.toml (best_of 4 included), `sections` overriding it."""
    clock = clock or FakeClock()
    settings = load_settings(store={"path": ":memory:"}, **sections)
    core = fake_core(settings, clock)
    return Conversation(core, access or Access({"chat": [], "user": []}), clock=clock), core, clock


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
    }


DOORS = ("text", "fields", "regenerate", "continue")


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
