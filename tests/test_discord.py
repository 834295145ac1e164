"""The Discord front end, driven through real discord.py objects with dpytest (no network).

dpytest fakes the gateway and HTTP for messages but not interactions, so slash commands and buttons are called
through a small fake Interaction that records what the bot answers; the slash command tree itself is the real one.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import logging
import re
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import discord
import discord.ext.test as dpytest
import discord.ext.test.backend as dpytest_backend
import discord.ext.test.factories as dpytest_factories
import pytest
from conftest import make_settings
from discord.ext import commands
from helpers import held_after, start_discord_bot
from pydantic import SecretStr

import bot.discord_bot as discord_bot
import bot.discord_cog as discord_cog
import bot.discord_ui as discord_ui
from bot.discord_bot import create_bot
from bot.discord_ui import CONTINUE, REGENERATE, GenerationView
from core.chat_store import ChatStore
from core.engine import Engine
from core.followups import EXPIRED, button_data
from core.model_loading import load_model
from core.rate_limit import UserRateLimiter
from core.replies import APOLOGY
from core.service import BotCore

NONE_PAYLOAD = discord.AllowedMentions.none().to_dict()


def pings_nobody(allowed: dict) -> bool:
    return allowed.get("parse") == [] and not allowed.get("users") and not allowed.get("roles") and not allowed.get("replied_user")


# ---- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture
def settings(tiny_dir, tmp_path):
    # No cooldown here: most tests send several commands from one user; the cooldown has its own test.
    return make_settings(tiny_dir, tmp_path, limits={"user_interval_s": 0})


@pytest.fixture
def sent(monkeypatch):
    """Every message payload the bot builds (sends and edits), with the view it carried."""
    records: list[dict] = []
    real = discord.http.handle_message_parameters

    def recording(*args, **kwargs):
        params = real(*args, **kwargs)
        records.append({"payload": params.payload or {}, "view": kwargs.get("view")})
        return params

    monkeypatch.setattr(discord.abc, "handle_message_parameters", recording)
    monkeypatch.setattr(discord.message, "handle_message_parameters", recording)
    yield records
    for record in records:  # no view timeout task may outlive the test's event loop
        if isinstance(record["view"], discord.ui.View):
            record["view"].stop()


async def start_bot(core: BotCore, **kwargs) -> commands.Bot:
    return await start_discord_bot(core, **kwargs)


@pytest.fixture
async def dbot(core, sent):
    bot = await start_bot(core, edit_interval=discord_ui.EDIT_INTERVAL_S)
    yield bot
    await dpytest.empty_queue()


@asynccontextmanager
async def running_core(settings):
    engine = Engine(load_model(settings.model), settings)
    engine.start()
    bot_core = BotCore.create(settings, engine)
    try:
        yield bot_core
    finally:
        bot_core.store.close()
        await engine.stop()


async def say(content: str, **kwargs) -> None:
    """A user's message. dpytest re-raises every command error discord.py dispatches, including those the cog's
    error hook has already answered (a refusal is an answer): those are not failures here."""
    with contextlib.suppress(commands.CommandInvokeError, commands.CheckFailure):
        await dpytest.message(content, **kwargs)


async def answer(content: str, **kwargs) -> str:
    """The reply as it stands once the command is done: on a slow machine its first send may be a partial, edited
    later (issue 11.7), so read the message back instead of the first payload."""
    await say(content, **kwargs)
    sent = dpytest.get_message()
    return (await sent.channel.fetch_message(sent.id)).content


def channel(i: int = 0) -> discord.TextChannel:
    return dpytest.get_config().channels[i]


# ---- the prefix command ------------------------------------------------------------------------------------------
async def test_gen_replies_with_prompt_continuation_seed_and_buttons(dbot, sent):
    text = await answer("!gen 긍정 아 정말 top_p=0.9")
    assert text.startswith("**긍정 아 정말**")
    body, footer = text.rsplit("\n\nseed=", 1)
    seed, _, sure = footer.partition(" · ")
    assert len(body) > len("**긍정 아 정말**") and seed.isdigit()
    assert sure == ""  # best_of 1 is a plain sample: no score
    view = sent[-1]["view"]
    assert [b.label for b in view.children] == [REGENERATE, CONTINUE]
    assert view.timeout == discord_ui.VIEW_TIMEOUT_S
    # The same seed gives the same text: the knobs reach the engine.
    assert await answer(f"!gen 긍정 아 정말 top_p=0.9 seed={seed}") == text
    reranked = await answer("!gen 긍정 아 정말 best_of=2")
    sure = reranked.rsplit("\n\nseed=", 1)[1].partition(" · ")[2]
    assert sure.startswith("긍정 ") and sure.endswith("%")  # the pick's confidence: the model's own reading


async def test_bad_knob_gets_korean_error_naming_it_and_its_range(dbot, sent):
    text = await answer("!gen 부정 별로 top_p=2")
    assert "top_p" in text and "0 초과 1 이하" in text and "seed=" not in text
    assert sent[-1]["view"] is None


async def test_unknown_knob_and_empty_prompt_are_explained(dbot):
    assert "temperature" in await answer("!gen 긍정 아 tmep=0.9")  # did-you-mean
    assert "비어 있습니다" in await answer("!gen")


async def test_label_alias(dbot):
    assert (await answer("!gen pos 배우들 연기가 seed=1")).startswith("**긍정 배우들 연기가**")
    assert (await answer("!gen 👎 스토리가 seed=1")).startswith("**부정 스토리가**")


async def test_long_output_fits_discord_limit(tiny_dir, tmp_path, sent):
    # A 500-character prompt shown above each of 4 candidates is far past 2000 characters, and quick to generate.
    limits = {"user_interval_s": 0, "max_length": 256, "max_prompt_tokens": 250, "max_candidates": 4}
    async with running_core(make_settings(tiny_dir, tmp_path, limits=limits)) as big:
        await start_bot(big, edit_interval=0)
        prompt = ("정말 재밌다 " * 100)[:490].strip()
        await dpytest.message(f"!gen 긍정 {prompt} n=4 min_length=250 max_length=256 seed=1")
        await dpytest.empty_queue()
    contents = [record["payload"]["content"] for record in sent]
    assert len(contents) >= 2  # streamed edits and the final result
    assert all(0 < len(text) <= discord_ui.MESSAGE_LIMIT for text in contents)
    assert contents[-1].startswith("1. **긍정 정말 재밌다") and contents[-1].endswith("…")
    assert len(sent[-1]["view"].children) == 1 + 4  # regenerate + continue per candidate


async def test_concurrent_commands_from_several_users_are_all_answered(dbot):
    await asyncio.gather(*(dpytest.message(f"!gen 긍정 사용자{i} 님의 글 seed={i}", member=i) for i in range(3)))
    texts = {dpytest.get_message().content for _ in range(3)}
    assert {t.split("**")[1] for t in texts} == {f"긍정 사용자{i} 님의 글" for i in range(3)}
    assert dpytest.verify().message().nothing()


async def test_generated_text_never_pings(dbot, core, sent):
    # The bot's default (dpytest swaps the connection state, so look at a fresh bot) and every actual send.
    assert create_bot(core, sync_commands=False).allowed_mentions.to_dict() == NONE_PAYLOAD
    someone = dpytest.get_config().members[1].mention
    text = await answer(f"!gen 긍정 @everyone {someone} 안녕 seed=2 max_length=60")
    assert "@everyone" not in text and someone not in text  # shown, but defused
    assert "everyone" in text
    assert sent and all(pings_nobody(record["payload"]["allowed_mentions"]) for record in sent)


async def test_other_bots_and_itself_are_ignored(dbot):
    other = discord.ext.test.backend.make_user("OtherBot", 9)
    other.bot = True
    member = discord.ext.test.backend.make_member(other, dpytest.get_config().guilds[0])
    await dpytest.message("!gen 긍정 아 정말", member=member)
    own = dpytest.get_config().guilds[0].get_member(dbot.user.id)
    await dpytest.message("!gen 긍정 아 정말", member=own)
    assert dpytest.verify().message().nothing()


async def test_cooldown_per_user(core, sent):
    slow = dataclasses.replace(core, limiter=UserRateLimiter(30))
    await start_bot(slow)
    assert "seed=" in await answer("!gen 긍정 아 정말", member=0)
    assert "초 후에 다시 시도해 주세요" in await answer("!gen 긍정 아 정말", member=0)
    assert "seed=" in await answer("!gen 긍정 아 정말", member=1)  # per user, not per channel
    await dpytest.empty_queue()


async def test_set_settings_reset_persist_per_channel(dbot, core, settings):
    saved = await answer("!set top_p=0.5 temp=0.7")
    assert "top_p = 0.5" in saved and "temperature = 0.7" in saved
    assert "top_p = 0.5" in await answer("!settings")
    assert "top_p = 1.0" in await answer("!settings", channel=1)  # other channels keep the server defaults
    reopened = ChatStore(settings.store.path)  # it is in the SQLite file, not only in memory
    assert reopened.overrides(f"discord:{channel(0).id}") == {"top_p": 0.5, "temperature": 0.7}
    reopened.close()
    assert "top_p 값" in await answer("!set top_p=abc")
    assert "top_p = 1.0" in await answer("!reset")
    assert core.chat_knobs(f"discord:{channel(0).id}") == core.engine.defaults


async def test_streaming_edits_one_reply(core, sent):
    await start_bot(core, edit_interval=0)  # every partial result becomes an edit
    await dpytest.message("!gen 긍정 아 정말 min_length=60 max_length=60 seed=5")
    message = dpytest.get_message()
    assert dpytest.verify().message().nothing()  # one message, the rest are edits
    contents = [r["payload"].get("content") for r in sent]
    assert len(contents) > 2 and all(c.endswith(" ▌") for c in contents[:-1])
    final = (await channel(0).fetch_message(message.id)).content
    assert final == contents[-1] and "▌" not in final and "seed=5" in final
    assert isinstance(sent[-1]["view"], GenerationView)
    await dpytest.empty_queue()


async def test_unexpected_failure_gets_apology_not_traceback(dbot, core, monkeypatch):
    async def broken(prepared):
        raise RuntimeError("secret internals")
        yield  # pragma: no cover

    monkeypatch.setattr(core.engine, "stream", broken)
    text = await answer("!gen 긍정 아 정말")
    assert text.startswith(APOLOGY) and "요청 ID" in text and "secret internals" not in text


async def test_help_and_near_miss_commands(dbot):
    text = await answer("!help")
    assert "!gen [긍정|부정]" in text and "top_p" in text and len(text) <= discord_ui.MESSAGE_LIMIT
    with pytest.raises(commands.CommandNotFound):
        await dpytest.message("!gne 긍정 아")
    assert "!gen" in dpytest.get_message().content
    with pytest.raises(commands.CommandNotFound):
        await dpytest.message("!play some song")  # another bot's command: not ours to answer
    assert dpytest.verify().message().nothing()


# ---- slash commands and buttons (fake Interaction) ---------------------------------------------------------------
class FakeInteraction:
    """Records the answers; enough of discord.Interaction for the tree and the views to dispatch it."""

    type = discord.InteractionType.application_command

    def __init__(self, user_id: int = 1, channel_id: int = 10):
        self.user = SimpleNamespace(id=user_id, bot=False)
        self.guild_id = None
        self.guild = None
        self._state = None
        self.channel_id = channel_id
        self.data: dict = {}
        self.command_failed = False
        self.log: list[tuple[str, str | None, dict]] = []
        self._done = False
        self.response = SimpleNamespace(is_done=lambda: self._done, send_message=self._send, defer=self._defer)
        self.followup = SimpleNamespace(send=self._followup)

    async def _send(self, content=None, **kwargs):
        self._done = True
        self.log.append(("send", content, kwargs))

    async def _defer(self, **kwargs):
        self._done = True
        self.log.append(("defer", None, kwargs))

    async def _followup(self, content=None, **kwargs):
        self.log.append(("followup", content, kwargs))

    async def edit_original_response(self, *, content=None, **kwargs):
        self.log.append(("edit", content, kwargs))
        return SimpleNamespace(content=content)

    async def delete_original_response(self):
        self.log.append(("delete", None, {}))

    @property
    def command(self):
        return getattr(self, "_cs_command", None)

    def final(self) -> tuple[str, str | None, dict]:
        return self.log[-1]


async def slash(bot: commands.Bot, interaction: FakeInteraction, name: str, **options) -> None:
    """A slash command as Discord delivers it, through the real tree: the allowlist, the option transforms, the
    command and its cog's error hook."""
    params = {p.name: p for p in bot.tree.get_command(name).parameters}
    interaction.data = {"name": name, "type": 1, "options": [
        {"name": key, "type": params[key].type.value, "value": value} for key, value in options.items()]}
    await bot.tree._call(interaction)


