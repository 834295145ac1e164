"""The Discord commands, prefix and slash, and the buttons: translate, hand to the conversation, map errors."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
from typing import Optional

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_ui import (
    ACCESS_KINDS,
    CONTINUE,
    EDIT_INTERVAL_S,
    LABEL_CHOICES,
    NO_MENTIONS,
    REGENERATE,
    STOP,
    STOPPING,
    ChannelTarget,
    GenerationView,
    InteractionTarget,
    PayloadView,
    StopView,
    answer,
    build_slash,
    fit,
    knobs_block,
    refuse,
    unescape,
    who,
)
from core.conversation import Conversation, Reply, Who, error_text
from core.knobs import knob_specs
from core.replies import help_text, parse_result, render_knobs
from core.service import BotCore
from core.types import PreparedRequest

log = logging.getLogger(__name__)


class NotAllowed(commands.CheckFailure):
    """The server or channel is outside the allowlists (core's refusal, as discord.py's check failure)."""

    def __init__(self, refused: BaseException):
        super().__init__(str(refused))
        self.refused = refused


class GenCog(commands.Cog):
    """Every command, prefix and slash: translate, hand to the conversation, map errors to replies."""

    def __init__(self, bot: commands.Bot, core: BotCore, edit_interval: float = EDIT_INTERVAL_S):
        self.bot, self.core, self.edit_interval = bot, core, edit_interval
        self.conversation: Conversation = bot.conversation
        self.specs = knob_specs(core.settings.limits)
        head = [inspect.Parameter("prompt", inspect.Parameter.KEYWORD_ONLY, annotation=str),
                inspect.Parameter("label", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[str]),
                inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, default=None,
                                  annotation=Optional[app_commands.Range[str, 1, 40]])]
        self._dynamic = [
            build_slash("gen", "감성을 골라 한국어 문장을 이어 씁니다 (generate Korean text in a sentiment)",
                        self.gen_slash, self.specs, head,
                        {"prompt": "이어 쓸 문장 (예: 아 정말)", "label": "감성 라벨: 긍정 또는 부정 (생략하면 프롬프트 그대로 이어 씀)",
                         "model": "이 요청만 쓸 모델 (생략하면 채널의 모델; 목록은 /model)"},
                        {"label": LABEL_CHOICES}),
            build_slash("set", "이 채널의 기본 설정을 바꿉니다 (set this channel's defaults)", self.set_slash,
                        self.specs),
        ]
        self.active: set[asyncio.Task] = set()  # generations being shown; shutdown lets them send their replies

    async def cog_load(self) -> None:
        for command in self._dynamic:
            self.bot.tree.add_command(command, override=True)

    async def cog_unload(self) -> None:
        for command in self._dynamic:
            self.bot.tree.remove_command(command.name)

    def view(self, reply: Reply) -> PayloadView | None:
        """The buttons a reply state carries (follow-ups under a result, stop while it streams); their payloads
        come back through `on_button`."""
        if reply.buttons is not None:
            return GenerationView(reply.buttons.key, reply.buttons.candidates, self.on_button, self.cog_app_command_error)
        if reply.stop is not None:
            return StopView(reply.stop, self.on_button, self.cog_app_command_error)
        return None

    def channel_target(self, ctx: commands.Context) -> ChannelTarget:
        return ChannelTarget(ctx, self.view, self.edit_interval)

    def interaction_target(self, interaction: discord.Interaction) -> InteractionTarget:
        return InteractionTarget(interaction, self.view, self.edit_interval)

    async def reply(self, target: ChannelTarget | InteractionTarget, prepared: PreparedRequest, asker: Who) -> None:
        task = asyncio.current_task()
        self.active.add(task)
        try:
            await self.conversation.reply(target, prepared, "discord generation", asker=asker.user)
        finally:
            self.active.discard(task)

    # ---- the one error → reply mapping per kind: prefix commands, and interactions (slash commands, buttons) ----
    async def cog_command_error(self, ctx: commands.Context, error: commands.CommandError) -> None:
        """A refused request is an answer, not a failed command (discord.py then neither logs it nor reports it
        again: Bot.on_command_error skips commands whose cog has this hook)."""
        if isinstance(error, commands.UserInputError):
            await answer(ctx, f"명령을 이해하지 못했습니다. {self.bot.command_prefix_text}help 를 보세요. (bad command input)")
            return
        error = error.refused if isinstance(error, NotAllowed) else getattr(error, "original", error)
        text = error_text(error, f"discord command {ctx.command}")
        if text is not None:
            await answer(ctx, text)

    async def cog_app_command_error(self, interaction: discord.Interaction, error: BaseException) -> None:
        """Slash commands (the generated ones are bound to this cog too) and, through PayloadView.on_error, buttons."""
        error = getattr(error, "original", error)
        text = error_text(error, f"discord interaction {getattr(interaction.command, 'name', 'button')}")
        if text is not None:
            with contextlib.suppress(discord.HTTPException):
                await refuse(interaction, text)

    def who(self, interaction: discord.Interaction) -> Who:
        return who(interaction.guild_id, interaction.channel_id, interaction.user.id)

    def help_for(self, channel_id: int, command: str) -> str:
        prefix = self.bot.command_prefix_text
        steered, model = self.core.help_model(f"discord:{channel_id}")
        body = help_text(self.core.chat_knobs(f"discord:{channel_id}"), self.core.settings.limits, command,
                         steered=steered, model=model,
                         notice=self.core.help_notice(f"discord:{channel_id}"))
        return fit(body + f"\n\n채널 기본값: {prefix}set key=value … · {prefix}settings · {prefix}reset (또는 /set, /settings, "
                   f"/reset)\n슬래시 명령 /gen 은 같은 설정을 입력 칸으로 받습니다. 결과 아래 버튼: {REGENERATE} · {CONTINUE} · 쓰는 중에는 "
                   f"{STOP}(요청한 사람만)\n"
                   f"결과에 답장하면 이어 씁니다: {prefix}gen [덧붙일 말] [key=value …] 로 답장하거나 봇을 멘션하세요. "
                   f"(reply to a result with {prefix}gen or a mention to continue it)"
                   + (f"\n관리자: {prefix}allow · {prefix}deny [channel|guild <id>] · {prefix}allowed · {prefix}stats "
                      f"(또는 슬래시 명령; admins only)" if self.conversation.admins else ""))

    def show_settings(self, channel_id: int, title: str = "이 채널의 기본 설정 (current defaults):") -> str:
        return knobs_block(title, render_knobs(self.core.chat_knobs(f"discord:{channel_id}")))

    async def replied_result(self, message: discord.Message) -> str | None:
        """The plain text of the bot's own message that `message` replies to (None: not a reply to us). Read from
        Discord, so a result from before a restart continues too."""
        reference = message.reference
        if reference is None or reference.message_id is None or self.bot.user is None:
            return None
        replied = reference.resolved if isinstance(reference.resolved, discord.Message) else None
        if replied is None:
            try:
                replied = await message.channel.fetch_message(reference.message_id)
            except discord.HTTPException:
                return None
        return unescape(replied.content) if replied.author.id == self.bot.user.id else None

    # ---- prefix commands ---------------------------------------------------------------------------------------
    @commands.command(name="gen", aliases=["생성"])
    async def gen_prefix(self, ctx: commands.Context, *, args: str = "") -> None:
        """!gen [긍정|부정] 프롬프트 [key=value …]; as a reply to one of the bot's results it continues that result."""
        asker = who(ctx.guild and ctx.guild.id, ctx.channel.id, ctx.author.id)
        shown = await self.replied_result(ctx.message)
        if shown is not None and parse_result(shown) is not None:
            prepared = self.conversation.from_reply(shown, args, asker)
        else:
            prepared = self.conversation.from_text(args, asker)
        async with ctx.typing():
            await self.reply(self.channel_target(ctx), prepared, asker)

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        """A reply to one of the bot's results that mentions the bot (not a command) continues it, through the same
        door as `!gen`; its errors go to the same hook."""
        if message.author.bot or message.reference is None or self.bot.user not in message.mentions:
            return
        ctx = await self.bot.get_context(message)
        if ctx.valid:
            return  # a command: `!gen` as a reply is gen_prefix's
        shown = await self.replied_result(message)
        if shown is None:
            return
        args = re.sub(rf"<@!?{self.bot.user.id}>", " ", message.content)
        asker = who(message.guild and message.guild.id, message.channel.id, message.author.id)
        try:
            prepared = self.conversation.from_reply(shown, args, asker)
            async with ctx.typing():
                await self.reply(self.channel_target(ctx), prepared, asker)
        except Exception as exc:  # noqa: BLE001 (a listener has no error dispatch: hand it to the commands' hook)
            await self.cog_command_error(ctx, commands.CommandInvokeError(exc))

    # ---- admins ----------------------------------------------------------------------------------------------------
    @commands.command(name="allow")
    async def allow_prefix(self, ctx: commands.Context, *, args: str = "") -> None:
        """!allow (this channel) | !allow channel <id> | !allow guild <id>"""
        await answer(ctx, self.conversation.manage_access(self.who_ctx(ctx), args, True))

    @commands.command(name="deny")
    async def deny_prefix(self, ctx: commands.Context, *, args: str = "") -> None:
        await answer(ctx, self.conversation.manage_access(self.who_ctx(ctx), args, False))

    @commands.command(name="allowed")
    async def allowed_prefix(self, ctx: commands.Context) -> None:
        await answer(ctx, self.conversation.manage_access(self.who_ctx(ctx), "", None))

    @commands.command(name="model", aliases=["모델"])
    async def model_prefix(self, ctx: commands.Context, *, args: str = "") -> None:
        """!model (the list) | !model <name> (this channel's)"""
        await answer(ctx, self.conversation.choose_model(self.who_ctx(ctx), args, f"{self.bot.command_prefix_text}model"))

    @app_commands.command(name="model", description="모델 목록, 이 채널의 모델 바꾸기 (models; switch this channel's)")
    @app_commands.describe(name="바꿀 모델 이름 (생략하면 목록만)")
    async def model_slash(self, interaction: discord.Interaction,
                          name: Optional[app_commands.Range[str, 1, 40]] = None) -> None:
        text = self.conversation.choose_model(self.who(interaction), name or "")
        await interaction.response.send_message(fit(text), allowed_mentions=NO_MENTIONS)

    @commands.command(name="stats")
    async def stats_prefix(self, ctx: commands.Context) -> None:
        await answer(ctx, self.conversation.stats(self.who_ctx(ctx)))

    @app_commands.command(name="allow", description="(관리자) 허용: 이 채널, 또는 channel/guild id (admins: allow)")
    @app_commands.describe(kind="무엇을: channel 또는 guild (생략하면 이 채널)", id="그 id (숫자)")
    @app_commands.choices(kind=ACCESS_KINDS)
    async def allow_slash(self, interaction: discord.Interaction, kind: Optional[str] = None,
                          id: Optional[app_commands.Range[str, 1, 20]] = None) -> None:
        await self._manage(interaction, kind, id, True)

    @app_commands.command(name="deny", description="(관리자) 차단: 이 채널, 또는 channel/guild id (admins: deny)")
    @app_commands.describe(kind="무엇을: channel 또는 guild (생략하면 이 채널)", id="그 id (숫자)")
    @app_commands.choices(kind=ACCESS_KINDS)
    async def deny_slash(self, interaction: discord.Interaction, kind: Optional[str] = None,
                         id: Optional[app_commands.Range[str, 1, 20]] = None) -> None:
        await self._manage(interaction, kind, id, False)

    @app_commands.command(name="allowed", description="(관리자) 허용·차단 목록 (admins: the allowlists)")
    async def allowed_slash(self, interaction: discord.Interaction) -> None:
        await self._manage(interaction, None, None, None)

    @app_commands.command(name="stats", description="(관리자) 최근 7일 사용 통계 (admins: usage stats)")
    async def stats_slash(self, interaction: discord.Interaction) -> None:
        text = self.conversation.stats(self.who(interaction))
        await interaction.response.send_message(fit(text), ephemeral=True, allowed_mentions=NO_MENTIONS)

    async def _manage(self, interaction: discord.Interaction, kind: str | None, id_: str | None,
                      allowed: bool | None) -> None:
        args = " ".join(part for part in (kind, id_) if part)  # typed options, read by the same argument rule
        text = self.conversation.manage_access(self.who(interaction), args, allowed)
        await interaction.response.send_message(fit(text), ephemeral=True, allowed_mentions=NO_MENTIONS)

    def who_ctx(self, ctx: commands.Context) -> Who:
        return who(ctx.guild and ctx.guild.id, ctx.channel.id, ctx.author.id)

    @commands.command(name="help", aliases=["도움말"])
    async def help_prefix(self, ctx: commands.Context) -> None:
        await answer(ctx, self.help_for(ctx.channel.id, f"{self.bot.command_prefix_text}gen"))

    @commands.command(name="set")
    async def set_prefix(self, ctx: commands.Context, *, args: str = "") -> None:
        self.core.set_chat_knobs(args, f"discord:{ctx.channel.id}")
        await answer(ctx, self.show_settings(ctx.channel.id, "이 채널의 기본 설정을 바꿨습니다 (saved):"))

    @commands.command(name="settings")
    async def settings_prefix(self, ctx: commands.Context) -> None:
        await answer(ctx, self.show_settings(ctx.channel.id))

    @commands.command(name="reset")
    async def reset_prefix(self, ctx: commands.Context) -> None:
        self.core.reset_chat_knobs(f"discord:{ctx.channel.id}")
        await answer(ctx, self.show_settings(ctx.channel.id, "이 채널의 기본 설정을 초기화했습니다 (reset):"))

    # ---- slash commands and buttons ----------------------------------------------------------------------------
    async def gen_slash(self, interaction: discord.Interaction, prompt: str, label: str | None = None,
                        model: str | None = None, **knobs: object) -> None:
        # Typed options go to the core as fields: the prompt is never re-read for `key=value`.
        asker = self.who(interaction)
        prepared = self.conversation.from_fields({"prompt": prompt, "label": label, "model": model, **knobs}, asker)
        await interaction.response.defer(thinking=True)  # before Discord's 3-second deadline
        await self.reply(self.interaction_target(interaction), prepared, asker)

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

    async def on_button(self, interaction: discord.Interaction, data: str) -> None:
        asker = self.who(interaction)
        prepared = self.conversation.from_button(data, asker)  # a refusal: PayloadView.on_error
        if prepared is None:  # the stop button: the reply's own loop shows the text so far, marked stopped
            await interaction.response.send_message(STOPPING, ephemeral=True, allowed_mentions=NO_MENTIONS)
            return
        await interaction.response.defer(thinking=True)  # a new message below, so the earlier result stays
        await self.reply(self.interaction_target(interaction), prepared, asker)
