"""Discord's side of a reply: escaping, the reply targets (core.conversation.ReplyTarget), the buttons, and the
slash commands generated from the knob table (a new knob becomes an option by itself)."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Optional

import discord
from discord import app_commands
from discord.ext import commands

from core.conversation import Reply, Style, Who
from core.grammar import NEGATIVE, POSITIVE
from core.knobs import KnobSpec
from core.replies import shorten

if TYPE_CHECKING:
    from bot.discord_cog import GenCog

MESSAGE_LIMIT = 2000  # Discord's message length
EDIT_INTERVAL_S = 1.0  # Discord allows about 5 edits per 5 s per channel; one a second leaves room for others
VIEW_TIMEOUT_S = 600.0  # buttons end before the 15-minute interaction token does, so the view can still be edited
NO_MENTIONS = discord.AllowedMentions.none()  # generated text must never ping (discord.py allows @everyone)
REGENERATE, CONTINUE = "다시 생성", "이어 쓰기"
SEED_MAX_CHARS = 16  # core.knobs.SEED_MAX = 2**53 - 1 has 16 digits


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


# ---- slash commands ------------------------------------------------------------------------------------------------
LABEL_CHOICES = [app_commands.Choice(name=POSITIVE, value=POSITIVE), app_commands.Choice(name=NEGATIVE, value=NEGATIVE)]


def _knob_parameter(spec: KnobSpec) -> inspect.Parameter:
    if spec.name == "seed":
        # Text, so an out-of-range seed gets core's sentence rather than Discord's own refusal.
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
