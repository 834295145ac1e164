"""What every front end shares: the engine, the per-chat store, the per-user limiter, and the follow-up memory."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from core.backend import Backend
from core.chat_store import ChatStore
from core.errors import UserError
from core.followups import FollowUps
from core.grammar import parse_settings_args
from core.knobs import Knobs, knob_specs, resolve_key, validate_knobs
from core.rate_limit import UserRateLimiter
from core.settings import Settings


@dataclass
class BotCore:
    settings: Settings
    engine: Backend  # the local engine or a remote server: core/backend.py is all front ends may use of it
    store: ChatStore
    limiter: UserRateLimiter
    followups: FollowUps
    # Set on SIGTERM: front ends stop taking new work (Telegram stops polling) while in-flight work finishes.
    draining: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def create(cls, settings: Settings, engine: Backend) -> BotCore:
        return cls(
            settings,
            engine,
            ChatStore(settings.store.path),
            UserRateLimiter(settings.limits.user_interval_s),
            FollowUps(),
        )

    def chat_knobs(self, chat: str) -> Knobs:
        return self.store.knobs(chat, self.engine.defaults, self.settings.limits)

    def set_chat_knobs(self, args: str, chat: str) -> Knobs:
        values = parse_settings_args(args, self.chat_knobs(chat), self.settings.limits)
        return self.set_chat_values(values, chat)

    def set_chat_values(self, values: dict[str, object], chat: str) -> Knobs:
        self.store.update(chat, values)
        return self.chat_knobs(chat)

    def set_chat_fields(self, fields: Mapping[str, object], chat: str) -> Knobs:
        """Typed knob fields (Discord's /set options; None = not given), validated like `/set key=value`."""
        given = {key: value for key, value in fields.items() if value is not None}
        if not given:
            raise UserError("바꿀 설정을 key=value로 적어 주세요. 예: /set top_p=0.9 (nothing to set)")
        knobs = validate_knobs(given, self.chat_knobs(chat), self.settings.limits)
        specs = knob_specs(self.settings.limits)
        return self.set_chat_values({name: getattr(knobs, name) for name in (resolve_key(k, specs) for k in given)}, chat)

    def reset_chat_knobs(self, chat: str) -> Knobs:
        self.store.reset(chat)
        return self.chat_knobs(chat)