async def press(view: discord.ui.View, item: discord.ui.Item, interaction: FakeInteraction) -> None:
    """A button press as discord.py dispatches it to its view (a failure goes to the view's on_error)."""
    interaction.type = discord.InteractionType.component
    interaction.data = {"custom_id": item.custom_id, "component_type": 2}
    await view._scheduled_task(item, interaction)


async def test_slash_options_carry_ranges_korean_descriptions_and_choices(dbot):
    names = {c.name for c in dbot.tree.get_commands()}
    assert names == {"gen", "set", "reset", "settings", "help", "model", "allow", "deny", "allowed", "stats"}
    gen = dbot.tree.get_command("gen")
    options = {p.name: p for p in gen.parameters}
    assert options["prompt"].required and not options["label"].required
    assert [c.value for c in options["label"].choices] == ["긍정", "부정"]
    assert (options["top_p"].min_value, options["top_p"].max_value) == (0, 1)
    assert options["top_p"].type is discord.AppCommandOptionType.number
    assert (options["max_length"].min_value, options["max_length"].max_value) == (1, 128)
    assert options["max_length"].type is discord.AppCommandOptionType.integer
    assert (options["n"].min_value, options["n"].max_value) == (1, 3)
    assert "0 초과 1 이하" in options["top_p"].description and "샘플링" in options["top_p"].description
    assert options["seed"].type is discord.AppCommandOptionType.string  # seeds go past Discord's 2**53
    payload = gen.to_dict(dbot.tree)  # what would be synced: valid for Discord's limits
    assert all(len(o["description"]) <= 100 and o["name"].islower() for o in payload["options"])
    set_options = {p.name for p in dbot.tree.get_command("set").parameters}
    assert set_options == set(options) - {"prompt", "label", "model"}


