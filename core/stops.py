"""Replies being streamed that can be stopped: a short random key per reply, the asker it belongs to, and the event
the streamed-reply loop watches. Stopping closes the backend's stream, which is how the engine frees a request's
rows (at its next step) — the same path as a reader that went away."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field

from core.errors import UserError

STOP_GONE = "이미 끝났거나 멈춘 생성입니다. (this generation has already finished or stopped)"
NOT_YOURS = "요청한 사람만 멈출 수 있습니다. (only the person who asked can stop it)"


@dataclass
class _Running:
    owner: str | None  # the asker's user key; None (the web): whoever holds the key, which only the asker was sent
    event: asyncio.Event = field(default_factory=asyncio.Event)


class Stops:
    def __init__(self) -> None:
        self._running: dict[str, _Running] = {}

    def open(self, owner: str | None) -> tuple[str, asyncio.Event]:
        key = secrets.token_urlsafe(6)  # 8 characters, like the follow-up keys
        running = _Running(owner)
        self._running[key] = running
        return key, running.event

    def close(self, key: str) -> None:
        self._running.pop(key, None)

    def stop(self, key: str, user: str | None) -> None:
        """Stop the reply `key` for `user`; a UserError when it is over already or belongs to someone else."""
        running = self._running.get(key)
        if running is None:
            raise UserError(STOP_GONE)
        if running.owner is not None and running.owner != user:
            raise UserError(NOT_YOURS)
        running.event.set()
