"""Who may use the bot: optional allowlists of ids (Telegram chats/users, Discord servers/channels).

The rule lives here once; each front end only says which ids a message carries and acts on the verdict.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.chat_store import ChatStore

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


class StoredAccess:
    """The allowlists as the store holds them, changed at run time by admins (/allow, /deny) and seeded from the
    settings' lists. Same rule as `Access` — no allowed ids: everyone; otherwise an id on its list — plus denials:
    a denied id is refused even when the lists are empty (a ban)."""

    def __init__(self, store: ChatStore, platform: str, lists: Mapping[str, Iterable[int]], refusal: str = "reply"):
        if refusal not in ("reply", "ignore"):
            raise ValueError(f"refusal must be 'reply' or 'ignore', not {refusal!r}")
        self.store, self.platform, self.kinds, self.refusal = store, platform, tuple(lists), refusal
        store.seed_access(platform, {kind: list(ids) for kind, ids in lists.items()})

    def entries(self) -> dict[tuple[str, int], bool]:
        return self.store.access_entries(self.platform)

    def set(self, kind: str, id_: int, allowed: bool) -> None:
        self.store.set_access(self.platform, kind, id_, allowed)

    def allows(self, **ids: int | None) -> bool:
        unknown = set(ids) - set(self.kinds)
        if unknown:
            raise TypeError(f"unknown id kinds: {sorted(unknown)}")
        entries = self.entries()
        given = [(kind, i) for kind, i in ids.items() if i is not None]
        if any(entries.get(pair) is False for pair in given):
            return False
        if not any(entries.values()):
            return True
        return any(entries.get(pair) for pair in given)

    def check(self, **ids: int | None) -> Verdict:
        if self.allows(**ids):
            return Verdict.ALLOW
        return Verdict.REFUSE if self.refusal == "reply" else Verdict.IGNORE


def telegram_access(settings, store: ChatStore | None = None) -> Access | StoredAccess:  # noqa: ANN001
    lists = {"chat": settings.allowed_chat_ids, "user": settings.allowed_user_ids}
    return Access(lists, settings.refusal) if store is None else StoredAccess(store, "telegram", lists, settings.refusal)


def discord_access(settings, store: ChatStore | None = None) -> Access | StoredAccess:  # noqa: ANN001
    lists = {"guild": settings.allowed_guild_ids, "channel": settings.allowed_channel_ids}
    return Access(lists, settings.refusal) if store is None else StoredAccess(store, "discord", lists, settings.refusal)