async def test_slash_ranges_follow_the_configured_limits(tiny_dir, tmp_path):
    settings = make_settings(tiny_dir, tmp_path, limits={"max_length": 64, "max_candidates": 5})
    async with running_core(settings) as small:
        bot = create_bot(small, sync_commands=False)
        await bot.add_cog(discord_cog.GenCog(bot, small))
        options = {p.name: p for p in bot.tree.get_command("gen").parameters}
    assert options["max_length"].max_value == 64 and options["n"].max_value == 5


async def test_slash_gen_defers_then_answers_with_buttons(dbot):
    interaction = FakeInteraction()
    await slash(dbot, interaction, "gen", prompt="아 정말", label="긍정", top_p=0.9, seed="42", best_of=2)
    assert interaction.log[0] == ("defer", None, {"thinking": True})
    kind, content, extra = interaction.final()
    assert kind == "edit" and content.startswith("**긍정 아 정말**")
    assert re.search(r"\n\nseed=\d+ · 긍정 \d+%$", content)  # the pick's seed and the model's reading of it
    assert pings_nobody(extra["allowed_mentions"].to_dict())
    assert [b.label for b in extra["view"].children] == [REGENERATE, CONTINUE]


async def test_slash_gen_errors_are_ephemeral_and_precise(dbot):
    for options, needle in [
        ({"min_length": 50, "max_length": 20}, "min_length"),
        ({"seed": "abc"}, "seed"),
        ({"top_p": 0.0}, "0 초과 1 이하"),  # Discord's min is inclusive; core holds the open bound
    ]:
        interaction = FakeInteraction()
        await slash(dbot, interaction, "gen", prompt="아 정말", **options)
        assert len(interaction.log) == 1, options
        kind, content, extra = interaction.final()
        assert kind == "send" and extra["ephemeral"] and needle in content


