"""Who may use the bot: optional allowlists of ids (Telegram chats/users, Discord servers/channels).

The rule lives here once; each front end only says which ids a message carries and acts on the verdict.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

REFUSAL = (
    "죄송합니다, 이 봇은 여기에서 사용할 수 없습니다. 봇 관리자에게 문의해 주세요. "
    "(sorry, this bot is not available here; ask the bot's operator)"
)


class Verdict(enum.Enum):
    ALLOW = "allow"
    REFUSE = "refuse"  # answer with REFUSAL
    IGNORE = "ignore"  # answer nothing


class Access:
    """Every list empty: everyone is allowed. Otherwise an id that is on its list is enough (lists are alternatives:
    `allowed_chat_ids=[group]` plus `allowed_user_ids=[me]` lets the group use the bot, and me anywhere)."""

    def __init__(self, lists: Mapping[str, Iterable[int]], refusal: str = "reply"):
        if refusal not in ("reply", "ignore"):
            raise ValueError(f"refusal must be 'reply' or 'ignore', not {refusal!r}")
        self.lists = {name: frozenset(ids) for name, ids in lists.items()}
        self.refusal = refusal

    @property
    def open(self) -> bool:
        return not any(self.lists.values())

    def allows(self, **ids: int | None) -> bool:
        unknown = set(ids) - set(self.lists)
        if unknown:
            raise TypeError(f"unknown id kinds: {sorted(unknown)}")
        if self.open:
            return True
        return any(ids.get(name) is not None and ids[name] in allowed for name, allowed in self.lists.items())

    def check(self, **ids: int | None) -> Verdict:
        if self.allows(**ids):
            return Verdict.ALLOW
        return Verdict.REFUSE if self.refusal == "reply" else Verdict.IGNORE


def telegram_access(settings) -> Access:  # noqa: ANN001 (TelegramSettings)
    return Access({"chat": settings.allowed_chat_ids, "user": settings.allowed_user_ids}, settings.refusal)


def discord_access(settings) -> Access:  # noqa: ANN001 (DiscordSettings)
    return Access({"guild": settings.allowed_guild_ids, "channel": settings.allowed_channel_ids}, settings.refusal)
