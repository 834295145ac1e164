"""The Telegram bot end to end: PTB's real Application over real HTTP against a fake Bot API on loopback."""

from __future__ import annotations

import asyncio
import logging
import re

import aiohttp
import pytest
from conftest import make_settings, running_core, telegram_running
from fake_bot_api import FakeBotAPI, finished, parse_html
from helpers import free_port as _free_port
from helpers import held_after

import bot.telegram_app as app
import bot.telegram_bot as tg
from bot.telegram_webhook import SECRET_HEADER
from core.followups import EXPIRED
from core.grammar import GenRequest
from core.knobs import knob_specs
from core.rate_limit import UserRateLimiter
from core.replies import APOLOGY
from core.service import BotCore
from core.types import Generation

TOKEN = "123456789:AAF-secret_TokenValue-xyz"
PRIVATE, OTHER, GROUP = 1001, 1002, -100500


@pytest.fixture
async def fake():
    api = await FakeBotAPI(TOKEN, username="ThisBot").start()
    yield api
    await api.close()


@pytest.fixture
def settings(tiny_dir, tmp_path, fake):
    # Overrides conftest's: the bot talks to the fake, and the per-user limit is off unless a test sets it.
    return make_settings(
        tiny_dir, tmp_path, limits={"user_interval_s": 0},
        telegram={"token": TOKEN, "base_url": fake.base_url, "base_file_url": fake.file_url},
    )


@pytest.fixture
async def bot(core, fake):
    async with telegram_running(core, fake):
        yield fake




async def ask(fake: FakeBotAPI, chat_id: int, text: str, final: bool = False) -> dict:
    """Send `text` as a user and return the bot's reply (with `final`, once it is done and carries its buttons; while
    it streams it carries only the stop button)."""
    message = fake.user_message(chat_id, text)
    await fake.wait_for(lambda: any(not final or finished(m) for m in fake.replies_to(message)))
    return fake.replies_to(message)[0]


def callback_data(reply: dict) -> list[str]:
    return [b["callback_data"] for row in reply["reply_markup"]["inline_keyboard"] for b in row]


# ---- generation ------------------------------------------------------------------------------------------------
async def test_private_gen_replies_with_prompt_and_continuation(bot):
    reply = await ask(bot, PRIVATE, "/gen 긍정 아 정말 top_p=0.9", final=True)
    text = reply["text"]
    assert text.startswith("긍정 아 정말")
    continuation = text.split("\n\nseed=")[0].removeprefix("긍정 아 정말")
    assert continuation.strip(), "the model's continuation follows the prompt"
    assert "seed=" in text
    assert {"type": "bold", "offset": 0, "length": len("긍정 아 정말")} in reply["entities"]  # prompt bold only
    send = bot.called("sendMessage", chat_id=PRIVATE)[0]
    assert send["parse_mode"] == "HTML"
    assert send["reply_parameters"]["message_id"] == reply["reply_to_message"]["message_id"]
    data = callback_data(reply)
    assert [d[:2] for d in data] == ["r:", "c:"] and all(len(d.encode()) <= 64 for d in data)
    assert bot.called("sendChatAction", chat_id=PRIVATE, action="typing")


async def test_polling_start_registers_korean_commands(bot):
    assert bot.called("deleteWebhook"), "polling mode clears a leftover webhook"
    commands = bot.called("setMyCommands")[0]["commands"]
    assert {c["command"] for c in commands} == {"start", "help", "gen", "set", "reset", "settings", "model", "allow", "deny",
                                                "allowed", "stats"}
    assert all(any("가" <= ch <= "힣" for ch in c["description"]) for c in commands)


async def test_bad_knob_gets_the_korean_range_error(bot):
    reply = await ask(bot, PRIVATE, "/gen 긍정 아 정말 top_p=1.5")
    assert "top_p" in reply["text"] and "0 초과 1 이하" in reply["text"]
    assert "reply_markup" not in reply


