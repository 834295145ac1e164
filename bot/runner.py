"""Start every enabled front end in one asyncio process over one engine, and stop them cleanly."""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from core.service import BotCore
from core.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrontEnd:
    name: str
    module: str  # imported only when enabled; it provides `async def serve(core, stop)`
    enabled: Callable[[Settings], bool]


FRONT_ENDS = (
    FrontEnd("web", "bot.web", lambda s: s.web.enabled),
    FrontEnd("telegram", "bot.telegram_app", lambda s: s.telegram.secret() is not None),
    FrontEnd("discord", "bot.discord_bot", lambda s: s.discord.secret() is not None),
)


def enabled_front_ends(settings: Settings) -> list[FrontEnd]:
    return [fe for fe in FRONT_ENDS if fe.enabled(settings)]


async def drain(core: BotCore) -> None:
    """Stop taking new work, let in-flight generations finish (up to `limits.shutdown_grace_s`) while the front ends
    still run to send their replies; what is left after the grace is answered with the Korean "restarting" error."""
    grace = core.settings.limits.shutdown_grace_s
    core.draining.set()
    log.info("stopping: finishing in-flight generations (up to %g s)", grace)
    left = await core.engine.drain(grace)
    if left:
        log.warning("%d generations were unfinished after %g s; they were told the bot is restarting", left, grace)


async def run_front_ends(core: BotCore, stop: asyncio.Event) -> bool:
    """Run until `stop` is set (or a front end fails), drain in-flight work, then stop the front ends.

    Returns False when a front end failed (a rejected token, a port in use), so the process can exit non-zero."""
    fronts = enabled_front_ends(core.settings)
    if not fronts:
        log.warning("no front end enabled: set web.enabled, BOT_TELEGRAM__TOKEN or BOT_DISCORD__TOKEN")
        return False
    tasks: dict[asyncio.Task, str] = {}
    front_stop = asyncio.Event()  # set after the drain, so replies of in-flight work can still be sent
    for fe in fronts:
        serve: Callable[[BotCore, asyncio.Event], Awaitable[None]] = importlib.import_module(fe.module).serve
        tasks[asyncio.create_task(serve(core, front_stop), name=fe.name)] = fe.name
    log.info("started: %s", ", ".join(fe.name for fe in fronts))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({stopper, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    await drain(core)
    front_stop.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    stopper.cancel()
    failed = [(name, exc) for name, exc in zip(tasks.values(), outcomes) if isinstance(exc, Exception)]
    for name, exc in failed:
        log.error("front end %s failed: %s", name, exc)
    return not failed


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not on this platform / not the main thread
            pass
