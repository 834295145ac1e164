"""Per-user spacing between generations, so one user cannot flood the shared engine."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from core.errors import RateLimited


class UserRateLimiter:
    """At most one generation per `interval` seconds per user key; remembers at most `capacity` users.

    A user is told to wait once per window; further refusals in the same window are quiet (`RateLimited.quiet`),
    so a spammer's burst cannot make the bot flood a group with "please wait" replies.
    """

    def __init__(self, interval: float, capacity: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.capacity = capacity
        self.clock = clock
        self._last: OrderedDict[str, float] = OrderedDict()
        self._told: set[str] = set()  # refused since their last admitted generation

    def check(self, user: str) -> None:
        """Record a generation for `user`, or raise RateLimited saying how long to wait."""
        if self.interval <= 0:
            return
        now = self.clock()
        last = self._last.get(user)
        if last is not None and (wait := self.interval - (now - last)) > 0:
            seconds = max(1, math.ceil(wait))
            quiet = user in self._told
            self._told.add(user)
            raise RateLimited(
                f"조금만 천천히 해 주세요. {seconds}초 후에 다시 시도해 주세요. (please wait {seconds} s)", quiet=quiet
            )
        self._told.discard(user)
        self._last[user] = now
        self._last.move_to_end(user)
        while len(self._last) > self.capacity:
            old, _ = self._last.popitem(last=False)
            self._told.discard(old)
