"""The Telegram application: PTB's ApplicationBuilder with the handlers of bot/telegram_bot.py, run by long polling
or a webhook until stopped, with the per-chat flood limiter of bot/telegram_delivery.py."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from telegram import BotCommand, Update
from telegram.error import InvalidToken, NetworkError, TelegramError
from telegram.ext import Application, ApplicationBuilder, InlineQueryHandler

from bot.log_redaction import redact_token_in_logs
from bot.telegram_bot import CONVERSATION_KEY, add_handlers
from bot.telegram_delivery import PerChatRateLimiter
from bot.telegram_inline import inline_query
from bot.telegram_texts import COMMANDS
from bot.telegram_webhook import start_webhook
from core.access import telegram_access
from core.conversation import Conversation
from core.service import BotCore

log = logging.getLogger(__name__)

GROUP_MESSAGES_PER_MINUTE = 20  # Telegram's flood limit for a group …
GROUP_PERIOD_S = 60.0  # … per this many seconds
REPLY_GRACE_S = 10.0  # at shutdown (after the engine's drain), how long queued replies may take to go out
ALLOWED_UPDATES = [Update.MESSAGE, Update.EDITED_MESSAGE, Update.CALLBACK_QUERY, Update.INLINE_QUERY]


async def _post_init(application: Application) -> None:
    commands = [BotCommand(name, description) for name, description in COMMANDS]
    try:
        await application.bot.set_my_commands(commands)
    except TelegramError as exc:  # the menu is a nicety; the bot works without it
        log.warning("setMyCommands failed: %s", exc)


def build_application(core: BotCore, token: str | None = None) -> Application:
    """The PTB Application with every handler, the per-chat rate limiter and concurrent updates."""
    settings = core.settings.telegram
    token = token or settings.secret()
    if not token:
        raise ValueError("텔레그램 토큰이 없습니다. BOT_TELEGRAM__TOKEN을 설정하세요. (no Telegram token)")
    redact_token_in_logs(token)  # before build(): PTB logs the base URL, token included, at DEBUG
    application = (
        ApplicationBuilder()
        .token(token)
        .base_url(settings.base_url)
        .base_file_url(settings.base_file_url)
        .rate_limiter(PerChatRateLimiter(group_max_rate=GROUP_MESSAGES_PER_MINUTE, group_time_period=GROUP_PERIOD_S))
        .concurrent_updates(True)  # a slow generation in one chat must not delay /help in another
        .post_init(_post_init)
        .build()
    )
    admins = frozenset(f"telegram:{i}" for i in settings.admin_user_ids)
    application.bot_data[CONVERSATION_KEY] = Conversation(core, telegram_access(settings, core.store), admins)
    add_handlers(application)
    application.add_handler(InlineQueryHandler(inline_query))  # BotFather's /setinline turns these updates on
    return application


# ---- running ---------------------------------------------------------------------------------------------------
async def _initialize(application: Application, stop: asyncio.Event) -> bool:
    """getMe until it works; a network outage at start waits, a rejected token fails at once."""
    delay = 1.0
    while not stop.is_set():
        try:
            await application.initialize()
            return True
        except InvalidToken:
            raise InvalidToken("텔레그램이 토큰을 거부했습니다. BOT_TELEGRAM__TOKEN을 확인하세요. (token rejected)") from None
        except NetworkError as exc:
            log.warning("cannot reach the Telegram Bot API (%s); retrying in %.0f s", exc, delay)
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            delay = min(delay * 2, 60.0)
    return False


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def serve(core: BotCore, stop: asyncio.Event) -> None:
    """Run the bot (webhook if `telegram.webhook_url` is set, long polling otherwise) until `stop` is set."""
    application = build_application(core)
    webhook: web.AppRunner | None = None
    try:
        if not await _initialize(application, stop):
            return
        await application.post_init(application)  # run_polling would call it; we drive the lifecycle ourselves
        await application.start()
        if core.settings.telegram.webhook_url:
            webhook = await start_webhook(application, core.settings.telegram, ALLOWED_UPDATES)
        else:
            await application.updater.start_polling(allowed_updates=ALLOWED_UPDATES)
        mode = "webhook" if webhook else "long polling"
        log.info("telegram bot @%s running (%s)", application.bot.username, mode)
        if not application.bot.supports_inline_queries:
            log.info("telegram: inline mode is off for @%s; BotFather's /setinline turns it on", application.bot.username)
        await _first(core.draining, stop)
        if application.updater and application.updater.running:
            # Stop fetching; PTB confirms the offset of every fetched update, so a restart goes on from the next one.
            # Handlers already running keep going and send their replies until `stop` (after the drain).
            await application.updater.stop()
        await stop.wait()
        # Replies stuck behind a group's flood limit must not hold the shutdown for minutes.
        await application.bot.rate_limiter.close(REPLY_GRACE_S)
    finally:
        if webhook is not None:
            await webhook.cleanup()
        if application.updater and application.updater.running:
            await application.updater.stop()
        if application.running:
            await application.stop()
        await application.shutdown()
        await application.bot.shutdown()  # closes the HTTP clients even when getMe never succeeded
