"""Throttle an engine stream to the rate a chat platform tolerates for message edits."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from core.types import Generation


async def throttled(stream: AsyncIterator[Generation], interval: float) -> AsyncIterator[Generation]:
    """Yield the first partial result after `interval` s, then at most one per `interval`, and always the last."""
    next_at = time.monotonic() + interval
    async for gen in stream:
        if gen.done:
            yield gen
            return
        now = time.monotonic()
        if now >= next_at:
            next_at = now + interval
            yield gen
