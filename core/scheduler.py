"""Fair admission to the engine's batch: one queue per user, served by rows in turn.

Each user's requests wait in their own first-in-first-out queue, so one user's backlog waits behind its own requests,
not in front of everyone else's. When rows of the batch are free, the waiting user who has been given the fewest
rows so far goes next (start-time fair queuing by rows: a user who starts waiting begins at the current virtual time,
so a newcomer is neither starved nor owed the past). A request too big for the free rows keeps its turn: nobody
overtakes it except requests that finish, at their longest, before enough running rows have ended for it (backfill),
so a big request is never starved by a stream of small ones. A user may have at most `user_rows` rows waiting (one
request always may); the queue holds at most `size` requests.

Thread-safe: the event loop puts and removes, the engine's worker thread waits and takes. No clock: `take` decides
from the rows and their remaining steps alone, so tests drive it step by step.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
MAX_REMEMBERED = 1024  # users not waiting whose lead over the others is still remembered


class QueueFull(Exception):
    """The queue holds `size` requests already."""


class UserQueueFull(Exception):
    """This user already has `cap` rows waiting."""

    def __init__(self, cap: int):
        super().__init__(cap)
        self.cap = cap


@dataclass(eq=False)
class _Entry(Generic[T]):
    item: T
    user: str
    rows: int
    steps: int  # at most this many decoding steps once admitted
    seq: int  # arrival order, to break ties


class FairQueue(Generic[T]):
    def __init__(self, size: int, user_rows: int):
        self.size = size
        self.user_rows = user_rows
        self._queues: dict[str, deque[_Entry[T]]] = {}
        self._entries: dict[int, _Entry[T]] = {}  # id(item) → its entry, for remove
        self._waiting_rows: dict[str, int] = {}
        self._served: dict[str, int] = {}  # each user's virtual start: rows given so far, from when they joined
        self._clock = 0  # the virtual time: the start tag of the last user served
        self._seq = itertools.count()
        self._arrivals = 0  # requests put so far: a waiter sees whether anyone came
        self._changed = threading.Condition()

    # ---- event-loop side -------------------------------------------------------------------------------------
    def put(self, user: str, item: T, rows: int, steps: int, capped: bool = True) -> None:
        """Queue `item` (`rows` rows, at most `steps` steps); QueueFull or UserQueueFull when it may not wait.
        `capped=False`: the user's waiting rows are not capped (the operator's own work: evaluation, benchmarks)."""
        with self._changed:
            if len(self._entries) >= self.size:
                raise QueueFull
            waiting = self._waiting_rows.get(user, 0)
            if capped and waiting and waiting + rows > self.user_rows:
                raise UserQueueFull(self.user_rows)
            queue = self._queues.get(user)
            if queue is None:  # starts waiting: from now on, not from when it was last served
                queue = self._queues[user] = deque()
                self._served[user] = max(self._served.get(user, 0), self._clock)
            entry = _Entry(item, user, rows, max(1, steps), next(self._seq))
            queue.append(entry)
            self._entries[id(item)] = entry
            self._waiting_rows[user] = waiting + rows
            self._arrivals += 1
            self._changed.notify_all()

    def remove(self, item: T) -> bool:
        """Forget a waiting `item` (its caller went away); False when it is not waiting (taken, or never put)."""
        with self._changed:
            entry = self._entries.pop(id(item), None)
            if entry is None:
                return False
            queue = self._queues[entry.user]
            queue.remove(entry)
            self._dequeued(entry, queue)
            return True

    # ---- worker side -----------------------------------------------------------------------------------------
    def wait(self, timeout: float, rows: int = 1) -> bool:
        """Block up to `timeout` s until at least `rows` rows wait; whether they do."""
        with self._changed:
            return self._changed.wait_for(lambda: sum(self._waiting_rows.values()) >= rows, timeout)

    def gather(self, window: float, quiet: float, rows: int, clock: Callable[[], float] = time.monotonic) -> None:
        """An idle engine's wait for company before it starts: until `rows` rows wait, `window` s have passed, or
        `quiet` s pass with no new request. A lone request then starts after `quiet`, not the whole window, while a
        burst (its requests arrive about a millisecond apart, each parsed on the event loop) starts as one batch."""
        with self._changed:
            deadline = clock() + window
            while sum(self._waiting_rows.values()) < rows and (left := deadline - clock()) > 0:
                seen = self._arrivals
                if not self._changed.wait_for(lambda seen=seen: self._arrivals != seen, min(quiet, left)):
                    return  # nobody came for `quiet` s

    def take(self, free: int, running: Sequence[int] = ()) -> list[T]:
        """Requests to start now in `free` rows, fairly; `running`: each running row's remaining steps (at most)."""
        taken: list[T] = []
        running = list(running)
        with self._changed:
            while free > 0 and self._queues:
                order = sorted(self._queues, key=lambda u: (self._served[u], self._queues[u][0].seq))
                head = self._queues[order[0]][0]
                if head.rows <= free:
                    chosen = head
                else:  # the turn's owner does not fit yet: only what ends before its rows are free may start
                    shadow = _rows_free_after(running, free, head.rows)
                    chosen = next((e for u in order[1:] if (e := self._queues[u][0]).rows <= free
                                   and e.steps <= shadow), None)
                    if chosen is None:
                        break
                self._start(chosen)
                taken.append(chosen.item)
                free -= chosen.rows
                running.extend([chosen.steps] * chosen.rows)
        return taken

    def __len__(self) -> int:
        return len(self._entries)

    def waiting_rows(self, user: str | None = None) -> int:
        with self._changed:
            return self._waiting_rows.get(user, 0) if user is not None else sum(self._waiting_rows.values())

    # ---- bookkeeping -----------------------------------------------------------------------------------------
    def _start(self, entry: _Entry[T]) -> None:
        queue = self._queues[entry.user]
        queue.popleft()
        del self._entries[id(entry.item)]
        self._clock = max(self._clock, self._served[entry.user])
        self._served[entry.user] += entry.rows
        self._dequeued(entry, queue)

    def _dequeued(self, entry: _Entry[T], queue: deque[_Entry[T]]) -> None:
        self._waiting_rows[entry.user] -= entry.rows
        if not queue:
            del self._queues[entry.user]
            del self._waiting_rows[entry.user]
        # A user not waiting whose tag the clock has passed would restart at the clock anyway: forget it. Past
        # MAX_REMEMBERED such users (a crowd of one-off users all served at the same turn), the clock moves up to
        # forgive the smallest leads first, so the table stays small.
        idle = sorted((tag, u) for u, tag in self._served.items() if u not in self._queues)
        if len(idle) > MAX_REMEMBERED:
            self._clock = max(self._clock, idle[len(idle) - MAX_REMEMBERED - 1][0])
        for tag, user in idle:
            if tag > self._clock:
                break
            del self._served[user]


def _rows_free_after(running: Sequence[int], free: int, needed: int) -> int:
    """Steps until `needed` rows are free at the latest, if each running row ends within its remaining steps."""
    shadow = 0
    for steps in sorted(running):
        if free >= needed:
            break
        free += 1
        shadow = steps
    return shadow
