"""Sending to Telegram under its flood limits: PTB's rate limiter, with 429s pausing only the chat that got them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator

from telegram.error import BadRequest, NetworkError, RetryAfter, TimedOut
from telegram.ext import AIORateLimiter

log = logging.getLogger(__name__)

SEND_RETRIES = 3  # how often one request is retried after a 429 retry_after, a 5xx or a dropped connection
NETWORK_RETRY_S = 0.5  # first pause before retrying a 5xx or a dropped connection (doubles each time)


class PerChatRateLimiter(AIORateLimiter):
    """PTB's AIORateLimiter (30 msg/s overall, 20/min per group), but a 429 pauses only the chat that got it.

    AIORateLimiter halts every request after any 429; Telegram's flood limits are mostly per chat, so one busy
    group must not stall replies everywhere else. A group's allowance goes to final texts first: `spare` says
    whether a chat can afford typing and partial edits (no send waiting, room beyond the finals still owed).
    """

    __slots__ = ("_closing_until", "_finals_owed", "_in_flight", "_paused_until", "_retries", "_waiting")

    def __init__(self, max_retries: int = SEND_RETRIES, group_max_rate: float = 20, group_time_period: float = 60):
        super().__init__(max_retries=0, group_max_rate=group_max_rate, group_time_period=group_time_period)
        self._retries = max_retries
        self._paused_until: dict[str, float] = {}
        self._waiting: Counter[str] = Counter()  # sends of a chat not yet through its limiter
        self._finals_owed: Counter[int] = Counter()  # generations under way per chat, each owes one final text
        self._in_flight: set[asyncio.Task] = set()
        self._closing_until: float | None = None  # set by close(): sends after this moment are dropped

    @contextlib.contextmanager
    def final_owed(self, chat_id: int) -> Iterator[None]:
        """Around one generation's reply: it will need one message for its final text."""
        self._finals_owed[chat_id] += 1
        try:
            yield
        finally:
            self._finals_owed[chat_id] -= 1
            if self._finals_owed[chat_id] <= 0:
                del self._finals_owed[chat_id]

    def spare(self, chat_id: int) -> bool:
        """Whether `chat_id` can afford a non-essential call now without delaying a final text."""
        if self._waiting[str(chat_id)] or self._paused_until.get(str(chat_id), 0.0) > time.monotonic():
            return False
        if chat_id >= 0 or not self._group_max_rate:
            return True
        needed = self._finals_owed[chat_id] + 1
        limiter = self._group_limiters.get(chat_id)
        return needed <= self._group_max_rate if limiter is None else limiter.has_capacity(needed)

    async def close(self, grace: float) -> None:
        """At shutdown: let queued sends go out for up to `grace` s, then cancel the rest (their handlers end). Sends
        that start later (a handler still finishing its generation) get what is left of the grace, then fail."""
        self._closing_until = time.monotonic() + grace
        pending = {task for task in self._in_flight if not task.done()}
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                log.warning("shutdown: %d Telegram sends were still waiting for a flood limit; dropped", len(late))

    async def _wait_turn(self, key: str) -> None:
        while (left := self._paused_until.get(key, 0.0) - time.monotonic()) > 0:
            await asyncio.sleep(left)

    def _pause(self, key: str, seconds: float) -> None:
        now = time.monotonic()
        self._paused_until = {k: t for k, t in self._paused_until.items() if t > now}
        self._paused_until[key] = max(self._paused_until.get(key, 0.0), now + seconds)

    async def process_request(self, callback, args, kwargs, endpoint, data, rate_limit_args):  # noqa: ANN001, ANN201 (PTB's signature)
        chat_id = data.get("chat_id")
        key = "" if chat_id is None else str(chat_id)
        task = asyncio.current_task()
        self._in_flight.add(task)
        self._waiting[key] += 1
        try:
            send = self._send(callback, args, kwargs, endpoint, data, rate_limit_args, chat_id, key)
            if self._closing_until is None:
                return await send
            # Shutting down: a flood-limit wait must not hold the stop (issue 12.5).
            return await asyncio.wait_for(send, max(0.0, self._closing_until - time.monotonic()))
        finally:
            self._in_flight.discard(task)
            self._waiting[key] -= 1
            if self._waiting[key] <= 0:
                del self._waiting[key]

    async def _send(self, callback, args, kwargs, endpoint, data, rate_limit_args, chat_id, key):  # noqa: ANN001, ANN202, PLR0913
        group = chat_id if isinstance(chat_id, str) or (isinstance(chat_id, int) and chat_id < 0) else False
        retries = self._retries if rate_limit_args is None else rate_limit_args
        for attempt in range(retries + 1):
            await self._wait_turn(key)
            try:
                return await self._run_request(
                    chat=chat_id is not None,
                    group=group,
                    allow_paid_broadcast=bool(data.get("allow_paid_broadcast", False)),
                    callback=callback,
                    args=args,
                    kwargs=kwargs,
                )
            except RetryAfter as exc:
                if attempt == retries:
                    raise
                seconds = exc._retry_after.total_seconds() + 0.1  # noqa: SLF001 (int or timedelta publicly)
                log.info("Telegram flood limit on %s for chat %s: retrying in %.1f s", endpoint, key or "-", seconds)
                self._pause(key, seconds)
            except (BadRequest, TimedOut):
                # A bad request fails again; a timed-out send may have been delivered, so retrying could send twice.
                raise
            except NetworkError as exc:  # a 5xx or a connection dropped before the answer: Telegram did not take it
                if attempt == retries:
                    raise
                seconds = NETWORK_RETRY_S * 2**attempt
                log.info("Telegram %s failed for chat %s (%s): retrying in %.1f s", endpoint, key or "-", exc, seconds)
                await asyncio.sleep(seconds)
        raise AssertionError("unreachable")
