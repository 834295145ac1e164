"""Discord front end (discord.py 2): `!gen` with the shared grammar, `/gen` with typed ranged options, buttons.

The prefix command reads message text, so it needs the privileged **Message Content** intent (enable it under
Bot → Privileged Gateway Intents in the Developer Portal). Slash commands, buttons and `@bot gen …` mentions work
without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Optional

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from core.access import Access, Verdict, discord_access
from core.conversation import Buttons, Conversation, Reply, Style, Who, error_text
from core.errors import NotAllowed as Refused
from core.grammar import NEGATIVE, POSITIVE
from core.knobs import KnobSpec, knob_specs
from core.replies import help_text, render_knobs, shorten
from core.service import BotCore
from core.types import PreparedRequest

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000  # Discord's message length
EDIT_INTERVAL_S = 1.0  # Discord allows about 5 edits per 5 s per channel; one a second leaves room for others
VIEW_TIMEOUT_S = 600.0  # buttons end before the 15-minute interaction token does, so the view can still be edited
DEFAULT_PREFIX = "!"
NO_MENTIONS = discord.AllowedMentions.none()  # generated text must never ping (discord.py allows @everyone)
REGENERATE, CONTINUE = "다시 생성", "이어 쓰기"
SEED_MAX_CHARS = 19  # 2**63 - 1 has 19 digits
REPLY_GRACE_S = 10.0  # at shutdown (after the engine's drain), how long replies being sent may take


class NotAllowed(commands.CheckFailure):
    """The server or channel is outside the allowlists (core's refusal, as discord.py's check failure)."""

    def __init__(self, refused: Refused):
        super().__init__(str(refused))
        self.refused = refused


# ---- translation -------------------------------------------------------------------------------------------------
def escape(text: str) -> str:
    """Model output and prompts are shown literally: no markdown, no live mentions."""
    return discord.utils.escape_markdown(discord.utils.escape_mentions(text))


def fit(text: str) -> str:
    return shorten(text, MESSAGE_LIMIT)


STYLE = Style(MESSAGE_LIMIT, escape=escape, emphasize=lambda s: f"**{s}**", notice=fit)


def who(guild_id: int | None, channel_id: int | None, user_id: int | None) -> Who:
    return Who(chat=f"discord:{channel_id}", user=None if user_id is None else f"discord:{user_id}",
               ids={"guild": guild_id, "channel": channel_id})


def knobs_block(title: str, text: str) -> str:
    return fit(f"{title}\n```\n{text}\n```")


class ChannelTarget:
    """A prefix command's answer (core.conversation.ReplyTarget): a reply to the command, edited afterwards."""

    def __init__(self, cog: GenCog, ctx: commands.Context):
        self.cog, self.ctx = cog, ctx
        self.style, self.edit_interval = STYLE, cog.edit_interval
        self.message: discord.Message | None = None

    async def send(self, reply: Reply) -> None:
        view = self.cog.view(reply.buttons)
        self.message = await answer(self.ctx, reply.text, **({"view": view} if view else {}))
        if view is not None:
            view.message = self.message

    async def edit(self, reply: Reply) -> None:
        view = self.cog.view(reply.buttons)
        self.message = await self.message.edit(content=fit(reply.text), view=view, allowed_mentions=NO_MENTIONS)
        if view is not None:
            view.message = self.message

    async def typing(self) -> None:
        """`ctx.typing()` around the whole reply keeps it shown."""

    def spare(self) -> bool:
        return True


