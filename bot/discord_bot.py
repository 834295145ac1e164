"""Discord front end (discord.py 2): `!gen` with the shared grammar, `/gen` with typed ranged options, buttons.

The prefix command reads message text, so it needs the privileged **Message Content** intent (enable it under
Bot → Privileged Gateway Intents in the Developer Portal). Slash commands, buttons and `@bot gen …` mentions work
without it.
"""


from __future__ import annotations

import asyncio
import difflib
import logging

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_cog import GenCog, NotAllowed
from bot.discord_ui import EDIT_INTERVAL_S, NO_MENTIONS, answer, refuse, who
from core.access import Access, Verdict, discord_access
from core.conversation import Conversation
from core.errors import NotAllowed as Refused
from core.service import BotCore

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "!"
REPLY_GRACE_S = 10.0  # at shutdown (after the engine's drain), how long replies being sent may take


class GenTree(app_commands.CommandTree):
    """The slash command tree: the allowlist before any interaction; errors are the cog's (every command is bound to
    GenCog, so `cog_app_command_error` has answered before `on_error` runs)."""

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        try:
            self.client.conversation.check_access(who(interaction.guild_id, interaction.channel_id, interaction.user.id))
        except Refused as exc:
            if not exc.quiet:
                await refuse(interaction, str(exc))
            return False
        return True

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        command = interaction.command
        if getattr(command, "binding", None) is None:  # not one of the cog's: nobody answered it
            await super().on_error(interaction, error)


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
            tree_cls=GenTree,
        )
        self.command_prefix_text = prefix
        self.core = core
        self.edit_interval = edit_interval
        self.sync_commands = sync_commands
        admins = frozenset(f"discord:{i}" for i in core.settings.discord.admin_user_ids)
        self.conversation = Conversation(core, discord_access(core.settings.discord, core.store), admins)
        self.add_check(self._allowed_here)

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
        """Only what reaches no command: a near-miss of ours gets a suggestion. The commands' own errors are
        answered by GenCog.cog_command_error (the default handler below then stays quiet)."""
        if isinstance(error, commands.CommandNotFound):
            if self.access.check(guild=ctx.guild and ctx.guild.id, channel=ctx.channel.id) is Verdict.ALLOW:
                await self._suggest(ctx)
            return
        await super().on_command_error(ctx, error)

    async def _suggest(self, ctx: commands.Context) -> None:
        # The prefix is shared with other bots, so only near-misses of our own commands get an answer.
        names = [name for command in self.commands for name in (command.name, *command.aliases)]
        close = difflib.get_close_matches((ctx.invoked_with or "").lower(), names, n=1, cutoff=0.6)
        if close:
            await answer(ctx, f"알 수 없는 명령입니다. 혹시 {self.command_prefix_text}{close[0]} 을(를) 말씀하셨나요? "
                             f"(unknown command; did you mean {self.command_prefix_text}{close[0]}?)")


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