async def test_group_answers_own_username_and_ignores_other_bots(bot):
    ours = await ask(bot, GROUP, "/gen@thisbot 긍정 배우들 연기가", final=True)
    assert ours["text"].startswith("긍정 배우들 연기가")
    theirs = bot.user_message(GROUP, "/gen@OtherBot 긍정 배우들 연기가")
    unknown_other = bot.user_message(GROUP, "/weather@OtherBot")
    await ask(bot, GROUP, "/help@ThisBot")  # its own name, in any case
    await bot.settled()  # all three were fetched and handled: nothing more will come for them
    assert bot.replies_to(theirs) == [] and bot.replies_to(unknown_other) == []
    plain = await ask(bot, GROUP, "/gen 부정 스토리가", final=True)  # privacy mode still delivers /gen
    assert plain["text"].startswith("부정 스토리가")


async def test_help_lists_every_knob(bot, core):
    text = (await ask(bot, PRIVATE, "/help"))["text"]
    for name in knob_specs(core.settings.limits):
        assert name in text
    assert "긍정" in text and "부정" in text and "/set" in text


async def test_start_unknown_command_and_plain_text_get_answers(bot):
    assert "/gen 긍정 아 정말" in (await ask(bot, PRIVATE, "/start"))["text"]
    assert "알 수 없는 명령" in (await ask(bot, PRIVATE, "/frobnicate"))["text"]
    assert "/gen" in (await ask(bot, PRIVATE, "그냥 안녕"))["text"]
    assert "알 수 없는 명령" in (await ask(bot, GROUP, "/frobnicate@ThisBot"))["text"]


async def test_html_in_the_prompt_comes_back_literally(bot):
    reply = await ask(bot, PRIVATE, "/gen 긍정 <b>& 좋아 </i>", final=True)
    assert reply["text"].startswith("긍정 <b>& 좋아 </i>")  # the fake parsed the HTML as Telegram would
    sent = bot.called("sendMessage", chat_id=PRIVATE)[0]["text"]
    assert sent.startswith("<b>긍정 &lt;b&gt;&amp; 좋아 &lt;/i&gt;</b>")


async def test_message_limit_is_respected_even_when_escaping_grows_the_text(core):
    request = GenRequest("긍정", "&<" * 240, core.engine.defaults)
    gen = Generation(request, ("&" * 3000, "<" * 3000, "x" * 9000), (1, 2, 3), 10)
    visible, _ = parse_html(tg.render(gen))  # raises on broken markup
    assert 0 < len(visible) <= 4096


# ---- per-chat settings -----------------------------------------------------------------------------------------
async def test_set_settings_reset_persist_across_restart(core, fake, settings):
    async with telegram_running(core, fake):
        saved = await ask(fake, PRIVATE, "/set top_p=0.5 temp=0.7")
        assert "top_p = 0.5" in saved["text"] and "temperature = 0.7" in saved["text"]
        bad = await ask(fake, PRIVATE, "/set top_p=2")
        assert "top_p" in bad["text"] and "0 초과 1 이하" in bad["text"]
    core.store.close()  # a real restart: a fresh connection to the same SQLite file
    core.store = type(core.store)(settings.store.path)
    async with telegram_running(core, fake):
        shown = await ask(fake, PRIVATE, "/settings")
        assert "top_p = 0.5" in shown["text"] and "temperature = 0.7" in shown["text"]
        other = await ask(fake, OTHER, "/settings")
        assert "top_p = 1.0" in other["text"], "settings are per chat"
        reset = await ask(fake, PRIVATE, "/reset")
        assert "top_p = 1.0" in reset["text"]
        assert "top_p = 1.0" in (await ask(fake, PRIVATE, "/settings"))["text"]


