"""What many test files need, once: a free loopback port and a clean environment for `python -m bot` subprocesses.

Fake servers live beside this module (`fake_bot_api.FakeBotAPI` for Telegram's Bot API, `fake_vllm.FakeVLLM` for an
OpenAI/vLLM server); settings over the tiny model come from `conftest.make_settings`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port nothing listens on now: bind it to get one, then close it. Connections to it are refused
    until someone binds it again (a test's own server, or nobody: a 'closed' address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_url() -> str:
    """An http:// address where connections are refused at once."""
    return f"http://127.0.0.1:{free_port()}"


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child process of the bot: this one's without any BOT_* variable, the developer's .env
    replaced by an empty file, the hub offline, this checkout first on the import path, then `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOT_")}
    path = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", BOT_ENV_FILE=os.devnull,
               PYTHONPATH=os.pathsep.join(dict.fromkeys(path)), **extra)
    return env


@contextlib.contextmanager
def held_after(engine, steps: int):
    """The engine's worker waits before decoding step `steps + 1` until the block ends: a generation is certainly
    still running while the test presses stop or buttons (no clock involved)."""
    release, seen = threading.Event(), []
    advance = engine._advance

    def gated(*args, **kwargs):
        seen.append(1)
        if len(seen) > steps:
            release.wait(30)
        return advance(*args, **kwargs)

    engine._advance = gated
    try:
        yield
    finally:
        release.set()
        del engine._advance


async def start_discord_bot(core, *, text_channels: int = 2, members: int = 3, **kwargs):
    """The bot as `bot.discord_bot.serve` builds it, wired to dpytest's fake Discord instead of logging in."""
    import discord
    import discord.ext.test as dpytest

    from bot.discord_bot import create_bot

    bot = create_bot(core, sync_commands=False, **kwargs)
    # dpytest creates members through the cache, which needs the (privileged) members intent; the real bot does not.
    bot._connection._intents.members = True
    bot._connection.member_cache_flags = discord.MemberCacheFlags.from_intents(bot._connection._intents)
    dpytest.configure(bot, text_channels=text_channels, voice_channels=0, members=members)
    await bot._async_setup_hook()  # after configure: dpytest replaces the connection state the loop is bound to
    await bot.setup_hook()
    return bot
