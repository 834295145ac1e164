"""How many CPU threads the engine's steps use: measured while serving, not assumed.

On an idle 2-core box two threads decode a batch of 16 about 1.4× faster than one. When another process wants
the same cores, the two threads wait for each other at every operation while one of them is descheduled, and one
thread became 3-10× faster than two here (`benchmarks/engine_speed.py`'s contended row). Which case holds changes
while the bot runs, so the engine asks this tuner before each step: from time to time it times a few steps at each
candidate count, interleaved so that drift in the batch cancels out, and keeps the fastest. Choices are kept per
batch size (1, 2-3, 4-7, … rows), since the best count for one row is not the best for sixteen.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

# Re-measure a batch size after this much decoding at it, or at once when a step takes more than SLOWDOWN times
# what the last measurement gave (another process just started competing).
EXPLORE_EVERY_S = 10.0
SLOWDOWN = 2.0
SAMPLES = 3  # steps timed per candidate in one measurement (the median is compared)

log = logging.getLogger(__name__)
T = TypeVar("T")


def candidates_for(cpus: int) -> tuple[int, ...]:
    """All usable CPUs, then halving down to one: 8 → (8, 4, 2, 1)."""
    out = [max(1, cpus)]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return tuple(out)


def bucket_of(rows: int) -> int:
    """Batch sizes 1, 2-3, 4-7, 8-15, … share a choice."""
    return max(1, rows).bit_length()


@dataclass
class _Choice:
    threads: int
    busy_s: float = 0.0  # decoding time since it was measured
    reference_s: float | None = None  # the winner's median step time when measured
    plan: list[int] = field(default_factory=list)  # candidates still to time, in order
    timings: dict[int, list[float]] = field(default_factory=dict)


class ThreadTuner:
    def __init__(self, candidates: tuple[int, ...], set_threads: Callable[[int], None],
                 clock: Callable[[], float] = time.perf_counter):
        self.candidates = candidates
        self._set_threads = set_threads
        self._clock = clock
        self._choices: dict[int, _Choice] = {}
        self._active: int | None = None

    @property
    def choices(self) -> dict[int, int]:
        """The thread count chosen per batch-size bucket so far (for logs and tests)."""
        return {bucket: choice.threads for bucket, choice in self._choices.items()}

    def settle(self, rows: int) -> None:
        """Use the count chosen for `rows` rows, untimed, for work that is not a step (a prefill before the batch
        reaches that size). Under contention a prefill at the losing count took 2-4 s instead of 0.1 s."""
        choice = self._choices.get(bucket_of(rows))
        if choice is not None and choice.reference_s is not None and choice.threads != self._active:
            self._set_threads(choice.threads)
            self._active = choice.threads

    def run(self, rows: int, step: Callable[..., T], *args: object) -> T:
        """`step(*args)`, one engine step of `rows` rows, with the thread count this batch size should use; the
        time it took teaches the tuner."""
        choice = self._choices.setdefault(bucket_of(rows), _Choice(self.candidates[0]))
        if len(self.candidates) > 1 and not choice.plan and (
                choice.reference_s is None or choice.busy_s >= EXPLORE_EVERY_S):
            choice.plan = [c for _ in range(SAMPLES) for c in self.candidates]
            choice.timings = {}
        threads = choice.plan[0] if choice.plan else choice.threads
        if threads != self._active:
            self._set_threads(threads)
            self._active = threads
        started = self._clock()
        result = step(*args)
        seconds = self._clock() - started
        if choice.plan:
            choice.timings.setdefault(choice.plan.pop(0), []).append(seconds)
            self._drop_hopeless(choice)
            if not choice.plan:
                medians = {c: statistics.median(t) for c, t in choice.timings.items()}
                best = min(medians, key=lambda c: (medians[c], self.candidates.index(c)))
                if best != choice.threads:
                    log.info("steps of %d+ rows now use %d CPU thread(s) (median ms per step by threads: %s)",
                             1 << (bucket_of(rows) - 1), best,
                             ", ".join(f"{c}: {m * 1000:.1f}" for c, m in medians.items()))
                choice.threads = best
                choice.reference_s, choice.busy_s = medians[choice.threads], 0.0
        else:
            choice.busy_s += seconds
            if choice.reference_s is not None and seconds > SLOWDOWN * choice.reference_s:
                choice.busy_s = EXPLORE_EVERY_S  # conditions changed: measure again at the next step
        return result

    @staticmethod
    def _drop_hopeless(choice: _Choice) -> None:
        """Stop timing a count whose fastest step was over SLOWDOWN times another's: under contention the slow
        count's steps are the expensive ones, and a clear loser needs no more samples."""
        if len(choice.timings) < 2:
            return
        fastest = {c: min(t) for c, t in choice.timings.items()}
        best = min(fastest.values())
        hopeless = {c for c, f in fastest.items() if f > SLOWDOWN * best}
        choice.plan = [c for c in choice.plan if c not in hopeless]
        for c in hopeless:
            del choice.timings[c]
        if len(set(choice.plan) | set(choice.timings)) == 1:
            choice.plan = []  # one count left: nothing to compare it with
