"""Admins at run time: the stored allowlists (seeded from the settings), the daily quota and /stats, in core and
through Telegram (fake Bot API) and Discord (dpytest)."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime

import discord.ext.test as dpytest
import pytest
from conftest import make_settings, running_core, telegram_running
from discord.ext import commands
from fake_bot_api import FakeBotAPI, finished
from helpers import start_discord_bot
from test_discord import FakeInteraction, slash

from bot.discord_bot import create_bot
from core import admin
from core.access import REFUSAL, StoredAccess, Verdict
from core.chat_store import ChatStore

TOKEN = "123456789:AAF-secret_TokenValue-xyz"
ADMIN, MEMBER, STRANGER, GROUP = 1001, 2002, 3003, -100500


# ---- core --------------------------------------------------------------------------------------------------------
def test_stored_allowlists_are_seeded_changed_and_kept(tmp_path):
    path = tmp_path / "store.sqlite3"
    store = ChatStore(path)
    access = StoredAccess(store, "telegram", {"chat": [GROUP], "user": []})
    assert access.check(chat=GROUP, user=STRANGER) is Verdict.ALLOW  # seeded from the settings' list
    assert access.check(chat=None, user=STRANGER) is Verdict.REFUSE
    access.set("user", STRANGER, True)
    access.set("chat", GROUP, False)
    assert access.check(chat=None, user=STRANGER) is Verdict.ALLOW
    assert access.check(chat=GROUP, user=MEMBER) is Verdict.REFUSE  # denied beats allowed
    store.close()
    reopened = ChatStore(path)  # a restart: the settings seed again, but the admin's denial stands
    again = StoredAccess(reopened, "telegram", {"chat": [GROUP], "user": []})
    assert again.check(chat=GROUP, user=MEMBER) is Verdict.REFUSE and again.check(chat=1, user=STRANGER) is Verdict.ALLOW
    assert StoredAccess(reopened, "discord", {"guild": [], "channel": []}).check(guild=1, channel=2) is Verdict.ALLOW
    reopened.close()


def test_open_bot_can_still_ban_one_user(tmp_path):
    store = ChatStore(tmp_path / "s.sqlite3")
    access = StoredAccess(store, "telegram", {"chat": [], "user": []})
    access.set("user", STRANGER, False)
    assert access.check(chat=5, user=STRANGER) is Verdict.REFUSE and access.check(chat=5, user=MEMBER) is Verdict.ALLOW
    store.close()


def test_quota_text_says_when_it_resets():
    text = admin.quota_text(5, datetime(2026, 12, 5, 21, 30, tzinfo=UTC))
    assert "5회" in text and "2시간 30분" in text and "00:00 UTC" in text


def test_stats_from_log_rows():
    rows = [("2026-12-04", "telegram", "telegram:1", "admitted", None), ("2026-12-04", "telegram", "telegram:1", "ok", 1.0),
            ("2026-12-05", "telegram", "telegram:1", "admitted", None), ("2026-12-05", "telegram", "telegram:1", "ok", 3.0),
            ("2026-12-05", "discord", "discord:2", "admitted", None), ("2026-12-05", "discord", "discord:2", "ok", 2.0),
            ("2026-12-05", "discord", "discord:2", "rate_limited", None), ("2026-12-05", "web", None, "user_error", None)]
    text = admin.render_stats(rows)
    assert "• 2026-12-04: 1" in text and "• 2026-12-05: 2" in text
    assert "rate_limited 1" in text and "user_error 1" in text and "2.00초 (3건)" in text
    assert "telegram:1 2, discord:2 1" in text


@pytest.mark.parametrize("args, expected", [("", ("chat", GROUP)), ("user 42", ("user", 42)), ("CHAT -5", ("chat", -5))])
def test_allow_arguments(args, expected):
    assert admin.parse_target(args, ("chat", "user"), {"chat": GROUP, "user": 7}) == expected


@pytest.mark.parametrize("args", ["user", "user abc", "group 5", "user 1 2"])
def test_bad_allow_arguments_are_explained(args):
    with pytest.raises(Exception, match="사용법"):
        admin.parse_target(args, ("chat", "user"), {"chat": GROUP})


# ---- Telegram ----------------------------------------------------------------------------------------------------
@pytest.fixture
async def fake():
    api = await FakeBotAPI(TOKEN, username="ThisBot").start()
    yield api
    await api.close()


def admin_settings(tiny_dir, tmp_path, fake, **limits):
    return make_settings(tiny_dir, tmp_path, limits={"user_interval_s": 0, **limits}, telegram={
        "token": TOKEN, "base_url": fake.base_url, "base_file_url": fake.file_url, "admin_user_ids": [ADMIN],
        "allowed_chat_ids": [GROUP]})


async def say(fake: FakeBotAPI, chat_id: int, text: str, final: bool = False) -> str:
    message = fake.user_message(chat_id, text)
    await fake.wait_for(lambda: any(not final or finished(m) for m in fake.replies_to(message)))
    return fake.replies_to(message)[0]["text"]


async def test_admins_manage_the_allowlists_in_chat_and_it_survives_a_restart(tiny_dir, tmp_path, fake):
    settings = admin_settings(tiny_dir, tmp_path, fake)
    async with running_core(settings) as core, telegram_running(core, fake):
        assert "관리자만" in await say(fake, GROUP, "/allow user 2002")  # a group member, not an admin
        assert await say(fake, MEMBER, "/gen 긍정 아") == REFUSAL  # private chats are outside the list
        assert "user 2002" in await say(fake, ADMIN, "/allow user 2002")  # the admin, anywhere
        assert "seed=" in await say(fake, MEMBER, "/gen 긍정 아", final=True)
        listed = await say(fake, ADMIN, "/allowed")
        assert f"chat {GROUP}" in listed and "user 2002" in listed
        assert "/allow" in await say(fake, GROUP, "/help")  # admins configured: the help lists their commands
        denied = await say(fake, ADMIN, f"/deny chat {GROUP}")
        assert f"• chat {GROUP}" in denied.split("차단 목록")[1]
        assert await say(fake, GROUP, "/gen 긍정 아") == REFUSAL
        refused = core.engine.telemetry.metrics.requests.labels("telegram", "not_allowed")._value.get()
        assert refused >= 3  # the non-admin's /allow and the refusals were counted
    async with running_core(settings) as core, telegram_running(core, fake):  # restarted: the store remembers
        assert await say(fake, GROUP, "/gen 긍정 아") == REFUSAL
        assert "seed=" in await say(fake, MEMBER, "/gen 긍정 아", final=True)
        assert "seed=" in await say(fake, ADMIN, "/gen 긍정 아", final=True)  # admins are never refused


async def test_daily_quota_and_stats_survive_a_restart(tiny_dir, tmp_path, fake):
    settings = admin_settings(tiny_dir, tmp_path, fake, daily_requests_per_user=2)
    async with running_core(settings) as core, telegram_running(core, fake):
        for _ in range(2):
            assert "seed=" in await say(fake, GROUP, "/gen 긍정 아 정말", final=True)
        over = await say(fake, GROUP, "/gen 긍정 아 정말")
        assert "2회를 모두 썼습니다" in over and "UTC" in over
        assert core.engine.telemetry.metrics.requests.labels("telegram", "quota")._value.get() == 1
        assert "관리자만" in await say(fake, GROUP, "/stats")
    async with running_core(settings) as core, telegram_running(core, fake):
        stats = await say(fake, ADMIN, "/stats")
    assert f"• {admin.today()}: 2" in stats and "quota 1" in stats and "not_allowed 1" in stats
    assert "(2건)" in stats and "telegram:777 2" in stats  # two latencies; the group's sender (fake user 777)


# ---- Discord -----------------------------------------------------------------------------------------------------
async def dsay(content: str, member: int = 0) -> str:
    with contextlib.suppress(commands.CommandInvokeError, commands.CheckFailure):
        await dpytest.message(content, member=member)
    sent = dpytest.get_message()
    return (await sent.channel.fetch_message(sent.id)).content


async def test_discord_admin_commands(tiny_dir, tmp_path):
    settings = make_settings(tiny_dir, tmp_path, limits={"user_interval_s": 0})
    async with running_core(settings) as core:
        bot = await start_discord_bot(core, text_channels=1, members=2)
        try:
            boss, other = dpytest.get_config().members
            channel = dpytest.get_config().channels[0]
            bot.conversation.admins = frozenset({f"discord:{boss.id}"})  # as admin_user_ids would (ids are made here)
            assert "관리자만" in await dsay("!deny", member=1)
            assert f"channel {channel.id}" in (await dsay("!deny", member=0)).split("차단 목록")[1]
            assert await dsay("!gen 긍정 아", member=1) == REFUSAL
            assert "seed=" in await dsay("!gen 긍정 아 seed=1", member=0)  # the admin still can
            assert f"channel {channel.id}" in (await dsay("!allow", member=0)).split("차단 목록")[0]
            assert "seed=" in await dsay("!gen 긍정 아 seed=1", member=1)
            assert "busiest" in await dsay("!stats", member=0)
            assert "!allow" in await dsay("!help", member=0)
            command = bot.tree.get_command("allow")
            assert [c.value for c in next(p for p in command.parameters if p.name == "kind").choices] == ["channel", "guild"]
            guild = dpytest.get_config().guilds[0]
            theirs = FakeInteraction(user_id=other.id, channel_id=channel.id)
            await slash(bot, theirs, "stats")
            assert "관리자만" in theirs.final()[1] and theirs.final()[2]["ephemeral"]
            mine = FakeInteraction(user_id=boss.id, channel_id=channel.id)
            await slash(bot, mine, "deny", kind="guild", id=str(guild.id))
            _, text, extra = mine.final()
            assert extra["ephemeral"] and f"guild {guild.id}" in text.split("차단 목록")[1]
            theirs = FakeInteraction(user_id=other.id, channel_id=channel.id)
            theirs.guild_id = guild.id
            await slash(bot, theirs, "gen", prompt="아")
            assert theirs.final()[1] == REFUSAL  # the tree's check, from the store
        finally:
            await dpytest.empty_queue()


def test_discord_admins_come_from_the_settings(tiny_dir, tmp_path, core):
    settings = make_settings(tiny_dir, tmp_path, discord={"admin_user_ids": [123]})
    bot = create_bot(type(core)(settings, core.engine, core.store, core.limiter, core.followups), sync_commands=False)
    assert bot.conversation.admins == frozenset({"discord:123"})


def test_old_log_rows_are_pruned(tmp_path):
    store = ChatStore(tmp_path / "s.sqlite3")
    store.log_request("2000-01-01", "telegram", "telegram:1", "admitted")
    store.log_request(admin.today(), "telegram", "telegram:1", "admitted")
    store.prune_log(admin.since(31))
    assert [row[0] for row in store.request_rows("1999-01-01")] == [admin.today()]
    store.close()
