"""The conversation's three doors: the same checks in the same order, each refusal counted once."""

from __future__ import annotations

import pytest
from conftest import make_settings

from core.conversation import Conversation, Who, error_text
from core.errors import RateLimited, UserError
from core.rate_limit import UserRateLimiter


def counted(core, outcome: str, frontend: str = "telegram") -> float:
    return core.engine.telemetry.metrics.requests.labels(frontend, outcome)._value.get()


@pytest.fixture
def settings(tiny_dir, tmp_path):
    return make_settings(tiny_dir, tmp_path, limits={"user_interval_s": 60})


async def test_typed_fields_are_not_read_as_knobs(core):
    """Issue 11: slash options went back through `key=value` text: a prompt `점수=10점 만점` was an unknown knob,
    and `top_p=0.5 같은 영화` with the option top_p was a duplicate."""
    door = Conversation(core)
    who = Who("discord:1", None)
    prepared = door.from_fields({"prompt": "점수=10점 만점", "label": "긍정"}, who)
    assert prepared.request.model_prompt == "긍정 점수=10점 만점"
    prepared = door.from_fields({"prompt": "top_p=0.5 같은 영화", "label": None, "top_p": 0.9, "seed": "7"}, who)
    assert prepared.request.prompt == "top_p=0.5 같은 영화" and prepared.request.knobs.top_p == 0.9
    assert prepared.request.knobs.seed == 7 and prepared.request.origin == "discord:1"


async def test_rate_limited_user_is_told_once_per_window(core):
    """Issue 12.6: 30 spam commands got 28-29 "please wait" replies; now one, then silence."""
    core.limiter = UserRateLimiter(60.0)
    door, who = Conversation(core), Who("telegram:5", "telegram:9")
    door.from_text("긍정 아 정말", who)
    refusals = []
    for _ in range(5):
        with pytest.raises(RateLimited) as info:
            door.from_text("긍정 아 정말", who)
        refusals.append(error_text(info.value, "test"))
    assert "초 후에 다시" in refusals[0] and refusals[1:] == [None] * 4
    assert counted(core, "rate_limited") == 5  # silent, but still counted
    door.from_text("긍정 아 정말", Who("telegram:5", "telegram:10"))  # someone else is not affected


async def test_every_door_checks_in_the_same_order_and_counts_each_refusal(core):
    core.limiter = UserRateLimiter(60.0)
    door, who = Conversation(core), Who("telegram:1", "telegram:2")
    with pytest.raises(UserError, match="top_p"):
        door.from_text("긍정 아 정말 top_p=7", who)
    with pytest.raises(UserError, match="토큰"):  # prompt too long: refused before the rate limit is charged
        door.from_text("긍정 " + "아 " * 100, who)
    first = door.from_text("긍정 아 정말 max_length=16", who)
    result = await core.engine.generate(first)
    key = core.followups.remember(result, len(first.prompt_ids))
    with pytest.raises(RateLimited):  # a button is charged like a command
        door.from_button(f"r:{key}", who)
    with pytest.raises(UserError, match="만료"):
        door.from_button(f"c:{key}:²", Who("telegram:1", "telegram:3"))
    assert counted(core, "user_error") == 3 and counted(core, "rate_limited") == 1


async def test_unexpected_errors_get_an_apology_with_the_logged_request_id(caplog):
    text = error_text(RuntimeError("internal detail"), "somewhere")
    request_id = text.rsplit(" ", 1)[1].rstrip("]")
    assert "internal detail" not in text and f"somewhere failed [request {request_id}]" in caplog.text


def test_the_grammar_refuses_broken_unicode_clearly(tiny_dir, tmp_path):
    from core.grammar import parse_gen, parse_settings_args
    from core.knobs import default_knobs

    settings = make_settings(tiny_dir, tmp_path)
    for parse in (parse_gen, parse_settings_args):
        with pytest.raises(UserError, match="서로게이트"):
            parse("긍정 아\ud83d 정말 top_p=0.9", default_knobs(settings.generation), settings.limits)