async def test_slash_set_settings_reset_help(dbot, core):
    interaction = FakeInteraction(channel_id=77)
    await slash(dbot, interaction, "set", top_k=5, temperature=0.5)
    assert "top_k = 5" in interaction.final()[1]
    assert core.chat_knobs("discord:77").temperature == 0.5
    interaction = FakeInteraction(channel_id=77)
    await slash(dbot, interaction, "set")
    assert "key=value" in interaction.final()[1]  # nothing to set: explained, not ignored
    interaction = FakeInteraction(channel_id=77)
    await slash(dbot, interaction, "settings")
    assert "top_k = 5" in interaction.final()[1]
    interaction = FakeInteraction(channel_id=77)
    await slash(dbot, interaction, "reset")
    assert core.chat_knobs("discord:77") == core.engine.defaults
    interaction = FakeInteraction(channel_id=77)
    await slash(dbot, interaction, "help")
    assert "/gen [긍정|부정]" in interaction.final()[1] and interaction.final()[2]["ephemeral"]


async def test_buttons_regenerate_and_continue(dbot):
    interaction = FakeInteraction()
    await slash(dbot, interaction, "gen", prompt="아 정말", label="부정", seed="3", max_length=15)
    first = interaction.final()[1]
    view = interaction.final()[2]["view"]
    regenerate, cont = view.children
    key = regenerate.custom_id.removeprefix("r:")
    assert (regenerate.custom_id, cont.custom_id) == (button_data(key), button_data(key, 0))  # the one payload helper

    again = FakeInteraction(user_id=2)
    await press(view, regenerate, again)
    assert again.log[0][0] == "defer" and again.final()[1].startswith("**부정 아 정말**")

    longer = FakeInteraction(user_id=3)
    await press(view, cont, longer)
    previous = first.split("**")[2].split("\n\nseed=")[0]
    assert longer.final()[1].startswith(f"**부정 아 정말{previous}**")  # the old text is the new prompt