class InteractionTarget:
    """A deferred interaction's answer: the "thinking…" message is edited; an error is shown only to the user."""

    def __init__(self, cog: GenCog, interaction: discord.Interaction):
        self.cog, self.interaction = cog, interaction
        self.style, self.edit_interval = STYLE, cog.edit_interval

    async def send(self, reply: Reply) -> None:
        if reply.error:
            with contextlib.suppress(discord.HTTPException):
                await self.interaction.delete_original_response()
            await self.interaction.followup.send(fit(reply.text), ephemeral=True, allowed_mentions=NO_MENTIONS)
            return
        view = self.cog.view(reply.buttons)
        message = await self.interaction.edit_original_response(content=fit(reply.text), view=view,
                                                                allowed_mentions=NO_MENTIONS)
        if view is not None:
            view.message = message

    edit = send

    async def typing(self) -> None:
        """The deferred "thinking…" already shows activity."""

    def spare(self) -> bool:
        return True


async def answer(ctx: commands.Context, text: str, **kwargs: object) -> discord.Message:
    # Still answer when the command message was deleted meanwhile.
    reference = ctx.message.to_reference(fail_if_not_exists=False)
    return await ctx.send(fit(text), reference=reference, mention_author=False, allowed_mentions=NO_MENTIONS, **kwargs)


async def refuse(interaction: discord.Interaction, text: str) -> None:
    """An ephemeral answer, whether or not the interaction was already acknowledged."""
    if interaction.response.is_done():
        await interaction.followup.send(fit(text), ephemeral=True, allowed_mentions=NO_MENTIONS)
    else:
        await interaction.response.send_message(fit(text), ephemeral=True, allowed_mentions=NO_MENTIONS)


class GenerationView(discord.ui.View):
    """다시 생성 (regenerate) and 이어 쓰기 (continue, one button per candidate) under a result."""

    def __init__(self, cog: GenCog, key: str, candidates: int, timeout: float = VIEW_TIMEOUT_S):
        super().__init__(timeout=timeout)
        self.message: discord.Message | None = None
        self._button(REGENERATE, discord.ButtonStyle.primary, cog, key, None)
        for i in range(candidates):
            self._button(CONTINUE if candidates == 1 else f"{CONTINUE} {i + 1}", discord.ButtonStyle.secondary, cog, key, i)

    def _button(self, label: str, style: discord.ButtonStyle, cog: GenCog, key: str, candidate: int | None) -> None:
        button: discord.ui.Button = discord.ui.Button(label=label, style=style)
        data = f"r:{key}" if candidate is None else f"c:{key}:{candidate}"
        button.callback = functools.partial(cog.on_button, data=data)
        self.add_item(button)

    async def on_timeout(self) -> None:
        # Grey the buttons out so nobody clicks a dead view; the message may be gone, which is fine.
        for item in self.children:
            item.disabled = True
        if self.message is not None:
            with contextlib.suppress(discord.HTTPException):
                await self.message.edit(view=self)


# ---- slash commands, generated from the knob table (a new knob becomes an option by itself) -----------------------
LABEL_CHOICES = [app_commands.Choice(name=POSITIVE, value=POSITIVE), app_commands.Choice(name=NEGATIVE, value=NEGATIVE)]


def _knob_parameter(spec: KnobSpec) -> inspect.Parameter:
    if spec.name == "seed":
        # Discord integer options stop at 2**53, but shown seeds reach 2**63-1: take text, core checks the range.
        annotation = app_commands.Range[str, 1, SEED_MAX_CHARS]
    else:
        annotation = app_commands.Range[spec.kind, spec.kind(spec.low), spec.kind(spec.high)]
    return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[annotation])