# ---- buttons ---------------------------------------------------------------------------------------------------
async def test_regenerate_and_continue_buttons(bot):
    first = await ask(bot, PRIVATE, "/gen 긍정 아 정말 max_length=20", final=True)
    regen_data, cont_data = callback_data(first)

    query = bot.press(first, regen_data)
    await bot.wait_for(lambda: len([m for m in bot.sent(PRIVATE) if finished(m)]) == 2)
    assert bot.called("answerCallbackQuery", callback_query_id=query)
    again = bot.sent(PRIVATE)[-1]
    assert again["text"].startswith("긍정 아 정말") and again["reply_to_message"]["message_id"] == first["message_id"]

    query = bot.press(first, cont_data)
    await bot.wait_for(lambda: len([m for m in bot.sent(PRIVATE) if finished(m)]) == 3)
    assert bot.called("answerCallbackQuery", callback_query_id=query)
    longer = bot.sent(PRIVATE)[-1]["text"].split("\n\nseed=")[0]
    before = first["text"].split("\n\nseed=")[0]
    assert longer.startswith(before) and len(longer) > len(before)


async def test_unknown_or_malformed_button_gets_a_polite_answer(bot):
    first = await ask(bot, PRIVATE, "/gen 긍정 아 정말", final=True)
    for data in ("r:nosuchkey", "c:nosuchkey:0", "garbage", f"c:{callback_data(first)[0][2:]}:9"):
        query = bot.press(first, data)
        await bot.wait_for(lambda q=query: bot.called("answerCallbackQuery", callback_query_id=q))
        answer = bot.called("answerCallbackQuery", callback_query_id=query)[0]
        assert answer["text"] == EXPIRED and answer["show_alert"] is True
    assert len(bot.sent(PRIVATE)) == 1, "an expired button generates nothing"


# ---- flood safety ----------------------------------------------------------------------------------------------
async def test_429_retry_after_is_honoured_for_that_chat_only(bot):
    bot.fail_next("sendMessage", retry_after=1, chat_id=PRIVATE)
    slow = bot.user_message(PRIVATE, "/gen 긍정 아 정말")
    fast = bot.user_message(OTHER, "/help")
    await bot.wait_for(lambda: bot.replies_to(slow) and bot.replies_to(fast))
    refused = bot.calls_of("sendMessage", status=429, chat_id=PRIVATE)
    delivered = bot.calls_of("sendMessage", chat_id=PRIVATE)
    assert len(refused) == 1 and len(delivered) == 1, "retried once, delivered once"
    assert delivered[0].at - refused[0].at >= 1.0
    other = bot.calls_of("sendMessage", chat_id=OTHER)[0]
    assert other.at < delivered[0].at, "another chat is not stalled by this chat's flood limit"


async def test_burst_from_many_chats_gets_one_reply_each(bot):
    chats = [2000 + i for i in range(8)]
    messages = [bot.user_message(chat, f"/gen 긍정 영화 {i}") for i, chat in enumerate(chats)]
    await bot.wait_for(lambda: all(any(finished(r) for r in bot.replies_to(m)) for m in messages), 20)
    await bot.settled()  # every handler has returned: a second message would be here by now
    for chat, message in zip(chats, messages):
        assert len(bot.called("sendMessage", chat_id=chat)) == 1
        assert bot.replies_to(message)[0]["text"].startswith(f"긍정 영화 {chats.index(chat)}")


async def test_user_rate_limit_says_how_long_to_wait(bot, core):
    core.limiter = UserRateLimiter(60.0)
    await ask(bot, PRIVATE, "/gen 긍정 아 정말", final=True)
    second = await ask(bot, PRIVATE, "/gen 긍정 아 정말")
    assert "초 후에 다시" in second["text"] and "reply_markup" not in second


async def test_edited_gen_does_not_generate_again(bot):
    message = bot.user_message(PRIVATE, "/gen 긍정 아 정말")
    await bot.wait_for(lambda: any(finished(r) for r in bot.replies_to(message)))
    bot.edit_user_message(message, "/gen 부정 아 정말")
    await bot.wait_for(lambda: len(bot.replies_to(message)) == 2)
    await bot.settled()
    generated, hint = bot.replies_to(message)
    assert "reply_markup" in generated and "수정한 메시지" in hint["text"]
    assert len([m for m in bot.sent(PRIVATE) if "reply_markup" in m]) == 1