async def test_expired_button_is_explained(dbot):
    cog = dbot.get_cog("GenCog")
    view = GenerationView("no-such-key", 1, cog.on_button, cog.cog_app_command_error)
    interaction = FakeInteraction()
    await press(view, view.children[0], interaction)
    assert interaction.log == [("send", EXPIRED, {"ephemeral": True, "allowed_mentions": discord_ui.NO_MENTIONS})]
    view.stop()


async def test_view_timeout_disables_buttons(dbot):
    cog = dbot.get_cog("GenCog")
    view = GenerationView("abcdefgh", 2, cog.on_button, cog.cog_app_command_error)
    edits = []

    async def edit(**kwargs):
        edits.append(kwargs)

    view.message = SimpleNamespace(edit=edit)
    await view.on_timeout()
    assert len(view.children) == 3 and all(item.disabled for item in view.children)
    assert edits == [{"view": view}]
    view.stop()


# ---- serve -------------------------------------------------------------------------------------------------------
async def test_serve_runs_until_stop_and_closes(core, monkeypatch):
    started, closed = asyncio.Event(), asyncio.Event()

    async def fake_start(self, token):  # like Client.start: runs until close()
        assert token == "not-a-real-token"
        started.set()
        await closed.wait()

    async def fake_close(self):
        closed.set()

    monkeypatch.setattr(discord_bot.GenBot, "start", fake_start)
    monkeypatch.setattr(discord_bot.GenBot, "close", fake_close)
    monkeypatch.setattr(discord_bot.GenBot, "is_closed", lambda self: closed.is_set())
    with_token = dataclasses.replace(core, settings=make_settings_with_token(core))
    stop = asyncio.Event()
    task = asyncio.create_task(discord_bot.serve(with_token, stop))
    await asyncio.wait_for(started.wait(), 5)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert closed.is_set()


async def test_serve_bad_token_is_a_readable_error(core, monkeypatch):
    async def fake_start(self, token):
        raise discord.LoginFailure("Improper token has been passed.")

    monkeypatch.setattr(discord_bot.GenBot, "start", fake_start)
    with_token = dataclasses.replace(core, settings=make_settings_with_token(core))
    with pytest.raises(RuntimeError) as info:
        await asyncio.wait_for(discord_bot.serve(with_token, asyncio.Event()), 5)
    assert "토큰" in str(info.value) and "not-a-real-token" not in str(info.value)


def make_settings_with_token(core: BotCore):
    return core.settings.model_copy(
        update={"discord": core.settings.discord.model_copy(update={"token": SecretStr("not-a-real-token")})}
    )


# ---- structure: one error hook per kind, the tree as a subclass, no import cycle -----------------------------------
async def test_slash_failure_is_answered_once_by_the_cogs_hook(dbot, core, monkeypatch, caplog):
    assert type(dbot.tree) is discord_bot.GenTree and all(c.binding is dbot.get_cog("GenCog")
                                                          for c in dbot.tree.get_commands())

    async def broken(prepared):
        raise RuntimeError("secret internals")
        yield  # pragma: no cover

    monkeypatch.setattr(core.engine, "stream", broken)
    interaction = FakeInteraction()
    with caplog.at_level(logging.ERROR):
        await slash(dbot, interaction, "gen", prompt="아 정말")
    answers = [entry for entry in interaction.log if entry[0] in ("send", "followup")]
    assert len(answers) == 1 and answers[0][1].startswith(APOLOGY) and "secret" not in answers[0][1]
    assert not any("Ignoring exception" in r.getMessage() for r in caplog.records)  # the tree did not log it again


