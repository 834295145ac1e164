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
from typing import Optional, Protocol

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from core.access import REFUSAL, Verdict, discord_access
from core.types import Generation
from core.errors import UserError
from core.grammar import NEGATIVE, POSITIVE, GenRequest
from core.knobs import KnobSpec, knob_specs, parse_value
from core.replies import APOLOGY, help_text, render_generation, render_knobs, shorten
from core.service import BotCore
from core.streaming import throttled

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
    """The server or channel is outside the allowlists."""


# ---- text helpers ------------------------------------------------------------------------------------------------
def channel_key(channel_id: int) -> str:
    return f"discord:{channel_id}"


def user_key(user_id: int) -> str:
    return f"discord:{user_id}"


def escape(text: str) -> str:
    """Model output and prompts are shown literally: no markdown, no live mentions."""
    return discord.utils.escape_markdown(discord.utils.escape_mentions(text))


def bold(text: str) -> str:
    return f"**{text}**"


def fit(text: str) -> str:
    return shorten(text, MESSAGE_LIMIT)


def render(gen: Generation) -> str:
    return render_generation(gen, MESSAGE_LIMIT, escape=escape, emphasize=bold)


def knobs_block(title: str, text: str) -> str:
    return fit(f"{title}\n```\n{text}\n```")


def options_text(options: Mapping[str, object], specs: Mapping[str, KnobSpec]) -> str:
    """Typed slash options as `key=value` text for the core grammar, so one set of rules (and errors) applies."""
    pairs = []
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(value, str):  # seed is text (see _knob_parameter); a space inside must not split it
            value = parse_value(specs[name], value)
        pairs.append(f"{name}={value}")
    return " ".join(pairs)


# ---- where a generation is shown ---------------------------------------------------------------------------------
class Target(Protocol):
    async def show(self, text: str, view: discord.ui.View | None = None) -> discord.Message | None: ...

    async def fail(self, text: str) -> None: ...


class ChannelTarget:
    """A prefix command's answer: the first update replies to the command, later ones edit that reply."""

    def __init__(self, ctx: commands.Context):
        self.ctx = ctx
        self.message: discord.Message | None = None

    async def show(self, text: str, view: discord.ui.View | None = None) -> discord.Message:
        if self.message is None:
            self.message = await reply(self.ctx, text, view=view)
        else:
            self.message = await self.message.edit(content=fit(text), view=view, allowed_mentions=NO_MENTIONS)
        return self.message

    async def fail(self, text: str) -> None:
        if self.message is None:
            await reply(self.ctx, text)
        else:
            await self.message.edit(content=fit(text), view=None, allowed_mentions=NO_MENTIONS)


class InteractionTarget:
    """A deferred interaction's answer: updates edit the "thinking…" message; failures are shown only to the user."""

    def __init__(self, interaction: discord.Interaction):
        self.interaction = interaction

    async def show(self, text: str, view: discord.ui.View | None = None) -> discord.Message:
        return await self.interaction.edit_original_response(content=fit(text), view=view, allowed_mentions=NO_MENTIONS)

    async def fail(self, text: str) -> None:
        with contextlib.suppress(discord.HTTPException):
            await self.interaction.delete_original_response()
        await self.interaction.followup.send(fit(text), ephemeral=True, allowed_mentions=NO_MENTIONS)


async def reply(ctx: commands.Context, text: str, **kwargs: object) -> discord.Message:
    # Still answer when the command message was deleted meanwhile.
    reference = ctx.message.to_reference(fail_if_not_exists=False)
    return await ctx.send(fit(text), reference=reference, mention_author=False, allowed_mentions=NO_MENTIONS, **kwargs)


async def refuse(interaction: discord.Interaction, text: str) -> None:
    """An ephemeral answer, whether or not the interaction was already acknowledged."""
    if interaction.response.is_done():
        await interaction.followup.send(fit(text), ephemeral=True, allowed_mentions=NO_MENTIONS)
    else:
        await interaction.response.send_message(fit(text), ephemeral=True, allowed_mentions=NO_MENTIONS)


