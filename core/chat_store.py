"""Per-chat default knobs (Telegram chats, Discord channels), kept in an embedded SQLite file."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from core.errors import UserError
from core.knobs import Knobs, validate_knobs
from core.settings import LimitsSettings


class ChatStore:
    """Maps a chat key such as `telegram:123` or `discord:456` to its knob overrides."""

    def __init__(self, path: str | Path):
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS chat_knobs (chat TEXT PRIMARY KEY, knobs TEXT NOT NULL)")

    def overrides(self, chat: str) -> dict[str, object]:
        with self._lock:
            row = self._db.execute("SELECT knobs FROM chat_knobs WHERE chat = ?", (chat,)).fetchone()
        return json.loads(row[0]) if row else {}

    def update(self, chat: str, values: dict[str, object]) -> None:
        merged = {**self.overrides(chat), **values}
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO chat_knobs (chat, knobs) VALUES (?, ?) ON CONFLICT(chat) DO UPDATE SET knobs = excluded.knobs",
                (chat, json.dumps(merged)),
            )

    def reset(self, chat: str) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM chat_knobs WHERE chat = ?", (chat,))

    def knobs(self, chat: str, defaults: Knobs, limits: LimitsSettings) -> Knobs:
        """The chat's effective defaults; stale values that today's limits reject fall back to the server's."""
        try:
            return validate_knobs(self.overrides(chat), defaults, limits)
        except UserError:
            self.reset(chat)
            return defaults

    def close(self) -> None:
        with self._lock:
            self._db.close()
