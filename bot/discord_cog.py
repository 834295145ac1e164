"""The Discord commands, prefix and slash, and the buttons: translate, hand to the conversation, map errors."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Optional

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_ui import (
    CONTINUE,
    EDIT_INTERVAL_S,
    LABEL_CHOICES,
    NO_MENTIONS,
    REGENERATE,
    ChannelTarget,
    GenerationView,
    InteractionTarget,
    answer,
    build_slash,
    fit,
    knobs_block,
    refuse,
    who,
)
from core.conversation import Buttons, Conversation, Who, error_text
from core.knobs import knob_specs
from core.replies import help_text, render_knobs
from core.service import BotCore
from core.types import PreparedRequest

log = logging.getLogger(__name__)


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
                         steered=self.core.engine.sentiment, notice=self.core.engine.notice)
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
