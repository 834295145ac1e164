"""The engine's CPU thread count is measured per batch size: the faster count wins, and a change in conditions (another
process competing for the cores) is noticed and measured again. Simulated step times, a fake clock: no timing."""

from __future__ import annotations

import pytest

from core import thread_tuner
from core.thread_tuner import ThreadTuner, bucket_of, candidates_for


class Machine:
    """A fake box: a step's duration depends on the thread count in force and the batch size."""

    def __init__(self, cost):
        self.now = 0.0
        self.threads = None
        self.cost = cost  # (threads, rows) -> seconds
        self.history: list[int] = []  # thread count of each step
        self.sets = 0

    def set_threads(self, n: int) -> None:
        self.threads, self.sets = n, self.sets + 1

    def clock(self) -> float:
        return self.now

    def step(self, rows: int) -> str:
        self.now += self.cost(self.threads, rows)
        self.history.append(self.threads)
        return "logits"


def tuner_on(machine: Machine, candidates=(2, 1)) -> ThreadTuner:
    return ThreadTuner(candidates, machine.set_threads, machine.clock)


def test_candidates_and_buckets():
    assert candidates_for(8) == (8, 4, 2, 1) and candidates_for(2) == (2, 1) and candidates_for(1) == (1,)
    assert candidates_for(6) == (6, 3, 1) and candidates_for(0) == (1,)
    assert [bucket_of(r) for r in (1, 2, 3, 4, 7, 8, 16, 31)] == [1, 2, 2, 3, 3, 4, 5, 5]


def test_measures_each_batch_size_interleaved_and_keeps_the_fastest():
    # two threads pay off for big batches only
    machine = Machine(lambda threads, rows: 0.010 + rows * (0.001 if threads == 2 else 0.002) + (0.004 if threads == 2 else 0))
    tuner = tuner_on(machine)
    for _ in range(20):
        assert tuner.run(1, machine.step, 1) == "logits"
    first = machine.history[: 2 * thread_tuner.SAMPLES]
    assert first == [2, 1] * thread_tuner.SAMPLES  # interleaved, so drift in the batch cancels out
    assert machine.history[2 * thread_tuner.SAMPLES:] == [1] * (20 - 2 * thread_tuner.SAMPLES)
    for _ in range(20):
        tuner.run(16, machine.step, 16)
    assert tuner.choices == {1: 1, 5: 2}
    assert machine.history[-5:] == [2] * 5


def test_another_process_competing_is_noticed_and_measured_again():
    contended = {"on": False}
    machine = Machine(lambda threads, rows: 0.020 * (6 if contended["on"] and threads == 2 else 1) / (1.5 if threads == 2 else 1))
    tuner = tuner_on(machine)
    for _ in range(10):
        tuner.run(16, machine.step, 16)
    assert tuner.choices == {5: 2}
    contended["on"] = True
    for _ in range(10):
        tuner.run(16, machine.step, 16)
    assert tuner.choices == {5: 1}  # one slow step started a new measurement at once
    slow_steps = sum(1 for t in machine.history[10:] if t == 2)
    assert slow_steps == 2  # the step that noticed, and one timed step: a clear loser is not timed again
    contended["on"] = False
    steps = int(thread_tuner.EXPLORE_EVERY_S / 0.020) + 2 * thread_tuner.SAMPLES + 1
    for _ in range(steps):  # after EXPLORE_EVERY_S of decoding it measures again, and goes back to two
        tuner.run(16, machine.step, 16)
    assert tuner.choices == {5: 2}


def test_a_single_candidate_is_never_measured():
    machine = Machine(lambda threads, rows: 0.01)
    tuner = tuner_on(machine, candidates=(3,))
    for rows in (1, 4, 16, 1):
        tuner.run(rows, machine.step, rows)
    assert machine.history == [3, 3, 3, 3] and machine.sets == 1


def test_a_failing_step_leaves_the_measurement_consistent():
    machine = Machine(lambda threads, rows: 0.01)
    tuner = tuner_on(machine)

    def broken(rows):
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError):
        tuner.run(4, broken, 4)
    for _ in range(2 * thread_tuner.SAMPLES):
        tuner.run(4, machine.step, 4)
    assert tuner.choices == {3: 2}  # ties go to the first (more threads)


def test_with_more_cpus_a_clear_loser_is_timed_once_and_the_rest_compared():
    cost = {8: 0.200, 4: 0.010, 2: 0.012, 1: 0.018}  # eight threads on a box where others hold half the cores
    machine = Machine(lambda threads, rows: cost[threads])
    tuner = tuner_on(machine, candidates=candidates_for(8))
    for _ in range(12):
        tuner.run(8, machine.step, 8)
    assert tuner.choices == {4: 4}
    assert machine.history.count(8) == 1 and machine.history[-1] == 4


def test_a_prefill_runs_at_the_count_chosen_for_the_batch_it_joins():
    # Under contention one thread wins at 16 rows; a prefill into that batch must not run at the losing count.
    machine = Machine(lambda threads, rows: {2: 0.5, 1: 0.03}[threads])
    tuner = tuner_on(machine)
    tuner.settle(16)  # nothing measured for 16 rows yet: the count in force stays
    assert machine.sets == 0
    for _ in range(2 * thread_tuner.SAMPLES):  # enough steps to finish the measurement
        tuner.run(16, machine.step, 16)
    assert tuner.choices[bucket_of(16)] == 1
    tuner.run(1, machine.step, 1)  # a one-row step measures its own bucket, starting at two threads
    assert machine.threads == 2
    tuner.settle(16)
    assert machine.threads == 1
    sets = machine.sets
    tuner.settle(16)  # already in force: not set again
    assert machine.sets == sets