def test_ui_module_does_not_import_the_cog():
    tree = ast.parse(Path(discord_ui.__file__).read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "bot.discord_cog" not in imported and "bot.discord_bot" not in imported


# ---- reply to continue -----------------------------------------------------------------------------------------
async def reply_to(target: discord.Message, content: str, member: int = 0) -> discord.Message | None:
    """A user's reply to `target`, as the gateway delivers it (dpytest's message() makes no replies); returns the
    bot's answer as it stands once handled, or None when it did not answer."""
    config = dpytest.get_config()
    chan = target.channel
    data = dpytest_factories.make_message_dict(chan, config.members[member], content=content,
                                               mentions=dpytest_backend.find_user_mentions(content, chan.guild))
    data["message_reference"] = {"message_id": target.id, "channel_id": chan.id, "guild_id": chan.guild.id}
    dpytest_backend.get_state().parse_message_create(data)
    await dpytest.runner.run_all_events()
    while not dpytest.runner.error_queue.empty():  # errors the cog's hook answered (see `say`)
        error = (await dpytest.runner.error_queue.get())[1]
        if not isinstance(error, (commands.CommandInvokeError, commands.CheckFailure, commands.CommandNotFound)):
            raise error
    if dpytest.verify().message().nothing():
        return None
    sent = dpytest.get_message()
    return await chan.fetch_message(sent.id)


def head(content: str) -> str:
    return discord_ui.unescape(content.split("**")[1])


async def test_gen_as_a_reply_continues_the_result(dbot, core):
    await say("!gen 부정 배우들 *연기*가 seed=4 max_length=12")
    first = await channel(0).fetch_message(dpytest.get_message().id)
    shown = discord_ui.unescape(first.content).split("\n\nseed=")[0]
    more = await reply_to(first, "!gen 그래서 top_k=5")
    assert head(more.content) == f"{shown} 그래서" and "seed=" in more.content
    assert isinstance(first.content, str) and "\\*연기\\*" in first.content  # markdown was escaped, and read back


async def test_reply_with_a_mention_continues_even_a_result_from_before_a_restart(dbot, core):
    await say("!gen 긍정 아 정말 max_length=10")
    first = await channel(0).fetch_message(dpytest.get_message().id)
    shown = discord_ui.unescape(first.content).split("\n\nseed=")[0]
    core.followups._results.clear()  # nothing remembered: the text comes from the message
    more = await reply_to(first, f"{dbot.user.mention} 더 써 줘 seed=3")
    assert head(more.content) == f"{shown} 더 써 줘" and "seed=3" in more.content
    assert await reply_to(first, "그냥 답장") is None  # no mention, no command: someone talking, not to us


async def test_reply_to_a_message_that_is_not_a_result(dbot):
    await say("!help")
    help_message = await channel(0).fetch_message(dpytest.get_message().id)
    assert "생성 결과가 아닙니다" in (await reply_to(help_message, f"{dbot.user.mention} 이어서")).content
    fresh = await reply_to(help_message, "!gen 긍정 새 글")  # !gen replying to help is a plain !gen
    assert head(fresh.content) == "긍정 새 글"


# ---- stop ------------------------------------------------------------------------------------------------------
async def until(predicate) -> None:
    """Yield to the event loop until `predicate()` holds (a hang is caught by the bound, not by a clock)."""
    for _ in range(100_000):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


async def test_stop_button_keeps_the_text_so_far_for_the_asker_only(core, sent):
    bot = await start_bot(core, edit_interval=0)
    with held_after(core.engine, 3):  # the reply is still streaming when pressed
        asker = FakeInteraction(user_id=1)
        task = asyncio.create_task(slash(bot, asker, "gen", prompt="아 정말", label="긍정", min_length=100,
                                         max_length=100, seed="2"))
        await until(lambda: any(isinstance(e[2].get("view"), discord_ui.StopView) for e in asker.log))
        view = next(e[2]["view"] for e in asker.log if isinstance(e[2].get("view"), discord_ui.StopView))
        (button,) = view.children
        assert button.custom_id.startswith("s:") and button.label == discord_ui.STOP
        other = FakeInteraction(user_id=2)
        await press(view, button, other)
        assert "요청한 사람만" in other.final()[1] and other.final()[2]["ephemeral"]
        mine = FakeInteraction(user_id=1)
        await press(view, button, mine)
        assert "멈추는 중" in mine.final()[1]
        await asyncio.wait_for(task, 30)
        assert core.engine.telemetry.metrics.requests.labels("discord", "cancelled")._value.get() == 1
    kind, content, extra = asker.final()
    assert kind == "edit" and content.endswith("seed=2 · ⏹ 중지됨 (stopped)") and extra["view"] is None
    assert view.is_finished()  # the stream's one stop view ended with it
