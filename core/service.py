"""What every front end shares: the engine, the per-chat store, the per-user limiter, and the request rules."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from core.chat_store import ChatStore
from core.engine import Engine
from core.errors import UserError
from core.followups import FollowUps
from core.grammar import GenRequest, parse_gen, parse_settings_args
from core.knobs import Knobs
from core.rate_limit import UserRateLimiter
from core.settings import Settings


@dataclass
class BotCore:
    settings: Settings
    engine: Engine
    store: ChatStore
    limiter: UserRateLimiter
    followups: FollowUps
    # Set on SIGTERM: front ends stop taking new work (Telegram stops polling) while in-flight work finishes.
    draining: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def create(cls, settings: Settings, engine: Engine) -> BotCore:
        return cls(
            settings,
            engine,
            ChatStore(settings.store.path),
            UserRateLimiter(settings.limits.user_interval_s),
            FollowUps(engine),
        )

    def chat_knobs(self, chat: str) -> Knobs:
        return self.store.knobs(chat, self.engine.defaults, self.settings.limits)

    def gen_request(self, args: str, chat: str, user: str) -> GenRequest:
        """Parse `/gen` arguments with the chat's defaults, then charge the user's rate limit."""
        try:
            request = parse_gen(args, self.chat_knobs(chat), self.settings.limits)
            self.engine.encode_prompt(request)  # prompt-length errors before the rate limit is charged
        except UserError:
            self.engine.telemetry.refused(chat, "user_error")
            raise
        try:
            self.limiter.check(user)
        except UserError:
            self.engine.telemetry.refused(chat, "rate_limited")
            raise
        # The chat key ("telegram:123") tells metrics and logs the front end; follow-ups inherit it.
        return replace(request, origin=chat)

    def set_chat_knobs(self, args: str, chat: str) -> Knobs:
        values = parse_settings_args(args, self.chat_knobs(chat), self.settings.limits)
        self.store.update(chat, values)
        return self.chat_knobs(chat)

    def reset_chat_knobs(self, chat: str) -> Knobs:
        self.store.reset(chat)
        return self.chat_knobs(chat)
