"""Keep secrets out of logs: a filter that replaces a token wherever a log record would show it."""

from __future__ import annotations

import logging


class TokenRedactor(logging.Filter):
    """Replaces the bot token in a record's message and traceback: it is part of every Bot API URL."""

    def __init__(self, token: str):
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 (a malformed record is logging's problem to report, not ours)
            return True
        if self.token in message:
            record.msg, record.args = message.replace(self.token, "<token>"), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and self.token in record.exc_text:
            record.exc_text = record.exc_text.replace(self.token, "<token>")
        return True


def redact_token_in_logs(token: str, prefixes: tuple[str, ...] = ("httpx", "httpcore", "telegram", "bot", "core")) -> None:
    """Attach a redactor to every logger that may see a Bot API URL (filters act where a record is made)."""
    names = [name for name in logging.Logger.manager.loggerDict if name.split(".")[0] in prefixes]
    for name in {*prefixes, *names}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, TokenRedactor) and f.token == token for f in logger.filters):
            logger.addFilter(TokenRedactor(token))
