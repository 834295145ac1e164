"""The embedded SQLite store: per-chat default knobs (Telegram chats, Discord channels), the allowlists as admins
change them at run time, and a log of requests and refusals (per-user daily quotas, /stats)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from pathlib import Path

from core.errors import StoreError, UserError
from core.knobs import Knobs, validate_knobs
from core.settings import LimitsSettings

log = logging.getLogger(__name__)

_PROBE = "\x00write-probe"  # a chat key no front end makes


def _why(path: str, exc: BaseException) -> str:
    """One sentence, Korean first: what is wrong with the store file, from SQLite's or the OS's error."""
    text = str(exc).lower()
    if Path(path).is_dir():
        reason = "파일이 아니라 디렉터리입니다 (it is a directory; store.path names a file)"
    elif "readonly" in text or "read-only" in text or isinstance(exc, PermissionError) or (
        "unable to open" in text and not os.access(Path(path).parent, os.W_OK | os.X_OK)
    ):
        uid = os.getuid() if hasattr(os, "getuid") else "?"
        reason = (f"쓸 수 없습니다: 읽기 전용이거나 uid {uid}에게 권한이 없습니다 "
                  f"(not writable: read-only, or no permission for uid {uid})")
    elif "full" in text or getattr(exc, "errno", None) == 28:
        reason = "디스크가 가득 찼습니다 (the disk is full)"
    elif "not a database" in text or "malformed" in text or "corrupt" in text:
        reason = "SQLite 데이터베이스가 아니거나 손상되었습니다 (not an SQLite database, or corrupt)"
    else:
        reason = f"열 수 없습니다 (cannot be used: {str(exc).strip() or type(exc).__name__})"
    return f"저장소 {path} (store.path): {reason}"


class ChatStore:
    """Maps a chat key such as `telegram:123` or `discord:456` to its knob overrides.

    Opening proves the file is readable and writable, so an unusable path fails at start, not at a user's /set.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            if self.path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(_why(self.path, exc)) from None
        self._lock = threading.Lock()
        try:
            with self._lock, self._db:
                self._db.execute("CREATE TABLE IF NOT EXISTS chat_knobs (chat TEXT PRIMARY KEY, knobs TEXT NOT NULL)")
                self._db.execute("CREATE TABLE IF NOT EXISTS access_list (platform TEXT NOT NULL, kind TEXT NOT NULL, "
                                 "id INTEGER NOT NULL, allowed INTEGER NOT NULL, PRIMARY KEY (platform, kind, id))")
                self._db.execute("CREATE TABLE IF NOT EXISTS request_log (day TEXT NOT NULL, platform TEXT NOT NULL, "
                                 "user TEXT, outcome TEXT NOT NULL, seconds REAL)")
                self._db.execute("CREATE TABLE IF NOT EXISTS chat_model (chat TEXT PRIMARY KEY, model TEXT NOT NULL)")
                self._db.execute("CREATE INDEX IF NOT EXISTS request_log_user ON request_log (day, user, outcome)")
                self._db.execute("INSERT OR REPLACE INTO chat_knobs (chat, knobs) VALUES (?, '{}')", (_PROBE,))
                self._db.execute("DELETE FROM chat_knobs WHERE chat = ?", (_PROBE,))
        except (OSError, sqlite3.Error) as exc:
            self._db.close()
            raise StoreError(_why(self.path, exc)) from None

    def _failed(self, exc: BaseException, ko: str, en: str) -> StoreError:
        log.error("store %s: could not %s chat settings: %s", self.path, en, exc)
        return StoreError(
            f"채팅 설정을 {ko} 못했습니다. {_why(self.path, exc)}. 생성은 계속 쓸 수 있습니다. "
            f"(could not {en} the chat settings: a store failure; /gen still works)"
        )

    def overrides(self, chat: str) -> dict[str, object]:
        try:
            with self._lock:
                row = self._db.execute("SELECT knobs FROM chat_knobs WHERE chat = ?", (chat,)).fetchone()
        except sqlite3.Error as exc:
            raise self._failed(exc, "읽지", "read") from None
        return json.loads(row[0]) if row else {}

    def update(self, chat: str, values: dict[str, object]) -> None:
        merged = {**self.overrides(chat), **values}
        try:
            with self._lock, self._db:
                self._db.execute(
                    "INSERT INTO chat_knobs (chat, knobs) VALUES (?, ?) ON CONFLICT(chat) DO UPDATE SET knobs = excluded.knobs",
                    (chat, json.dumps(merged)),
                )
        except sqlite3.Error as exc:
            raise self._failed(exc, "저장하지", "save") from None

    def reset(self, chat: str) -> None:
        try:
            with self._lock, self._db:
                self._db.execute("DELETE FROM chat_knobs WHERE chat = ?", (chat,))
        except sqlite3.Error as exc:
            raise self._failed(exc, "초기화하지", "reset") from None

    def knobs(self, chat: str, defaults: Knobs, limits: LimitsSettings) -> Knobs:
        """The chat's effective defaults; stale values that today's limits reject fall back to the server's. A store
        that cannot be read or cleaned up gives the server's defaults too: the chat keeps working."""
        try:
            return validate_knobs(self.overrides(chat), defaults, limits)
        except StoreError:
            return defaults
        except UserError:
            try:
                self.reset(chat)
            except StoreError:
                pass  # logged; the stale value is ignored again next time
            return defaults

    # ---- the chat's model (/model) ---------------------------------------------------------------------------------
    def chat_model(self, chat: str) -> str | None:
        try:
            with self._lock:
                row = self._db.execute("SELECT model FROM chat_model WHERE chat = ?", (chat,)).fetchone()
        except sqlite3.Error as exc:
            log.error("store %s: could not read a chat's model: %s", self.path, exc)
            return None  # the default model serves
        return row[0] if row else None

    def set_chat_model(self, chat: str, model: str) -> None:
        try:
            with self._lock, self._db:
                self._db.execute("INSERT INTO chat_model VALUES (?, ?) ON CONFLICT (chat) DO UPDATE SET model = "
                                 "excluded.model", (chat, model))
        except sqlite3.Error as exc:
            raise self._failed(exc, "저장하지", "save") from None

    # ---- allowlists at run time (platform "telegram" kinds chat/user, "discord" guild/channel) ------------------
    def seed_access(self, platform: str, lists: dict[str, list[int]]) -> None:
        """The settings' lists, added once: an id an admin denied later stays denied across restarts."""
        rows = [(platform, kind, i) for kind, ids in lists.items() for i in ids]
        with self._lock, self._db:
            self._db.executemany("INSERT OR IGNORE INTO access_list VALUES (?, ?, ?, 1)", rows)

    def set_access(self, platform: str, kind: str, id_: int, allowed: bool) -> None:
        try:
            with self._lock, self._db:
                self._db.execute("INSERT INTO access_list VALUES (?, ?, ?, ?) ON CONFLICT (platform, kind, id) "
                                 "DO UPDATE SET allowed = excluded.allowed", (platform, kind, id_, int(allowed)))
        except sqlite3.Error as exc:
            raise self._failed(exc, "저장하지", "save") from None

    def access_entries(self, platform: str) -> dict[tuple[str, int], bool]:
        try:
            with self._lock:
                rows = self._db.execute("SELECT kind, id, allowed FROM access_list WHERE platform = ?",
                                        (platform,)).fetchall()
        except sqlite3.Error as exc:
            raise self._failed(exc, "읽지", "read") from None
        return {(kind, id_): bool(allowed) for kind, id_, allowed in rows}

    # ---- the request log -----------------------------------------------------------------------------------------
    def log_request(self, day: str, platform: str, user: str | None, outcome: str, seconds: float | None = None) -> None:
        """One admitted request ("admitted"), its end ("ok" with its latency), or a refusal (its reason)."""
        try:
            with self._lock, self._db:
                self._db.execute("INSERT INTO request_log VALUES (?, ?, ?, ?, ?)", (day, platform, user, outcome, seconds))
        except sqlite3.Error as exc:  # bookkeeping must not fail a request
            log.error("store %s: could not log a request: %s", self.path, exc)

    def prune_log(self, before_day: str) -> None:
        """Forget the request log before `before_day` (quotas need today, /stats a week)."""
        try:
            with self._lock, self._db:
                self._db.execute("DELETE FROM request_log WHERE day < ?", (before_day,))
        except sqlite3.Error as exc:
            log.error("store %s: could not prune the request log: %s", self.path, exc)

    def admitted_on(self, day: str, user: str) -> int:
        """Requests `user` was admitted for on `day`; 0 when the store cannot be read (the quota is not a reason to
        stop generating)."""
        try:
            with self._lock:
                (count,) = self._db.execute("SELECT COUNT(*) FROM request_log WHERE day = ? AND user = ? AND "
                                            "outcome = 'admitted'", (day, user)).fetchone()
        except sqlite3.Error as exc:
            log.error("store %s: could not read the request log: %s", self.path, exc)
            return 0
        return count

    def request_rows(self, since_day: str) -> list[tuple[str, str, str | None, str, float | None]]:
        try:
            with self._lock:
                return self._db.execute("SELECT day, platform, user, outcome, seconds FROM request_log WHERE day >= ?",
                                        (since_day,)).fetchall()
        except sqlite3.Error as exc:
            raise self._failed(exc, "읽지", "read") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()
