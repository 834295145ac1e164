"""Security: allowlists (the rule in core/access.py, enforced by each adapter) and tokens kept out of logs, replies
and /healthz with every front end enabled."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import aiohttp
import discord
import discord.ext.test as dpytest
import pytest
from aiohttp import web
from conftest import make_settings, running_core, telegram_running
from discord.ext import commands
from fake_bot_api import FakeBotAPI, finished
from helpers import free_port as _free_port
from helpers import start_discord_bot

from bot.discord_cog import NotAllowed
from bot.runner import run_front_ends
from core.access import REFUSAL, Access, Verdict, telegram_access
from core.engine import Engine
from core.model_loading import load_model
from core.service import BotCore

TOKEN = "123456789:AAF-access_Token-xyz"
DISCORD_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.discord-Secret.TokenValue_abc"
ME, STRANGER, GROUP, OTHER_GROUP = 3001, 3002, -100700, -100800


# ---- the rule ----------------------------------------------------------------------------------------------------
def test_empty_lists_allow_everyone():
    access = Access({"chat": [], "user": []})
    assert access.open and access.check(chat=1, user=2) is Verdict.ALLOW and access.check(chat=None, user=None) is Verdict.ALLOW


def test_any_listed_id_is_enough_and_others_are_refused_or_ignored():
    access = Access({"chat": [GROUP], "user": [ME]})
    assert access.check(chat=GROUP, user=STRANGER) is Verdict.ALLOW  # the group, whoever writes
    assert access.check(chat=OTHER_GROUP, user=ME) is Verdict.ALLOW  # me, anywhere
    assert access.check(chat=STRANGER, user=STRANGER) is Verdict.REFUSE
    assert access.check(chat=None, user=None) is Verdict.REFUSE
    assert Access({"chat": [GROUP]}, "ignore").check(chat=OTHER_GROUP) is Verdict.IGNORE
    with pytest.raises(TypeError):
        access.check(guild=1)
    with pytest.raises(ValueError):
        Access({}, "shout")


def test_settings_feed_the_rule(tiny_dir, tmp_path):
    settings = make_settings(tiny_dir, tmp_path, telegram={"allowed_user_ids": [ME], "refusal": "ignore"})
    assert telegram_access(settings.telegram).check(chat=STRANGER, user=STRANGER) is Verdict.IGNORE
    assert any("가" <= ch <= "힣" for ch in REFUSAL)


# ---- Telegram ----------------------------------------------------------------------------------------------------
async def run_telegram(tiny_dir, tmp_path, fake: FakeBotAPI, **telegram):
    settings = make_settings(tiny_dir, tmp_path, limits={"user_interval_s": 0},
                             telegram={"token": TOKEN, "base_url": fake.base_url, "base_file_url": fake.file_url, **telegram})
    stack = contextlib.AsyncExitStack()
    core = await stack.enter_async_context(running_core(settings))
    await stack.enter_async_context(telegram_running(core, fake))
    return stack.aclose




@pytest.mark.parametrize("refusal", ["reply", "ignore"])
async def test_telegram_allowlist(tiny_dir, tmp_path, refusal):
    fake = await FakeBotAPI(TOKEN).start()
    close = await run_telegram(tiny_dir, tmp_path, fake, allowed_chat_ids=[GROUP], allowed_user_ids=[ME], refusal=refusal)
    try:
        mine = fake.user_message(ME, "/gen 긍정 아 정말")
        in_group = fake.user_message(GROUP, "/gen 긍정 아 정말", user_id=STRANGER)
        stranger = fake.user_message(STRANGER, "/gen 긍정 아 정말")
        stranger_help = fake.user_message(STRANGER, "/help")
        other_group_chatter = fake.user_message(OTHER_GROUP, "/gen@OtherBot 긍정", user_id=STRANGER)
        await fake.wait_for(lambda: all(finished((fake.replies_to(m) or [{}])[0]) for m in (mine, in_group)))
        if refusal == "reply":
            await fake.wait_for(lambda: fake.replies_to(stranger) and fake.replies_to(stranger_help))
        await fake.settled()  # every update handled: an answer to the ignored ones would be here by now
        for m in (stranger, stranger_help):
            got = fake.replies_to(m)
            assert [r["text"] for r in got] == ([REFUSAL] if refusal == "reply" else [])
        assert fake.replies_to(other_group_chatter) == []  # not addressed to us: never answered
        assert len(fake.replies_to(mine)) == 1 and len(fake.replies_to(in_group)) == 1
    finally:
        await close()
        await fake.close()


# ---- Discord -----------------------------------------------------------------------------------------------------
async def test_discord_allowlist(tiny_dir, tmp_path):
    settings = make_settings(tiny_dir, tmp_path, limits={"user_interval_s": 0})
    engine = Engine(load_model(settings.model), settings)
    engine.start()
    core = BotCore.create(settings, engine)
    bot = await start_discord_bot(core, text_channels=2, members=1)
    config = dpytest.get_config()
    allowed, other = config.channels
    try:
        bot.access = Access({"guild": [], "channel": [allowed.id]}, "reply")
        await dpytest.message("!gen 긍정 아 정말 seed=1", channel=allowed)
        sent = dpytest.get_message()  # its first send may be a partial on a slow machine: read the final text
        assert "seed=1" in (await allowed.fetch_message(sent.id)).content
        # dpytest re-raises command errors after the bot's own handler has answered them.
        with pytest.raises(NotAllowed):
            await dpytest.message("!gen 긍정 아 정말", channel=other)
        assert dpytest.get_message().content == REFUSAL
        with pytest.raises(commands.CommandNotFound):
            await dpytest.message("!gne 긍정", channel=other)  # a near-miss gets no suggestion there either
        assert dpytest.verify().message().nothing()
        bot.access = Access({"guild": [], "channel": [allowed.id]}, "ignore")
        with pytest.raises(NotAllowed):
            await dpytest.message("!help", channel=other)
        assert dpytest.verify().message().nothing()
        # Slash commands: the tree's check answers the refusal, visible only to the user.
        answers: list[tuple[str, bool]] = []

        class Response:
            def is_done(self) -> bool:
                return False

            async def send_message(self, text: str, ephemeral: bool = False, **_: object) -> None:
                answers.append((text, ephemeral))

        interaction = type("I", (), {"guild_id": config.guilds[0].id, "channel_id": other.id, "response": Response(),
                                     "user": type("U", (), {"id": 99})()})()
        bot.access = Access({"guild": [], "channel": [allowed.id]}, "reply")
        assert await bot.tree.interaction_check(interaction) is False and answers == [(REFUSAL, True)]
        interaction.channel_id = allowed.id
        assert await bot.tree.interaction_check(interaction) is True
    finally:
        await dpytest.empty_queue()
        core.store.close()
        await engine.stop()


# ---- tokens ------------------------------------------------------------------------------------------------------
async def test_tokens_never_in_logs_replies_or_healthz(tiny_dir, tmp_path, caplog, monkeypatch):
    """Web, Telegram and Discord together at DEBUG (httpx included), with faults that make everyone log."""
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "telegram", "discord"):
        caplog.set_level(logging.DEBUG, logger=name)

    checked = asyncio.Event()  # the fake Discord refuses the token only once the web page has been read (issue 11.7)

    async def slow_refusal(request: web.Request) -> web.Response:  # a Discord that rejects the token after a while
        await checked.wait()
        return web.json_response({"message": "401: Unauthorized", "code": 0}, status=401)

    discord_app = web.Application()
    discord_app.router.add_route("*", "/{tail:.*}", slow_refusal)
    discord_runner = web.AppRunner(discord_app)
    await discord_runner.setup()
    site = web.TCPSite(discord_runner, "127.0.0.1", 0)
    await site.start()
    monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/api/v10")

    fake = await FakeBotAPI(TOKEN).start()
    fake.fail_next("sendMessage", status=502)
    fake.fail_next("getUpdates", drop=True)
    port = _free_port()
    settings = make_settings(
        tiny_dir, tmp_path, limits={"user_interval_s": 0}, web={"port": port},
        telegram={"token": TOKEN, "base_url": fake.base_url, "base_file_url": fake.file_url},
        discord={"token": DISCORD_TOKEN},
    )
    engine = Engine(load_model(settings.model), settings)
    engine.start()
    core = BotCore.create(settings, engine)
    runner = asyncio.create_task(run_front_ends(core, asyncio.Event()))
    try:
        await fake.wait_for(lambda: fake.called("getUpdates"))
        message = fake.user_message(ME, "/gen 긍정 아 정말")
        await fake.wait_for(lambda: any(finished(m) for m in fake.replies_to(message)))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                health = await resp.text()
            async with http.post(f"http://127.0.0.1:{port}/api", data=b"{bad") as resp:
                web_error = await resp.text()
        checked.set()
        await asyncio.wait_for(runner, 30)  # Discord refuses the token: that front end fails, the runner stops all
    finally:
        if not runner.done():
            runner.cancel()
        core.store.close()
        await engine.stop()
        await fake.close()
        await discord_runner.cleanup()
    assert "Discord 토큰이 올바르지 않습니다" in caplog.text  # the failure was logged, readably
    replies = json.dumps([m for (chat, _), m in fake.messages.items()], ensure_ascii=False)
    logged = caplog.text + "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "/getUpdates" in logged or "getUpdates" in logged  # DEBUG logs did see the URLs
    for secret in (TOKEN, DISCORD_TOKEN, TOKEN.split(":")[1]):
        assert secret not in logged, f"{secret[:6]}… in the logs"
        assert secret not in health and secret not in web_error and secret not in replies
