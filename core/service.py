"""What every front end shares: the engine, the per-chat store, the per-user limiter, and the follow-up memory."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from core.admin import since
from core.backend import Backend
from core.chat_store import ChatStore
from core.errors import UserError
from core.followups import FollowUps
from core.grammar import parse_settings_args
from core.inline import InlineAnswers
from core.knobs import Knobs, knob_specs, resolve_key, validate_knobs
from core.models import Models
from core.rate_limit import UserRateLimiter
from core.settings import Settings
from core.stops import Stops

LOG_DAYS = 31  # the request log kept at start: /stats reads a week, the quota today


@dataclass
class BotCore:
    settings: Settings
    engine: Backend  # the local engine or a remote server: core/backend.py is all front ends may use of it
    store: ChatStore
    limiter: UserRateLimiter
    followups: FollowUps
    # Set on SIGTERM: front ends stop taking new work (Telegram stops polling) while in-flight work finishes.
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    stops: Stops = field(default_factory=Stops)  # replies being streamed, for their stop buttons
    inline: InlineAnswers = field(default_factory=InlineAnswers)  # inline mode's debounce and recent answers
    models: Models | None = None  # every configured model; None: `engine` alone (see `served`)

    @property
    def served(self) -> Models:
        if self.models is None:
            self.models = Models.single(self.settings.model_name(), self.engine)
        return self.models

    def chat_model(self, chat: str) -> str:
        """The chat's model: its /model choice while that model serves, else the default."""
        chosen = self.store.chat_model(chat)
        return chosen if chosen in self.served.backends else self.served.default

    def help_model(self, chat: str) -> tuple[bool, str]:
        """For /help: whether the chat's model is steered by the labels, and its name when there is a choice."""
        name = self.chat_model(chat)
        steered = getattr(self.served.get(name), "sentiment", True)
        return steered, name if len(self.served.backends) > 1 or self.served.failed else ""

    def help_notice(self, chat: str) -> str:
        """For /help: what the chat's model's backend cannot do ("" when nothing), e.g. best_of without logprobs."""
        return getattr(self.served.get(self.chat_model(chat)), "notice", "")

    def set_chat_model(self, chat: str, name: str) -> str:
        name = self.served.check(name)
        self.store.set_chat_model(chat, name)
        return name

    @classmethod
    def create(cls, settings: Settings, engine: Backend, models: Models | None = None) -> BotCore:
        """`engine`: the default model's backend; `models`: all of them (core.models.start_models), if several."""
        store = ChatStore(settings.store.path)
        store.prune_log(since(LOG_DAYS))
        return cls(
            settings,
            engine,
            store,
            UserRateLimiter(settings.limits.user_interval_s),
            FollowUps(),
            models=models,
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