async def test_slow_generation_does_not_delay_help_elsewhere(bot, core, monkeypatch):
    gate = asyncio.Event()
    real_stream = core.engine.stream

    async def slow_stream(prepared):
        await gate.wait()
        async for gen in real_stream(prepared):
            yield gen

    monkeypatch.setattr(core.engine, "stream", slow_stream)
    slow = bot.user_message(PRIVATE, "/gen 긍정 아 정말")
    await ask(bot, OTHER, "/help")
    assert bot.replies_to(slow) == []
    gate.set()
    await bot.wait_for(lambda: bot.replies_to(slow))


async def test_long_generation_streams_by_editing_one_reply(bot, monkeypatch):
    monkeypatch.setattr(tg, "EDIT_INTERVAL_S", 0.0)
    reply = await ask(bot, PRIVATE, "/gen 긍정 아 정말 min_length=40 max_length=40", final=True)
    first = bot.called("sendMessage", chat_id=PRIVATE)[0]
    assert first["text"].endswith("▌")
    assert [b["callback_data"][:2] for row in first["reply_markup"]["inline_keyboard"] for b in row] == ["s:"]
    edits = bot.called("editMessageText", chat_id=PRIVATE, message_id=reply["message_id"])
    assert edits and "reply_markup" in edits[-1] and "▌" not in reply["text"]
    assert len(bot.called("sendMessage", chat_id=PRIVATE)) == 1


# ---- failures and secrets --------------------------------------------------------------------------------------
async def test_unexpected_failure_is_logged_and_apologised_for(bot, core, monkeypatch, caplog):
    async def broken(prepared):
        raise RuntimeError(f"engine exploded near {TOKEN}")
        yield  # pragma: no cover (makes this an async generator)

    monkeypatch.setattr(core.engine, "stream", broken)
    with caplog.at_level(logging.ERROR, logger="core.conversation"):
        reply = await ask(bot, PRIVATE, "/gen 긍정 아 정말")
    assert reply["text"].startswith(APOLOGY)
    request_id = reply["text"].rsplit(" ", 1)[1].rstrip("]")
    assert f"telegram /gen in chat 1001 failed [request {request_id}]" in caplog.text and "RuntimeError" in caplog.text
    assert TOKEN not in caplog.text


async def test_token_never_reaches_the_logs(core, fake, caplog):
    for name in ("httpx", "httpcore", "telegram", "bot"):
        caplog.set_level(logging.DEBUG, logger=name)
    async with telegram_running(core, fake):
        await ask(fake, PRIVATE, "/gen 긍정 아 정말", final=True)
    assert TOKEN in fake.tokens_seen, "the token was really used in the URLs"
    assert "HTTP Request: POST" in caplog.text and "Set Bot API URL" in caplog.text, "the URLs were logged"
    assert TOKEN not in caplog.text
    assert all(TOKEN not in record.getMessage() for record in caplog.records)


async def test_rejected_token_fails_start_without_echoing_it(core, fake, tiny_dir, tmp_path):
    settings = make_settings(tiny_dir, tmp_path, telegram={"token": "42:wrong-token", "base_url": fake.base_url})
    other = BotCore.create(settings, core.engine)
    with pytest.raises(app.InvalidToken) as info:
        await asyncio.wait_for(app.serve(other, asyncio.Event()), 10)
    assert "wrong-token" not in str(info.value) and "토큰" in str(info.value)
    other.store.close()


async def test_unreachable_api_waits_and_stops_cleanly(core, tiny_dir, tmp_path, caplog):
    settings = make_settings(tiny_dir, tmp_path, telegram={"token": TOKEN, "base_url": "http://127.0.0.1:9/bot"})
    other = BotCore.create(settings, core.engine)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.5, stop.set)
    with caplog.at_level(logging.WARNING, logger="bot.telegram_app"):
        await asyncio.wait_for(app.serve(other, stop), 10)
    assert "cannot reach the Telegram Bot API" in caplog.text and TOKEN not in caplog.text
    other.store.close()


