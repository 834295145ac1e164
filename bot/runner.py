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


RETRY_FIRST_S, RETRY_MAX_S = 1.0, 60.0

Serve = Callable[[BotCore, asyncio.Event], Awaitable[None]]


@dataclass(frozen=True)
class FrontEnd:
    name: str
    module: str  # imported only when enabled; it provides `async def serve(core, stop)`
    enabled: Callable[[Settings], bool]
    retry_on: str = ""  # the module's exception for "unreachable, try again later"; serve is retried with backoff


FRONT_ENDS = (
    FrontEnd("web", "bot.web", lambda s: s.web.enabled),
    # Telegram retries inside its serve (PTB's initialize loop).
    FrontEnd("telegram", "bot.telegram_app", lambda s: s.telegram.secret() is not None),
    FrontEnd("discord", "bot.discord_bot", lambda s: s.discord.secret() is not None, retry_on="DiscordUnreachable"),
)


def retrying(name: str, serve: Serve, transient: type[BaseException]) -> Serve:
    """`serve`, run again with exponential backoff (up to RETRY_MAX_S) while it fails with `transient`: a platform
    that is unreachable at start (or later) must not stop the other front ends."""

    async def run(core: BotCore, stop: asyncio.Event) -> None:
        delay = RETRY_FIRST_S
        while not stop.is_set():
            try:
                await serve(core, stop)
                return
            except transient as exc:
                log.warning("%s: %s; retrying in %.0f s", name, exc, delay)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                delay = min(delay * 2, RETRY_MAX_S)

    return run


def load_serve(fe: FrontEnd) -> Serve:
    module = importlib.import_module(fe.module)
    return retrying(fe.name, module.serve, getattr(module, fe.retry_on)) if fe.retry_on else module.serve


def enabled_front_ends(settings: Settings) -> list[FrontEnd]:
    return [fe for fe in FRONT_ENDS if fe.enabled(settings)]


async def drain(core: BotCore) -> None:
    """Stop taking new work, let in-flight generations finish (up to `limits.shutdown_grace_s`) while the front ends
    still run to send their replies; what is left after the grace is answered with the Korean "restarting" error."""
    grace = core.settings.limits.shutdown_grace_s
    core.draining.set()
    log.info("stopping: finishing in-flight generations (up to %g s)", grace)
    left = await core.served.drain(grace)
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
        tasks[asyncio.create_task(load_serve(fe)(core, front_stop), name=fe.name)] = fe.name
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