# ---- buttons -----------------------------------------------------------------------------------------------------
class GenerationView(discord.ui.View):
    """다시 생성 (regenerate) and 이어 쓰기 (continue, one button per candidate) under a result."""

    def __init__(self, cog: GenCog, key: str, candidates: int, timeout: float = VIEW_TIMEOUT_S):
        super().__init__(timeout=timeout)
        self.message: discord.Message | None = None
        self._button(REGENERATE, discord.ButtonStyle.primary, functools.partial(cog.on_regenerate, key=key))
        for i in range(candidates):
            label = CONTINUE if candidates == 1 else f"{CONTINUE} {i + 1}"
            self._button(label, discord.ButtonStyle.secondary, functools.partial(cog.on_continue, key=key, candidate=i))

    def _button(self, label: str, style: discord.ButtonStyle, callback: Callable[[discord.Interaction], Awaitable]) -> None:
        button: discord.ui.Button = discord.ui.Button(label=label, style=style)
        button.callback = callback
        self.add_item(button)

    async def on_timeout(self) -> None:
        # Grey the buttons out so nobody clicks a dead view; the message may be gone, which is fine.
        for item in self.children:
            item.disabled = True
        if self.message is not None:
            with contextlib.suppress(discord.HTTPException):
                await self.message.edit(view=self)


# ---- slash command construction ----------------------------------------------------------------------------------
LABEL_CHOICES = [app_commands.Choice(name=POSITIVE, value=POSITIVE), app_commands.Choice(name=NEGATIVE, value=NEGATIVE)]


def _knob_parameter(spec: KnobSpec) -> inspect.Parameter:
    if spec.name == "seed":
        # Discord integer options stop at 2**53, but shown seeds reach 2**63-1: take text, core checks the range.
        annotation = app_commands.Range[str, 1, SEED_MAX_CHARS]
    else:
        annotation = app_commands.Range[spec.kind, spec.kind(spec.low), spec.kind(spec.high)]
    return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[annotation])


def _knob_description(spec: KnobSpec) -> str:
    return f"{spec.help_ko} — {spec.range_ko()}"[:100]  # Discord caps option descriptions at 100