# ---- webhook ---------------------------------------------------------------------------------------------------
async def test_webhook_mode_checks_the_secret_and_answers(core, fake, tiny_dir, tmp_path):
    port = _free_port()
    settings = make_settings(tiny_dir, tmp_path, limits={"user_interval_s": 0}, telegram={
        "token": TOKEN, "base_url": fake.base_url, "webhook_url": "https://bot.example/tg/hook",
        "webhook_listen": "127.0.0.1", "webhook_port": port, "webhook_secret": "s3cret-Value_1",
    })
    hooked = BotCore.create(settings, core.engine)
    stop = asyncio.Event()
    task = asyncio.create_task(app.serve(hooked, stop))
    try:
        await fake.wait_for(lambda: fake.webhook is not None)
        assert fake.webhook["url"] == "https://bot.example/tg/hook" and fake.webhook["secret_token"] == "s3cret-Value_1"
        assert not fake.called("getUpdates", status=None), "no polling in webhook mode"
        message = {"message_id": 5, "date": 0, "chat": fake.chat(PRIVATE), "from": fake.user(PRIVATE), "text": "/help",
                   "entities": [{"type": "bot_command", "offset": 0, "length": 5}]}
        url = f"http://127.0.0.1:{port}/tg/hook"
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json={"update_id": 1, "message": message}, headers={SECRET_HEADER: "nope"}) as r:
                assert r.status == 403
            async with http.post(url, data=b"{not json", headers={SECRET_HEADER: "s3cret-Value_1"}) as r:
                assert r.status == 400
            async with http.post(url, json={"update_id": 2, "message": message},
                                 headers={SECRET_HEADER: "s3cret-Value_1"}) as r:
                assert r.status == 200
        await fake.wait_for(lambda: fake.called("sendMessage", chat_id=PRIVATE))
        assert len(fake.called("sendMessage", chat_id=PRIVATE)) == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        hooked.store.close()


# ---- issue 12: hardening ---------------------------------------------------------------------------------------
async def test_forged_callback_data_is_answered_as_expired(bot):
    """Issue 12.7: `c:<key>:²` passed `isdigit()` and crashed in int(); the press was never answered."""
    first = await ask(bot, PRIVATE, "/gen 긍정 아 정말", final=True)
    key = callback_data(first)[0][2:]
    for data in (f"c:{key}:²", f"c:{key}:١", f"c:{key}:-1", f"r:{key}:0", f"r:{key[:4]}", "c:a:b:c", "r:", ""):
        query = bot.press(first, data)
        await bot.wait_for(lambda q=query: bot.called("answerCallbackQuery", callback_query_id=q))
        answer = bot.called("answerCallbackQuery", callback_query_id=query)[0]
        assert answer["text"] == EXPIRED and answer["show_alert"] is True, data
    assert len(bot.sent(PRIVATE)) == 1


async def test_a_busy_group_spends_its_allowance_on_final_texts(core, fake, monkeypatch):
    """Issue 12.5: with the group's allowance short, no typing and no partial edits, only the results."""
    monkeypatch.setattr(app, "GROUP_MESSAGES_PER_MINUTE", 3)
    monkeypatch.setattr(app, "GROUP_PERIOD_S", 3600.0)  # the allowance does not refill while the test runs
    monkeypatch.setattr(tg, "EDIT_INTERVAL_S", 0.0)  # partial edits would be due at every step
    async with telegram_running(core, fake):
        asks = [fake.user_message(GROUP, "/gen 긍정 아 정말 min_length=30 max_length=30", user_id=300 + i) for i in range(3)]
        # Three calls is the whole allowance for a minute: a fourth would hold a result back for 20 s.
        await fake.wait_for(lambda: all(any(finished(r) for r in fake.replies_to(m)) for m in asks), 90)
    assert len(fake.called("sendMessage", chat_id=GROUP)) == 3
    assert not fake.called("sendChatAction", chat_id=GROUP) and not fake.called("editMessageText", chat_id=GROUP)


