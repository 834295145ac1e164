"""A bound on repeated warnings and errors in the log: a flood of failing clients (half-sent bodies, resets, a full
descriptor table) must not grow the log without bound or spend the event loop on formatting tracebacks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

BURST = 10  # records of one kind let through per window …
WINDOW_S = 60.0  # … per this many seconds; the next one after the window says how many were dropped
MAX_KINDS = 1000  # kinds remembered at once (a message's template, not its values, is its kind)


class RepeatLimiter(logging.Filter):
    """At most `burst` WARNING-or-worse records per `window_s` for each (logger, level, message template); INFO and
    below (the one-line-per-request log) always pass."""

    def __init__(self, burst: int = BURST, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._kinds: dict[tuple, list] = {}  # kind → [window start, records in window, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now, kind = self.clock(), (record.name, record.levelno, str(record.msg))
        state = self._kinds.get(kind)
        if state is None or now - state[0] >= self.window_s:
            dropped = state[2] if state else 0
            if len(self._kinds) >= MAX_KINDS:
                self._kinds = {k: s for k, s in self._kinds.items() if now - s[0] < self.window_s}
                if len(self._kinds) >= MAX_KINDS:
                    self._kinds.clear()
            state = self._kinds[kind] = [now, 0, 0]
            if dropped:
                record.msg = f"{record.msg} [{dropped} more like this were not logged in the last {self.window_s:g} s]"
        state[1] += 1
        if state[1] > self.burst:
            state[2] += 1
            return False
        return True


def limit_repeats(logger: logging.Logger | None = None) -> None:
    """Put a RepeatLimiter on every handler of `logger` (the root logger's: where every record is written)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RepeatLimiter) for f in handler.filters):
            handler.addFilter(RepeatLimiter())