def build_slash(
    name: str,
    description: str,
    callback: Callable[..., Awaitable[None]],
    specs: Mapping[str, KnobSpec],
    head: list[inspect.Parameter] = (),
    head_descriptions: Mapping[str, str] | None = None,
    choices: Mapping[str, list[app_commands.Choice]] | None = None,
) -> app_commands.Command:
    """A slash command whose knob options carry today's ranges from `[limits]`.

    `app_commands.Range` bounds are read from the callback's signature when the command is built, and the caps are
    settings, so the signature is assembled here at run time instead of being written in a class body.
    """

    async def invoke(interaction: discord.Interaction, **options: object) -> None:
        await callback(interaction, **options)

    interaction = inspect.Parameter("interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=discord.Interaction)
    invoke.__signature__ = inspect.Signature([interaction, *head, *(_knob_parameter(s) for s in specs.values())])
    invoke = app_commands.describe(**(head_descriptions or {}), **{s.name: _knob_description(s) for s in specs.values()})(invoke)
    if choices:
        invoke = app_commands.choices(**choices)(invoke)
    return app_commands.Command(name=name, description=description, callback=invoke)


# ---- the cog -----------------------------------------------------------------------------------------------------
class GenCog(commands.Cog):
    """Every command, prefix and slash, over the shared core."""

    def __init__(self, bot: commands.Bot, core: BotCore, edit_interval: float = EDIT_INTERVAL_S):
        self.bot = bot
        self.core = core
        self.edit_interval = edit_interval
        self.specs = knob_specs(core.settings.limits)
        self._dynamic = [self._gen_slash(), self._set_slash()]
        self.active: set[asyncio.Task] = set()  # generations being shown; shutdown lets them send their replies

    async def cog_load(self) -> None:
        for command in self._dynamic:
            self.bot.tree.add_command(command, override=True)

    async def cog_unload(self) -> None:
        for command in self._dynamic:
            self.bot.tree.remove_command(command.name)

    # ---- shared work -------------------------------------------------------------------------------------------
    async def stream_to(self, target: Target, request: GenRequest, continuing: bool = False) -> None:
        """Show the text as it grows (one edit per `edit_interval` at most), then the result with its buttons."""
        stream = self.core.engine.stream(request, continuing)
        task = asyncio.current_task()
        self.active.add(task)
        try:
            async for gen in throttled(stream, self.edit_interval):
                if gen.done:
                    view = GenerationView(self, self.core.followups.remember(gen), len(gen.continuations))
                    view.message = await target.show(render(gen), view)
                else:
                    await target.show(render(gen))
        except UserError as exc:
            await target.fail(str(exc))
        except Exception:
            log.exception("discord: generation failed (prompt %r, knobs %s)", request.model_prompt[:60], request.knobs)
            await target.fail(APOLOGY)
        finally:
            self.active.discard(task)
            await stream.aclose()  # stops the engine's work if we left early

    def answer(self, work: Callable[[], str], what: str) -> str:
        """`work()`'s text, the UserError's message, or the apology (logged) for anything unexpected."""
        try:
            return work()
        except UserError as exc:
            return str(exc)
        except Exception:
            log.exception("discord: %s failed", what)
            return APOLOGY

    def help_for(self, channel_id: int, command: str) -> str:
        prefix = self.bot.command_prefix_text
        body = help_text(self.core.chat_knobs(channel_key(channel_id)), self.core.settings.limits, command)
        extra = (
            f"\n\n채널 기본값: {prefix}set key=value … · {prefix}settings · {prefix}reset (또는 /set, /settings, /reset)"
            f"\n슬래시 명령 /gen 은 같은 설정을 입력 칸으로 받습니다. 결과 아래 버튼: {REGENERATE} · {CONTINUE}"
        )
        return fit(body + extra)

    def show_settings(self, channel_id: int) -> str:
        knobs = self.core.chat_knobs(channel_key(channel_id))
        return knobs_block("이 채널의 기본 설정 (current defaults):", render_knobs(knobs))

    def set_settings(self, args: str, channel_id: int) -> str:
        knobs = self.core.set_chat_knobs(args, channel_key(channel_id))
        return knobs_block("이 채널의 기본 설정을 바꿨습니다 (saved):", render_knobs(knobs))

    def reset_settings(self, channel_id: int) -> str:
        knobs = self.core.reset_chat_knobs(channel_key(channel_id))
        return knobs_block("이 채널의 기본 설정을 초기화했습니다 (reset):", render_knobs(knobs))

    # ---- prefix commands ---------------------------------------------------------------------------------------
    @commands.command(name="gen", aliases=["생성"])
    async def gen_prefix(self, ctx: commands.Context, *, args: str = "") -> None:
        """!gen [긍정|부정] 프롬프트 [key=value …]"""
        try:
            request = self.core.gen_request(args, channel_key(ctx.channel.id), user_key(ctx.author.id))
        except UserError as exc:
            await reply(ctx, str(exc))
            return
        async with ctx.typing():
            await self.stream_to(ChannelTarget(ctx), request)

    @commands.command(name="help", aliases=["도움말"])
    async def help_prefix(self, ctx: commands.Context) -> None:
        await reply(ctx, self.answer(lambda: self.help_for(ctx.channel.id, f"{self.bot.command_prefix_text}gen"), "help"))

    @commands.command(name="set")
    async def set_prefix(self, ctx: commands.Context, *, args: str = "") -> None:
        await reply(ctx, self.answer(lambda: self.set_settings(args, ctx.channel.id), "set"))

    @commands.command(name="settings")
    async def settings_prefix(self, ctx: commands.Context) -> None:
        await reply(ctx, self.answer(lambda: self.show_settings(ctx.channel.id), "settings"))

    @commands.command(name="reset")
    async def reset_prefix(self, ctx: commands.Context) -> None:
        await reply(ctx, self.answer(lambda: self.reset_settings(ctx.channel.id), "reset"))

    # ---- slash commands ----------------------------------------------------------------------------------------
    def _gen_slash(self) -> app_commands.Command:
        head = [
            inspect.Parameter("prompt", inspect.Parameter.KEYWORD_ONLY, annotation=str),
            inspect.Parameter("label", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[str]),
        ]
        return build_slash(
            "gen", "감성을 골라 한국어 문장을 이어 씁니다 (generate Korean text in a sentiment)", self.gen_slash,
            self.specs, head,
            {"prompt": "이어 쓸 문장 (예: 아 정말)", "label": "감성 라벨: 긍정 또는 부정 (생략하면 프롬프트 그대로 이어 씀)"},
            {"label": LABEL_CHOICES},
        )

    def _set_slash(self) -> app_commands.Command:
        return build_slash("set", "이 채널의 기본 설정을 바꿉니다 (set this channel's defaults)", self.set_slash, self.specs)

    async def gen_slash(self, interaction: discord.Interaction, prompt: str, label: str | None = None, **knobs: object) -> None:
        try:
            args = " ".join(part for part in (options_text(knobs, self.specs), label, prompt) if part)
            request = self.core.gen_request(args, channel_key(interaction.channel_id), user_key(interaction.user.id))
        except UserError as exc:
            await refuse(interaction, str(exc))
            return
        # Parsing is instant; generation is not, so acknowledge before Discord's 3-second deadline.
        await interaction.response.defer(thinking=True)
        await self.stream_to(InteractionTarget(interaction), request)

    async def set_slash(self, interaction: discord.Interaction, **knobs: object) -> None:
        text = self.answer(lambda: self.set_settings(options_text(knobs, self.specs), interaction.channel_id), "set")
        await interaction.response.send_message(text, allowed_mentions=NO_MENTIONS)

    @app_commands.command(name="help", description="사용법과 설정 범위 (usage and knob ranges)")
    async def help_slash(self, interaction: discord.Interaction) -> None:
        text = self.answer(lambda: self.help_for(interaction.channel_id, "/gen"), "help")
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_MENTIONS)

    @app_commands.command(name="settings", description="이 채널의 기본 설정 보기 (show this channel's defaults)")
    async def settings_slash(self, interaction: discord.Interaction) -> None:
        text = self.answer(lambda: self.show_settings(interaction.channel_id), "settings")
        await interaction.response.send_message(text, allowed_mentions=NO_MENTIONS)

    @app_commands.command(name="reset", description="이 채널의 기본 설정 초기화 (reset this channel's defaults)")
    async def reset_slash(self, interaction: discord.Interaction) -> None:
        text = self.answer(lambda: self.reset_settings(interaction.channel_id), "reset")
        await interaction.response.send_message(text, allowed_mentions=NO_MENTIONS)

    # ---- buttons -----------------------------------------------------------------------------------------------
    async def on_regenerate(self, interaction: discord.Interaction, *, key: str) -> None:
        await self._follow_up(interaction, lambda: self.core.followups.regenerate(key), continuing=False)

    async def on_continue(self, interaction: discord.Interaction, *, key: str, candidate: int) -> None:
        await self._follow_up(interaction, lambda: self.core.followups.continuation(key, candidate), continuing=True)

    async def _follow_up(self, interaction: discord.Interaction, make: Callable[[], GenRequest], continuing: bool) -> None:
        try:
            request = make()
            self.core.engine.encode_prompt(request, continuing)  # length errors before the cooldown is charged
            self.core.limiter.check(user_key(interaction.user.id))
        except UserError as exc:
            await refuse(interaction, str(exc))
            return
        except Exception:
            log.exception("discord: button failed")
            await refuse(interaction, APOLOGY)
            return
        await interaction.response.defer(thinking=True)  # a new message below, so the earlier result stays
        await self.stream_to(InteractionTarget(interaction), request, continuing)


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
        self.access = discord_access(core.settings.discord)
        self.add_check(self._allowed_here)
        self.tree.interaction_check = self._interaction_allowed

    def verdict(self, guild_id: int | None, channel_id: int | None) -> Verdict:
        return self.access.check(guild=guild_id, channel=channel_id)

    async def _allowed_here(self, ctx: commands.Context) -> bool:
        if self.verdict(ctx.guild.id if ctx.guild else None, ctx.channel.id) is not Verdict.ALLOW:
            raise NotAllowed()
        return True

    async def _interaction_allowed(self, interaction: discord.Interaction) -> bool:
        verdict = self.verdict(interaction.guild_id, interaction.channel_id)
        if verdict is Verdict.REFUSE:
            await refuse(interaction, REFUSAL)
        return verdict is Verdict.ALLOW

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
        if isinstance(error, NotAllowed):
            log.info("discord: refused a command in channel %s (allowlist)", ctx.channel.id)
            if self.access.refusal == "reply":
                await reply(ctx, REFUSAL)
        elif isinstance(error, commands.CommandNotFound):
            if self.verdict(ctx.guild.id if ctx.guild else None, ctx.channel.id) is Verdict.ALLOW:
                await self._suggest(ctx)
        elif isinstance(error, commands.UserInputError):
            await reply(ctx, f"명령을 이해하지 못했습니다. {self.command_prefix_text}help 를 보세요. (bad command input)")
        else:
            log.error("discord: command %s failed", ctx.command, exc_info=getattr(error, "original", error))
            await reply(ctx, APOLOGY)

    async def _suggest(self, ctx: commands.Context) -> None:
        # The prefix is shared with other bots, so only near-misses of our own commands get an answer.
        names = [name for command in self.commands for name in (command.name, *command.aliases)]
        close = difflib.get_close_matches((ctx.invoked_with or "").lower(), names, n=1, cutoff=0.6)
        if close:
            await reply(ctx, f"알 수 없는 명령입니다. 혹시 {self.command_prefix_text}{close[0]} 을(를) 말씀하셨나요? "
                             f"(unknown command; did you mean {self.command_prefix_text}{close[0]}?)")

    async def on_app_command_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        log.error("discord: slash command %s failed", interaction.command and interaction.command.name,
                  exc_info=getattr(error, "original", error))
        with contextlib.suppress(discord.HTTPException):
            await refuse(interaction, APOLOGY)


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