async def test_shutdown_does_not_wait_for_a_group_backlog(core, fake, monkeypatch):
    """Issue 12.5: replies queued behind a group's flood limit are dropped after the reply grace, not awaited."""
    monkeypatch.setattr(app, "GROUP_MESSAGES_PER_MINUTE", 1)
    monkeypatch.setattr(app, "GROUP_PERIOD_S", 3600.0)  # one message an hour: however slow the machine, no second
    monkeypatch.setattr(app, "REPLY_GRACE_S", 0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(app.serve(core, stop))
    await fake.wait_for(lambda: fake.called("getUpdates", status=None))
    asks = [fake.user_message(GROUP, "/gen 긍정 아 정말", user_id=400 + i) for i in range(3)]
    await fake.wait_for(lambda: any(fake.replies_to(m) for m in asks))  # one got through; two wait ~60 s each
    stop.set()
    await asyncio.wait_for(task, 90)  # a hang guard only: before the fix the two queued replies held it ~2 minutes
    assert len(fake.called("sendMessage", chat_id=GROUP)) == 1


# ---- reply to continue -----------------------------------------------------------------------------------------
def bold_head(message: dict) -> str:
    bold = next(e for e in message["entities"] if e["type"] == "bold" and e["offset"] == 0)
    return message["text"][: bold["length"]]


async def reply(fake: FakeBotAPI, chat_id: int, text: str, to: dict) -> dict:
    message = fake.user_message(chat_id, text, reply_to=to)
    await fake.wait_for(lambda: any(finished(m) or "seed=" not in m["text"] for m in fake.replies_to(message)))
    await fake.wait_for(lambda: "▌" not in fake.replies_to(message)[0]["text"])
    return fake.replies_to(message)[0]


async def test_replying_to_a_result_continues_it_with_the_chats_knobs_and_inline_ones(bot, core, monkeypatch):
    first = await ask(bot, PRIVATE, "/gen 부정 배우들 연기가 seed=4 max_length=12", final=True)
    shown = first["text"].split("\n\nseed=")[0]
    await ask(bot, PRIVATE, "/set top_k=7")
    asked = []
    real_stream = core.engine.stream

    def recording(prepared):
        asked.append(prepared)
        return real_stream(prepared)

    monkeypatch.setattr(core.engine, "stream", recording)
    more = await reply(bot, PRIVATE, "그래서 seed=9", first)
    assert bold_head(more) == f"{shown} 그래서"  # the result without its seed line, the label kept, plus the addition
    assert "seed=9" in more["text"] and callback_data(more)[0].startswith("r:")
    (prepared,) = asked
    request, used = prepared.request, len(prepared.prompt_ids)
    assert (request.label, request.prompt) == ("부정", shown.removeprefix("부정 ") + " 그래서")
    assert (request.knobs.top_k, request.knobs.seed) == (7, 9)  # the chat's knob and the inline one
    default = core.engine.defaults.max_length  # may add as many tokens as the chat's max_length, at least one
    assert (request.knobs.min_length, request.knobs.max_length) == (used + 1, used + default)
    command = await reply(bot, PRIVATE, "/gen", first)  # /gen as a reply: the result alone is the prompt
    assert bold_head(command) == shown


async def test_reply_continues_after_a_restart_from_the_message_text_alone(bot, core):
    # A result this process never made (sent before a restart): the replied message is all there is.
    old = {"message_id": 9000, "date": 0, "chat": bot.chat(PRIVATE), "from": bot.bot_user,
           "text": "1. 긍정 아 정말 최고\n\n2. 긍정 아 정말 별로\n\nseed=11, 12 · 긍정 90%, 40%"}
    bot.messages[(PRIVATE, 9000)] = old
    continued = await reply(bot, PRIVATE, "이야", old)
    assert bold_head(continued) == "긍정 아 정말 최고 이야"  # the first candidate, without numbering or scores


async def test_reply_in_a_group_needs_a_mention_or_the_command(bot):
    first = await ask(bot, GROUP, "/gen 긍정 아 정말 max_length=10", final=True)
    shown = first["text"].split("\n\nseed=")[0]
    ignored = bot.user_message(GROUP, "ㅋㅋ 재밌네", reply_to=first)
    mentioned = await reply(bot, GROUP, "@ThisBot 더 써 줘", first)
    assert bold_head(mentioned) == f"{shown} 더 써 줘"
    command = await reply(bot, GROUP, "/gen@ThisBot 부정", first)  # a label word switches the label
    assert bold_head(command) == "부정 " + shown.removeprefix("긍정 ")
    assert bot.replies_to(ignored) == []


async def test_reply_to_something_that_is_not_a_result(bot, core):
    help_message = await ask(bot, PRIVATE, "/help")
    answer = await ask_reply(bot, PRIVATE, "이어서", help_message)
    assert "생성 결과가 아닙니다" in answer["text"]
    refused = core.engine.telemetry.metrics.requests.labels("telegram", "user_error")._value.get()
    assert refused >= 1  # counted like every refusal at the door
    fresh = await reply(bot, PRIVATE, "/gen 긍정 새 글", help_message)  # /gen replying to help is a plain /gen
    assert bold_head(fresh) == "긍정 새 글"


async def ask_reply(fake: FakeBotAPI, chat_id: int, text: str, to: dict) -> dict:
    message = fake.user_message(chat_id, text, reply_to=to)
    await fake.wait_for(lambda: fake.replies_to(message))
    return fake.replies_to(message)[0]


# ---- stop ------------------------------------------------------------------------------------------------------


def cancelled(core) -> float:
    return core.engine.telemetry.metrics.requests.labels("telegram", "cancelled")._value.get()


async def test_stop_button_keeps_the_text_so_far_and_frees_the_request(bot, core, monkeypatch):
    monkeypatch.setattr(tg, "EDIT_INTERVAL_S", 0)  # show every partial
    with held_after(core.engine, 3):
        message = bot.user_message(PRIVATE, "/gen 긍정 아 정말 min_length=100 max_length=100 seed=2")
        await bot.wait_for(lambda: any("reply_markup" in m for m in bot.replies_to(message)))
        streaming = bot.replies_to(message)[0]
        (stop,) = callback_data(streaming)
        assert stop.startswith("s:") and streaming["text"].endswith("▌")
        someone_else = bot.press(streaming, stop, user_id=OTHER)
        await bot.wait_for(lambda: bot.called("answerCallbackQuery", callback_query_id=someone_else))
        assert "요청한 사람만" in bot.called("answerCallbackQuery", callback_query_id=someone_else)[0]["text"]
        asker = bot.press(streaming, stop)
        await bot.wait_for(lambda: "중지됨" in bot.replies_to(message)[0]["text"])
        assert "멈추는 중" in bot.called("answerCallbackQuery", callback_query_id=asker)[0]["text"]
        assert cancelled(core) == 1  # the stream was closed: the engine drops the rows at its next step
    final = bot.replies_to(message)[0]
    assert final["text"].endswith("seed=2 · ⏹ 중지됨 (stopped)") and "▌" not in final["text"]
    assert "reply_markup" not in final  # no stop button left
    again = bot.press(final, stop)  # pressing it again (an old client) is explained
    await bot.wait_for(lambda: bot.called("answerCallbackQuery", callback_query_id=again))
    assert "이미 끝났거나" in bot.called("answerCallbackQuery", callback_query_id=again)[0]["text"]
    more = await reply(bot, PRIVATE, "그리고", final)  # a stopped result continues like any other
    assert bold_head(more) == final["text"].split("\n\nseed=")[0] + " 그리고"


# ---- inline mode -----------------------------------------------------------------------------------------------
def answered(fake: FakeBotAPI, query_id: str) -> list[dict]:
    return fake.called("answerInlineQuery", inline_query_id=query_id)


def generated(core) -> float:
    return core.engine.telemetry.metrics.requests.labels("telegram", "ok")._value.get()


async def test_inline_query_offers_three_candidates_with_seed_and_confidence(bot, core, monkeypatch):
    monkeypatch.setattr(core.inline, "debounce_s", 0.0)
    query = bot.inline_query("긍정 아 정말 top_p=0.9 best_of=2")
    await bot.wait_for(lambda: answered(bot, query))
    (answer,) = answered(bot, query)
    assert answer["is_personal"] is True and len(answer["results"]) == 3
    for i, result in enumerate(answer["results"], 1):
        assert re.fullmatch(rf"{i}\. 긍정 · seed=\d+ · 긍정 \d+%", result["title"])
        content = result["input_message_content"]
        visible, entities = parse_html(content["message_text"])
        assert visible.startswith("긍정 아 정말") and entities[0] == {"type": "bold", "offset": 0, "length": 7}
        assert visible.split("seed=")[1].split(" · ")[0] == result["title"].split("seed=")[1].split(" · ")[0]
    # The same text again, from someone else: answered from the cache, no second generation.
    again = bot.inline_query("긍정  아 정말 top_p=0.9 best_of=2", user_id=4242)
    await bot.wait_for(lambda: answered(bot, again))
    assert answered(bot, again)[0]["results"] == answer["results"] and generated(core) == 1


async def test_inline_query_being_typed_generates_once(bot, core, monkeypatch):
    monkeypatch.setattr(core.inline, "debounce_s", 1.0)  # both keystrokes arrive in one poll, well within it
    typing = [bot.inline_query(text) for text in ("부정 배", "부정 배우", "부정 배우들")]
    await bot.wait_for(lambda: answered(bot, typing[-1]))
    assert [bool(answered(bot, q)) for q in typing] == [False, False, True] and generated(core) == 1


async def test_inline_refusals_are_a_hint_line_and_counted(bot, core, monkeypatch):
    monkeypatch.setattr(core.inline, "debounce_s", 0.0)
    bad = bot.inline_query("긍정 아 top_p=7")
    await bot.wait_for(lambda: answered(bot, bad))
    (answer,) = answered(bot, bad)
    assert answer["results"] == [] and answer["button"]["text"].startswith("top_p") and answer["button"]["start_parameter"]
    assert core.engine.telemetry.metrics.requests.labels("telegram", "user_error")._value.get() == 1
    empty = bot.inline_query("")
    await bot.wait_for(lambda: answered(bot, empty))
    assert "긍정 아 정말" in answered(bot, empty)[0]["button"]["text"] and generated(core) == 0


async def test_inline_answer_comes_in_time_or_not_at_all(bot, core, monkeypatch, caplog):
    import bot.telegram_inline as inline

    monkeypatch.setattr(core.inline, "debounce_s", 0.0)
    monkeypatch.setattr(inline, "DEADLINE_S", 0.2)
    never = asyncio.Event()

    async def stuck(prepared):
        await never.wait()

    monkeypatch.setattr(core.engine, "generate", stuck)
    with caplog.at_level(logging.INFO, logger="bot.telegram_inline"):
        late = bot.inline_query("긍정 아 정말")
        await bot.wait_for(lambda: any("not answered" in r.getMessage() for r in caplog.records))
    assert answered(bot, late) == []


async def test_inline_allowlist_is_by_user(tiny_dir, tmp_path, fake):
    settings = make_settings(tiny_dir, tmp_path, limits={"user_interval_s": 0}, telegram={
        "token": TOKEN, "base_url": fake.base_url, "base_file_url": fake.file_url, "allowed_user_ids": [5],
        "allowed_chat_ids": [GROUP]})
    async with running_core(settings) as listed_core, telegram_running(listed_core, fake):
        listed_core.inline.debounce_s = 0.0
        stranger, member = fake.inline_query("긍정 아", user_id=6), fake.inline_query("긍정 아", user_id=5)
        await fake.wait_for(lambda: answered(fake, stranger) and answered(fake, member))
    assert answered(fake, stranger)[0]["results"] == [] and "사용할 수 없습니다" in answered(fake, stranger)[0]["button"]["text"]
    assert len(answered(fake, member)[0]["results"]) == 3
