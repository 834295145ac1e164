"""Discord's side of a reply: escaping, the reply targets (core.conversation.ReplyTarget), the buttons, and the
slash commands generated from the knob table (a new knob becomes an option by itself)."""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Optional

import discord
from discord import app_commands
from discord.ext import commands

from core.conversation import Reply, Style, Who
from core.followups import button_data, stop_data
from core.grammar import NEGATIVE, POSITIVE
from core.knobs import KnobSpec
from core.replies import shorten

MESSAGE_LIMIT = 2000  # Discord's message length
EDIT_INTERVAL_S = 1.0  # Discord allows about 5 edits per 5 s per channel; one a second leaves room for others
VIEW_TIMEOUT_S = 600.0  # buttons end before the 15-minute interaction token does, so the view can still be edited
NO_MENTIONS = discord.AllowedMentions.none()  # generated text must never ping (discord.py allows @everyone)
REGENERATE, CONTINUE, STOP = "다시 생성", "이어 쓰기", "⏹ 멈추기"
STOPPING = "멈추는 중… 지금까지의 글을 남깁니다. (stopping)"
SEED_MAX_CHARS = 16  # core.knobs.SEED_MAX = 2**53 - 1 has 16 digits


# ---- translation -------------------------------------------------------------------------------------------------
def escape(text: str) -> str:
    """Model output and prompts are shown literally: no markdown, no live mentions."""
    return discord.utils.escape_markdown(discord.utils.escape_mentions(text))


_MARKUP_RE = re.compile(r"\\(.)|(\*\*)|(@\u200b)", re.DOTALL)


def unescape(content: str) -> str:
    """A message of ours back to the plain text `escape` and the bold prompt came from (reply to continue): escaped
    characters unescaped, our `**` dropped, the zero-width space that defused a mention taken out."""
    return _MARKUP_RE.sub(lambda m: m.group(1) if m.group(1) is not None else "@" if m.group(3) else "", content)


def fit(text: str) -> str:
    return shorten(text, MESSAGE_LIMIT)


STYLE = Style(MESSAGE_LIMIT, escape=escape, emphasize=lambda s: f"**{s}**", notice=fit)


def who(guild_id: int | None, channel_id: int | None, user_id: int | None) -> Who:
    return Who(chat=f"discord:{channel_id}", user=None if user_id is None else f"discord:{user_id}",
               ids={"channel": channel_id, "guild": guild_id})  # the channel first: "here" for !allow


def knobs_block(title: str, text: str) -> str:
    return fit(f"{title}\n```\n{text}\n```")


ViewFor = Callable[[Reply], Optional[discord.ui.View]]  # the buttons a reply state carries (the cog builds them)


class _Views:
    """A target's buttons: the stop button is one view for the whole stream (not a new one per edit), ended
    when the reply is final."""

    def __init__(self, view_for: ViewFor):
        self.view_for = view_for
        self.stop_view: discord.ui.View | None = None

    def view(self, reply: Reply) -> discord.ui.View | None:
        if reply.stop is not None and self.stop_view is not None:
            return self.stop_view
        if self.stop_view is not None:
            self.stop_view.stop()
            self.stop_view = None
        view = self.view_for(reply)
        if reply.stop is not None:
            self.stop_view = view
        return view


class ChannelTarget(_Views):
    """A prefix command's answer (core.conversation.ReplyTarget): a reply to the command, edited afterwards."""

    def __init__(self, ctx: commands.Context, view_for: ViewFor, edit_interval: float):
        super().__init__(view_for)
        self.ctx = ctx
        self.style, self.edit_interval = STYLE, edit_interval
        self.message: discord.Message | None = None

    async def send(self, reply: Reply) -> None:
        view = self.view(reply)
        self.message = await answer(self.ctx, reply.text, **({"view": view} if view else {}))
        if view is not None:
            view.message = self.message

    async def edit(self, reply: Reply) -> None:
        view = self.view(reply)
        self.message = await self.message.edit(content=fit(reply.text), view=view, allowed_mentions=NO_MENTIONS)
        if view is not None:
            view.message = self.message

    async def typing(self) -> None:
        """`ctx.typing()` around the whole reply keeps it shown."""

    def spare(self) -> bool:
        return True


class InteractionTarget(_Views):
    """A deferred interaction's answer: the "thinking…" message is edited; an error is shown only to the user."""

    def __init__(self, interaction: discord.Interaction, view_for: ViewFor, edit_interval: float):
        super().__init__(view_for)
        self.interaction = interaction
        self.style, self.edit_interval = STYLE, edit_interval

    async def send(self, reply: Reply) -> None:
        if reply.error:
            self.view(reply)  # ends a stop button's view, if the error came mid-stream
            with contextlib.suppress(discord.HTTPException):
                await self.interaction.delete_original_response()
            await self.interaction.followup.send(fit(reply.text), ephemeral=True, allowed_mentions=NO_MENTIONS)
            return
        view = self.view(reply)
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