def build_slash(name: str, description: str, callback: Callable[..., Awaitable[None]], specs: Mapping[str, KnobSpec],
                head: list[inspect.Parameter] = (), head_descriptions: Mapping[str, str] | None = None,
                choices: Mapping[str, list[app_commands.Choice]] | None = None) -> app_commands.Command:
    """A slash command whose knob options carry today's ranges from `[limits]` (read from the signature when the
    command is built, so the signature is assembled here at run time)."""

    async def invoke(interaction: discord.Interaction, **options: object) -> None:
        await callback(interaction, **options)

    interaction = inspect.Parameter("interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=discord.Interaction)
    invoke.__signature__ = inspect.Signature([interaction, *head, *(_knob_parameter(s) for s in specs.values())])
    described = {s.name: f"{s.help_ko} — {s.range_ko()}"[:100] for s in specs.values()}  # Discord's cap is 100
    invoke = app_commands.describe(**(head_descriptions or {}), **described)(invoke)
    if choices:
        invoke = app_commands.choices(**choices)(invoke)
    return app_commands.Command(name=name, description=description, callback=invoke)


# ---- the cog -----------------------------------------------------------------------------------------------------
def answers_errors(command: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """A refused request is an answer, not a failed command: map it here (bot.report), so discord.py does not log
    it as an error and dispatch it again."""

    @functools.wraps(command)
    async def wrapped(self: GenCog, ctx: commands.Context, *args: object, **kwargs: object) -> None:
        try:
            await command(self, ctx, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 (mapped to a reply)
            await self.bot.report(ctx, exc)

    return wrapped


class GenCog(commands.Cog):
    """Every command, prefix and slash: translate, hand to the conversation, map errors to replies."""

    def __init__(self, bot: commands.Bot, core: BotCore, edit_interval: float = EDIT_INTERVAL_S):
        self.bot, self.core, self.edit_interval = bot, core, edit_interval
        self.conversation: Conversation = bot.conversation
        self.specs = knob_specs(core.settings.limits)
        head = [inspect.Parameter("prompt", inspect.Parameter.KEYWORD_ONLY, annotation=str),
                inspect.Parameter("label", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[str])]
        self._dynamic = [
            build_slash("gen", "감성을 골라 한국어 문장을 이어 씁니다 (generate Korean text in a sentiment)",
                        self._guarded(self.gen_slash), self.specs, head,
                        {"prompt": "이어 쓸 문장 (예: 아 정말)", "label": "감성 라벨: 긍정 또는 부정 (생략하면 프롬프트 그대로 이어 씀)"},
                        {"label": LABEL_CHOICES}),
            build_slash("set", "이 채널의 기본 설정을 바꿉니다 (set this channel's defaults)", self._guarded(self.set_slash),
                        self.specs),
        ]
        self.active: set[asyncio.Task] = set()  # generations being shown; shutdown lets them send their replies

    async def cog_load(self) -> None:
        for command in self._dynamic:
            self.bot.tree.add_command(command, override=True)

    async def cog_unload(self) -> None:
        for command in self._dynamic:
            self.bot.tree.remove_command(command.name)

    def view(self, buttons: Buttons | None) -> GenerationView | None:
        return None if buttons is None else GenerationView(self, buttons.key, buttons.candidates)

    async def reply(self, target: ChannelTarget | InteractionTarget, prepared: PreparedRequest) -> None:
        task = asyncio.current_task()
        self.active.add(task)
        try:
            await self.conversation.reply(target, prepared, "discord generation")
        finally:
            self.active.discard(task)

    # ---- the one error → reply mapping for interactions (the tree's error hook and the guards end here) --------
    async def app_error(self, interaction: discord.Interaction, error: BaseException) -> None:
        text = error_text(error, f"discord interaction {getattr(interaction.command, 'name', 'button')}")
        if text is not None:
            with contextlib.suppress(discord.HTTPException):
                await refuse(interaction, text)

    def _guarded(self, callback: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        """Generated slash callbacks and buttons report through app_error (discord.py would only log a button's)."""

        async def guarded(interaction: discord.Interaction, **kwargs: object) -> None:
            try:
                await callback(interaction, **kwargs)
            except Exception as exc:  # noqa: BLE001 (mapped to a reply)
                await self.app_error(interaction, exc)

        return guarded

    def who(self, interaction: discord.Interaction) -> Who:
        return who(interaction.guild_id, interaction.channel_id, interaction.user.id)

    def help_for(self, channel_id: int, command: str) -> str:
        prefix = self.bot.command_prefix_text
        body = help_text(self.core.chat_knobs(f"discord:{channel_id}"), self.core.settings.limits, command,
                         steered=self.core.engine.sentiment)
        return fit(body + f"\n\n채널 기본값: {prefix}set key=value … · {prefix}settings · {prefix}reset (또는 /set, /settings, "
                   f"/reset)\n슬래시 명령 /gen 은 같은 설정을 입력 칸으로 받습니다. 결과 아래 버튼: {REGENERATE} · {CONTINUE}")

    def show_settings(self, channel_id: int, title: str = "이 채널의 기본 설정 (current defaults):") -> str:
        return knobs_block(title, render_knobs(self.core.chat_knobs(f"discord:{channel_id}")))

    # ---- prefix commands ---------------------------------------------------------------------------------------
    @commands.command(name="gen", aliases=["생성"])
    @answers_errors
    async def gen_prefix(self, ctx: commands.Context, *, args: str = "") -> None:
        """!gen [긍정|부정] 프롬프트 [key=value …]"""
        prepared = self.conversation.from_text(args, who(ctx.guild and ctx.guild.id, ctx.channel.id, ctx.author.id))
        async with ctx.typing():
            await self.reply(ChannelTarget(self, ctx), prepared)

    @commands.command(name="help", aliases=["도움말"])
    @answers_errors
    async def help_prefix(self, ctx: commands.Context) -> None:
        await answer(ctx, self.help_for(ctx.channel.id, f"{self.bot.command_prefix_text}gen"))

    @commands.command(name="set")
    @answers_errors
    async def set_prefix(self, ctx: commands.Context, *, args: str = "") -> None:
        self.core.set_chat_knobs(args, f"discord:{ctx.channel.id}")
        await answer(ctx, self.show_settings(ctx.channel.id, "이 채널의 기본 설정을 바꿨습니다 (saved):"))

    @commands.command(name="settings")
    @answers_errors
    async def settings_prefix(self, ctx: commands.Context) -> None:
        await answer(ctx, self.show_settings(ctx.channel.id))

    @commands.command(name="reset")
    @answers_errors
    async def reset_prefix(self, ctx: commands.Context) -> None:
        self.core.reset_chat_knobs(f"discord:{ctx.channel.id}")
        await answer(ctx, self.show_settings(ctx.channel.id, "이 채널의 기본 설정을 초기화했습니다 (reset):"))

    # ---- slash commands and buttons ----------------------------------------------------------------------------
    async def gen_slash(self, interaction: discord.Interaction, prompt: str, label: str | None = None, **knobs: object) -> None:
        # Typed options go to the core as fields: the prompt is never re-read for `key=value`.
        prepared = self.conversation.from_fields({"prompt": prompt, "label": label, **knobs}, self.who(interaction))
        await interaction.response.defer(thinking=True)  # before Discord's 3-second deadline
        await self.reply(InteractionTarget(self, interaction), prepared)

    async def set_slash(self, interaction: discord.Interaction, **knobs: object) -> None:
        self.core.set_chat_fields(knobs, f"discord:{interaction.channel_id}")
        text = self.show_settings(interaction.channel_id, "이 채널의 기본 설정을 바꿨습니다 (saved):")
        await interaction.response.send_message(text, allowed_mentions=NO_MENTIONS)

    @app_commands.command(name="help", description="사용법과 설정 범위 (usage and knob ranges)")
    async def help_slash(self, interaction: discord.Interaction) -> None:
        text = self.help_for(interaction.channel_id, "/gen")
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_MENTIONS)

    @app_commands.command(name="settings", description="이 채널의 기본 설정 보기 (show this channel's defaults)")
    async def settings_slash(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(self.show_settings(interaction.channel_id), allowed_mentions=NO_MENTIONS)

    @app_commands.command(name="reset", description="이 채널의 기본 설정 초기화 (reset this channel's defaults)")
    async def reset_slash(self, interaction: discord.Interaction) -> None:
        self.core.reset_chat_knobs(f"discord:{interaction.channel_id}")
        text = self.show_settings(interaction.channel_id, "이 채널의 기본 설정을 초기화했습니다 (reset):")
        await interaction.response.send_message(text, allowed_mentions=NO_MENTIONS)

    async def on_button(self, interaction: discord.Interaction, *, data: str) -> None:
        try:
            prepared = self.conversation.from_button(data, self.who(interaction))
        except Exception as exc:  # noqa: BLE001 (mapped to a reply)
            await self.app_error(interaction, exc)
            return
        await interaction.response.defer(thinking=True)  # a new message below, so the earlier result stays
        await self.reply(InteractionTarget(self, interaction), prepared)


# ---- the bot -----------------------------------------------------------------------------------------------------
class GenBot(commands.Bot):
    def __init__(self, core: BotCore, *, edit_interval: float = EDIT_INTERVAL_S, sync_commands: bool = True):
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: the prefix command reads message text
        prefix = core.settings.discord.prefix.strip()
        if not prefix:
            log.warning("discord.prefix is empty; using %r so ordinary chat is not read as commands", DEFAULT_PREFIX)
            prefix = DEFAULT_PREFIX
        super().__init__(
            command_prefix=commands.when_mentioned_or(prefix),
            intents=intents,
            help_command=None,  # replaced by the cog's Korean !help
            allowed_mentions=NO_MENTIONS,
            case_insensitive=True,
        )
        self.command_prefix_text = prefix
        self.core = core
        self.edit_interval = edit_interval
        self.sync_commands = sync_commands
        self.tree.error(self.on_app_command_error)
        self.conversation = Conversation(core, discord_access(core.settings.discord))
        self.add_check(self._allowed_here)
        self.tree.interaction_check = self._interaction_allowed

    @property
    def access(self) -> Access:
        return self.conversation.access

    @access.setter
    def access(self, access: Access) -> None:
        self.conversation.access = access

    async def _allowed_here(self, ctx: commands.Context) -> bool:
        try:
            self.conversation.check_access(who(ctx.guild and ctx.guild.id, ctx.channel.id, ctx.author.id))
        except Refused as exc:
            raise NotAllowed(exc) from None
        return True

    async def _interaction_allowed(self, interaction: discord.Interaction) -> bool:
        try:
            self.conversation.check_access(who(interaction.guild_id, interaction.channel_id, None))
        except Refused as exc:
            if not exc.quiet:
                await refuse(interaction, str(exc))
            return False
        return True

    async def setup_hook(self) -> None:
        # Runs on login only (never when tests build the bot), so syncing here is the one place that talks to Discord.
        await self.add_cog(GenCog(self, self.core, self.edit_interval))
        if self.sync_commands:
            await self.sync_slash_commands()

    async def sync_slash_commands(self) -> None:
        guild_id = self.core.settings.discord.guild_id
        try:
            if guild_id:  # a guild sync shows up at once; a global one can take up to an hour
                guild = discord.Object(id=guild_id)
                self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
            else:
                synced = await self.tree.sync()
        except discord.HTTPException as exc:
            log.error(
                "discord: 슬래시 명령을 등록하지 못했습니다 (guild_id=%s). 봇을 applications.commands 범위로 초대했는지 "
                "확인하세요. Prefix commands still work. (%s %s)", guild_id, exc.status, exc.text,
            )
            return
        log.info("discord: %d slash commands synced %s", len(synced), f"to guild {guild_id}" if guild_id else "globally")

    # Bots, including this one, are already ignored by Bot.process_commands (`message.author.bot`).

    async def on_command_error(self, ctx: commands.Context, error: commands.CommandError) -> None:
        """The one error → reply mapping for prefix commands."""
        if isinstance(error, commands.CommandNotFound):
            if self.access.check(guild=ctx.guild and ctx.guild.id, channel=ctx.channel.id) is Verdict.ALLOW:
                await self._suggest(ctx)
            return
        if isinstance(error, commands.UserInputError):
            await answer(ctx, f"명령을 이해하지 못했습니다. {self.command_prefix_text}help 를 보세요. (bad command input)")
            return
        await self.report(ctx, error.refused if isinstance(error, NotAllowed) else getattr(error, "original", error))

    async def report(self, ctx: commands.Context, error: BaseException) -> None:
        text = error_text(error, f"discord command {ctx.command}")
        if text is not None:
            await answer(ctx, text)

    async def _suggest(self, ctx: commands.Context) -> None:
        # The prefix is shared with other bots, so only near-misses of our own commands get an answer.
        names = [name for command in self.commands for name in (command.name, *command.aliases)]
        close = difflib.get_close_matches((ctx.invoked_with or "").lower(), names, n=1, cutoff=0.6)
        if close:
            await answer(ctx, f"알 수 없는 명령입니다. 혹시 {self.command_prefix_text}{close[0]} 을(를) 말씀하셨나요? "
                             f"(unknown command; did you mean {self.command_prefix_text}{close[0]}?)")

    async def on_app_command_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        cog = self.get_cog("GenCog")
        if cog is not None:
            await cog.app_error(interaction, getattr(error, "original", error))


def create_bot(core: BotCore, *, edit_interval: float = EDIT_INTERVAL_S, sync_commands: bool = True) -> GenBot:
    """Build the bot without connecting; the cog is added (and slash commands synced) in `setup_hook` at login."""
    return GenBot(core, edit_interval=edit_interval, sync_commands=sync_commands)


# ---- running -----------------------------------------------------------------------------------------------------
def _readable(exc: BaseException) -> Exception:
    if isinstance(exc, discord.LoginFailure):
        return RuntimeError("Discord 토큰이 올바르지 않습니다. BOT_DISCORD__TOKEN을 확인하세요. (invalid Discord token)")
    if isinstance(exc, discord.PrivilegedIntentsRequired):
        return RuntimeError(
            "Message Content intent가 꺼져 있습니다. Developer Portal → Bot → Privileged Gateway Intents에서 켜세요. "
            "(enable the Message Content intent)"
        )
    unreachable = (OSError, aiohttp.ClientError, discord.GatewayNotFound, discord.ConnectionClosed, discord.DiscordServerError)
    if isinstance(exc, unreachable):
        return DiscordUnreachable(f"Discord에 연결할 수 없습니다 (cannot reach Discord): {type(exc).__name__}: {exc}")
    return RuntimeError(f"Discord 연결 실패 (Discord connection failed): {type(exc).__name__}: {exc}")


class DiscordUnreachable(RuntimeError):
    """Discord could not be reached (network, gateway, a 5xx): bot.runner retries it, unlike a rejected token."""


async def serve(core: BotCore, stop: asyncio.Event) -> None:
    """Log in and run until `stop` is set, then close the connection cleanly."""
    token = core.settings.discord.secret()
    if not token:
        raise RuntimeError("BOT_DISCORD__TOKEN이 비어 있습니다. (no Discord token)")
    bot = create_bot(core)
    async with bot:  # closes the bot and its HTTP session however we leave
        client = asyncio.create_task(bot.start(token), name="discord-client")
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({client, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            cog = bot.get_cog("GenCog")
            if cog is not None and cog.active:  # the engine has drained; let those replies reach Discord
                await asyncio.wait(set(cog.active), timeout=REPLY_GRACE_S)
            if not bot.is_closed():
                await bot.close()
            await asyncio.wait({client}, timeout=10)
            client.cancel()
            (outcome,) = await asyncio.gather(client, return_exceptions=True)
    if isinstance(outcome, Exception):
        raise _readable(outcome) from None
