"""Webhook mode for Telegram: an aiohttp receiver that checks Telegram's secret token and queues updates."""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from aiohttp import web
from telegram import Update
from telegram.ext import Application

from core.settings import TelegramSettings

WEBHOOK_MAX_BODY = 1024 * 1024
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


def webhook_app(application: Application, secret: str, path: str) -> web.Application:
    """Receives Telegram's POSTs (checked against the secret token) and queues them for the Application."""
    expected = secret.encode()

    async def receive(request: web.Request) -> web.Response:
        if not hmac.compare_digest(request.headers.get(SECRET_HEADER, "").encode(), expected):
            return web.Response(status=403)
        try:
            update = Update.de_json(await request.json(), application.bot)
        except Exception:  # noqa: BLE001 (malformed JSON or not an Update)
            return web.Response(status=400)
        await application.update_queue.put(update)
        return web.Response()

    server = web.Application(client_max_size=WEBHOOK_MAX_BODY)
    server.router.add_post(path, receive)
    return server


async def start_webhook(application: Application, settings: TelegramSettings, allowed_updates: list[str]) -> web.AppRunner:
    """An aiohttp receiver (PTB's own needs tornado), then setWebhook pointing Telegram at it."""
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else secrets.token_urlsafe(32)
    path = urlsplit(settings.webhook_url).path or "/"
    runner = web.AppRunner(webhook_app(application, secret, path), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.webhook_listen, settings.webhook_port).start()
    await application.bot.set_webhook(settings.webhook_url, secret_token=secret, allowed_updates=allowed_updates)
    return runner