Press = Callable[[discord.Interaction, str], Awaitable[None]]  # (interaction, the button's payload)
OnError = Callable[[discord.Interaction, BaseException], Awaitable[None]]


class PayloadView(discord.ui.View):
    """Buttons whose payload (core.followups.button_data) is their custom_id; a press hands it to `press`, and a
    failure goes to `on_error` (the cog's one interaction error hook) instead of discord.py's log."""

    def __init__(self, press: Press, on_error: OnError, timeout: float | None = VIEW_TIMEOUT_S):
        super().__init__(timeout=timeout)
        self.message: discord.Message | None = None
        self._press, self._on_error = press, on_error

    def add(self, label: str, style: discord.ButtonStyle, data: str) -> None:
        button: discord.ui.Button = discord.ui.Button(label=label, style=style, custom_id=data)

        async def pressed(interaction: discord.Interaction) -> None:
            await self._press(interaction, data)

        button.callback = pressed
        self.add_item(button)

    async def on_error(self, interaction: discord.Interaction, error: Exception, item: discord.ui.Item) -> None:
        await self._on_error(interaction, error)


class GenerationView(PayloadView):
    """다시 생성 (regenerate) and 이어 쓰기 (continue, one button per candidate) under a result."""

    def __init__(self, key: str, candidates: int, press: Press, on_error: OnError, timeout: float = VIEW_TIMEOUT_S):
        super().__init__(press, on_error, timeout)
        self.add(REGENERATE, discord.ButtonStyle.primary, button_data(key))
        for i in range(candidates):
            self.add(CONTINUE if candidates == 1 else f"{CONTINUE} {i + 1}", discord.ButtonStyle.secondary,
                     button_data(key, i))

    async def on_timeout(self) -> None:
        # Grey the buttons out so nobody clicks a dead view; the message may be gone, which is fine.
        for item in self.children:
            item.disabled = True
        if self.message is not None:
            with contextlib.suppress(discord.HTTPException):
                await self.message.edit(view=self)


class StopView(PayloadView):
    """⏹ 멈추기 under a reply while it streams (only its asker may use it; the conversation checks)."""

    def __init__(self, key: str, press: Press, on_error: OnError, timeout: float = VIEW_TIMEOUT_S):
        super().__init__(press, on_error, timeout)
        self.add(STOP, discord.ButtonStyle.danger, stop_data(key))


# ---- slash commands ------------------------------------------------------------------------------------------------
ACCESS_KINDS = [app_commands.Choice(name="channel (채널)", value="channel"),
                app_commands.Choice(name="guild (서버)", value="guild")]
LABEL_CHOICES = [app_commands.Choice(name=POSITIVE, value=POSITIVE), app_commands.Choice(name=NEGATIVE, value=NEGATIVE)]


def _knob_parameter(spec: KnobSpec) -> inspect.Parameter:
    if spec.name == "seed":
        # Text, so an out-of-range seed gets core's sentence rather than Discord's own refusal.
        annotation = app_commands.Range[str, 1, SEED_MAX_CHARS]
    else:
        annotation = app_commands.Range[spec.kind, spec.kind(spec.low), spec.kind(spec.high)]
    return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[annotation])


def build_slash(name: str, description: str, callback: Callable[..., Awaitable[None]], specs: Mapping[str, KnobSpec],
                head: list[inspect.Parameter] = (),
                head_descriptions: Mapping[str, str] | None = None,
                choices: Mapping[str, list[app_commands.Choice]] | None = None) -> app_commands.Command:
    """A slash command whose knob options carry today's ranges from `[limits]` (read from the signature when the
    command is built, so the signature is assembled here at run time). `callback` is a cog's method; the command is
    bound to that cog like the cog's own commands, so its errors reach the cog's `cog_app_command_error`."""

    async def invoke(_binding: commands.Cog, interaction: discord.Interaction, **options: object) -> None:
        await callback(interaction, **options)

    interaction = inspect.Parameter("interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=discord.Interaction)
    invoke.__signature__ = inspect.Signature([interaction, *head, *(_knob_parameter(s) for s in specs.values())])
    described = {s.name: f"{s.help_ko} — {s.range_ko()}"[:100] for s in specs.values()}  # Discord's cap is 100
    invoke = app_commands.describe(**(head_descriptions or {}), **described)(invoke)
    if choices:
        invoke = app_commands.choices(**choices)(invoke)
    command = app_commands.Command(name=name, description=description, callback=invoke)
    command.binding = callback.__self__  # discord.py then passes the cog first, as to a method (the signature skips it)
    return command
