"""One structured log line per finished request, safe to keep: no user text and no generated tokens at INFO.

The line is logfmt (`key=value …`) for people and grep; the same fields ride on the record as `record.request`
(a dict) for a JSON formatter. The chat is a keyed hash of its id whose key is random per process: lines of one
run can be grouped by chat, but a log file cannot be joined back to chat ids by hashing candidate ids.
"""

from __future__ import annotations

import hashlib
import logging
import secrets

from core.knobs import Knobs
from core.metrics import front_end_of

log = logging.getLogger("core.requests")
_KEY = secrets.token_bytes(16)


def chat_hash(origin: str) -> str:
    """8 hex characters standing for the chat id (`-` when the request came from no chat)."""
    if not origin:
        return "-"
    return hashlib.blake2b(origin.encode("utf-8"), digest_size=4, key=_KEY).hexdigest()


def log_request(origin: str, outcome: str, knobs: Knobs | None = None, seconds: float | None = None,
                new_tokens: int = 0, prompt: str | None = None) -> None:
    fields: dict[str, object] = {"frontend": front_end_of(origin), "chat": chat_hash(origin), "outcome": outcome}
    if knobs is not None:
        fields.update(knobs.as_dict())
    fields["new_tokens"] = new_tokens
    fields["latency_ms"] = None if seconds is None else round(seconds * 1000)
    line = " ".join(f"{key}={'-' if value is None else value}" for key, value in fields.items())
    log.info("request %s", line, extra={"request": fields})
    if prompt is not None and log.isEnabledFor(logging.DEBUG):
        # The user's text only at DEBUG, for a developer reproducing a report on their own instance.
        log.debug("request prompt chat=%s prompt=%r", fields["chat"], prompt)
