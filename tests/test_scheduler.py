"""The engine's fair admission, step by step (issue 19, item 1): no clock, only rows and their remaining steps."""

from __future__ import annotations

import threading

import pytest

from core.scheduler import MAX_REMEMBERED, FairQueue, QueueFull, UserQueueFull


def test_one_users_backlog_waits_behind_its_own_requests():
    q: FairQueue[str] = FairQueue(size=64, user_rows=1000)
    for i in range(5):
        q.put("flood", f"F{i}", rows=16, steps=128)
    q.put("small", "S0", rows=1, steps=16)
    assert q.take(16) == ["F0"]  # first come
    assert q.take(0, [128] * 16) == []  # the batch is full
    # F0 ended: the small user, served nothing yet, goes before the flood's second request (FIFO gave it 6th).
    assert q.take(16) == ["S0"]  # and F1 (16 rows) does not fit beside it
    assert len(q) == 4 and q.waiting_rows("flood") == 64 and q.waiting_rows("small") == 0


def test_turns_are_shared_by_rows_not_by_requests():
    q: FairQueue[str] = FairQueue(size=64, user_rows=1000)
    for i in range(3):
        q.put("a", f"A{i}", rows=4, steps=10)
    for i in range(8):
        q.put("b", f"B{i}", rows=1, steps=10)
    rounds = [q.take(4) for _ in range(5)]  # each round: the previous one has ended
    assert rounds == [["A0"], ["B0", "B1", "B2", "B3"], ["A1"], ["B4", "B5", "B6", "B7"], ["A2"]]


def test_a_newcomer_starts_at_the_current_turn_not_owed_the_past():
    q: FairQueue[str] = FairQueue(size=64, user_rows=1000)
    for i in range(4):
        q.put("a", f"A{i}", rows=2, steps=10)
    assert [q.take(2) for _ in range(3)] == [["A0"], ["A1"], ["A2"]]  # a alone: served 6 rows
    for i in range(4):
        q.put("b", f"B{i}", rows=2, steps=10)
    # b starts at a's last start (4), not at 0: one turn ahead of a (6), then they alternate.
    assert [q.take(2) for _ in range(4)] == [["B0"], ["A3"], ["B1"], ["B2"]]


def test_a_big_request_keeps_its_turn_and_only_what_ends_before_it_may_pass():
    q: FairQueue[str] = FairQueue(size=64, user_rows=1000)
    q.put("big", "G", rows=4, steps=50)
    q.put("small", "long", rows=1, steps=20)
    q.put("other", "short", rows=1, steps=5)
    # 3 rows free; the running row ends within 10 steps. G needs 4: "long" (20 steps) would hold a row past that and
    # is not let by; "short" (5 steps) ends before G could start anyway.
    assert q.take(3, running=[10]) == ["short"]
    assert q.take(2, running=[9, 5]) == []
    assert q.take(4, running=[]) == ["G"]
    assert q.take(0, running=[50] * 4) == []
    assert q.take(4, running=[]) == ["long"]


def test_a_big_request_is_not_starved_by_a_stream_of_small_ones():
    q: FairQueue[str] = FairQueue(size=1000, user_rows=1000)
    q.put("big", "G", rows=16, steps=128)
    running = [8]  # one small row running, 8 steps left
    started = None
    for step in range(100):
        q.put("small", f"S{step}", rows=1, steps=8)  # a new small request every step
        taken = q.take(16 - len(running), running)
        if "G" in taken:
            started = step
            break
        running = [s - 1 for s in running + [8] * len(taken) if s > 1]
    assert started is not None and started <= 8


def test_caps_per_user_and_overall():
    q: FairQueue[str] = FairQueue(size=4, user_rows=8)
    q.put("a", "A0", rows=16, steps=10)  # one request may always wait, even one bigger than the cap
    with pytest.raises(UserQueueFull) as refused:
        q.put("a", "A1", rows=1, steps=10)
    assert refused.value.cap == 8
    q.put("b", "B0", rows=4, steps=10)
    q.put("b", "B1", rows=4, steps=10)
    with pytest.raises(UserQueueFull):
        q.put("b", "B2", rows=1, steps=10)
    q.put("c", "C0", rows=1, steps=10)
    with pytest.raises(QueueFull):
        q.put("internal", "I0", rows=1, steps=10, capped=False)
    q.remove("C0")
    q.put("b", "B3", rows=8, steps=10, capped=False)  # the operator's own work: only the queue's size holds it
    with pytest.raises(QueueFull):
        q.put("d", "D0", rows=1, steps=10)


def test_a_removed_request_frees_its_users_share_at_once():
    q: FairQueue[str] = FairQueue(size=4, user_rows=4)
    q.put("a", "A0", rows=4, steps=10)
    assert q.remove("A0") and not q.remove("A0")
    q.put("a", "A1", rows=4, steps=10)  # not refused: A0 no longer counts
    assert len(q) == 1 and q.take(4) == ["A1"] and len(q) == 0


def test_wait_reports_whether_enough_rows_wait():
    q: FairQueue[str] = FairQueue(size=4, user_rows=100)
    assert q.wait(0, rows=1) is False
    q.put("a", "A0", rows=3, steps=10)
    assert q.wait(0, rows=3) is True and q.wait(0, rows=4) is False


def test_the_table_of_users_stays_small():
    q: FairQueue[str] = FairQueue(size=10, user_rows=100)
    for i in range(3000):
        q.put(f"u{i}", i, rows=1, steps=1)
        assert q.take(1) == [i]
    assert len(q._served) <= MAX_REMEMBERED + 1  # users long gone are forgotten


def test_only_what_ends_by_the_time_enough_rows_are_free_may_pass():
    # One row free, three running with 3, 5 and 8 steps left: the 3-row request at the head has its rows after 5 steps.
    def queue(*others: tuple[str, int], rows: int = 3) -> FairQueue[str]:
        q: FairQueue[str] = FairQueue(size=64, user_rows=1000)
        q.put("big", "G", rows=rows, steps=50)
        for name, steps in others:
            q.put(name, name, rows=1, steps=steps)
        return q

    assert queue(("five", 5), ("six", 6)).take(1, running=[8, 3, 5]) == ["five"]  # ends with the 5-step row: passes
    assert queue(("six", 6)).take(1, running=[8, 3, 5]) == []  # one step longer: would hold G's row
    assert queue(("two", 2)).take(1, running=[8, 3, 5]) == ["two"]
    assert queue(("one", 1), rows=2).take(1, running=[9, 1]) == ["one"]  # G needs one more row: free after 1 step
    assert queue(("none", 0), rows=2).take(1, running=[9, 1]) == ["none"]  # no steps at all counts as one
    assert queue(("two", 2), rows=2).take(1, running=[9, 1]) == []
    assert queue(("one", 1)).take(2, running=[]) == []  # nothing running: no row will ever be freed before G's turn


def test_arrival_breaks_a_tie_between_users_not_who_came_first_long_ago():
    q: FairQueue[str] = FairQueue(size=64, user_rows=1000)
    q.put("a", "A0", rows=1, steps=10)
    q.put("b", "B0", rows=1, steps=10)
    q.put("a", "A1", rows=1, steps=10)
    assert q.remove("A0")  # its asker left: a's next request is younger than b's
    assert q.take(1) == ["B0"] and q.take(1) == ["A1"]


def test_removing_one_request_keeps_the_users_others():
    q: FairQueue[str] = FairQueue(size=64, user_rows=1000)
    for item in ("A0", "A1", "A2"):
        q.put("a", item, rows=2, steps=10)
    assert q.remove("A1")
    assert len(q) == 2 and q.waiting_rows("a") == 4 and q.waiting_rows() == 4
    assert q.take(10) == ["A0", "A2"] and q.waiting_rows() == 0 and q.waiting_rows("a") == 0


def test_a_user_who_comes_back_keeps_the_lead_they_took():
    q: FairQueue[str] = FairQueue(size=64, user_rows=1000)
    q.put("a", "A0", rows=8, steps=10)
    assert q.take(8) == ["A0"]  # a alone took 8 rows at turn 0
    q.put("a", "A1", rows=1, steps=10)  # back before anyone else came: still 8 rows ahead
    q.put("b", "B0", rows=1, steps=10)
    assert q.take(1) == ["B0"] and q.take(1) == ["A1"]


def test_past_the_memory_bound_only_the_smallest_leads_are_forgiven():
    q: FairQueue[str] = FairQueue(size=MAX_REMEMBERED + 8, user_rows=10_000)
    users = [f"u{i}" for i in range(MAX_REMEMBERED + 1)]
    for rows, user in enumerate(users, 1):  # all at turn 0: leads of 1, 2, … rows, each remembered
        q.put(user, user, rows=rows, steps=1)
    for rows, user in enumerate(users, 1):
        assert q.take(rows) == [user]
    # One user past the bound: the clock moved to the smallest lead (1), so u0 is forgiven, u1 (2) is not.
    q.put("u1", "again-u1", rows=1, steps=1)
    q.put("u0", "again-u0", rows=1, steps=1)
    q.put("new", "new", rows=1, steps=1)
    assert [q.take(1) for _ in range(3)] == [["again-u0"], ["new"], ["again-u1"]]


def test_wait_wakes_when_another_thread_puts_enough_rows():
    q: FairQueue[str] = FairQueue(size=4, user_rows=100)
    q.put("a", "A0", rows=1, steps=10)
    assert q.wait(0) is True  # one row waiting is enough by default
    q.take(1)
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(q.wait(30, rows=2)))
    waiter.start()
    q.put("a", "A1", rows=2, steps=10)
    waiter.join(30)
    assert woke == [True]


def test_what_starts_in_this_turn_counts_for_the_next_pass():
    # 3 rows free, rows running with 2, 8 and 9 steps left; G needs 5: its rows are free after 8 steps. The 2-step
    # request passes and ends before then too, so the next pass finds G's rows free after 8 steps, not 9.
    q: FairQueue[str] = FairQueue(size=64, user_rows=1000)
    q.put("big", "G", rows=5, steps=50)
    q.put("short", "X", rows=1, steps=2)
    q.put("long", "Y", rows=1, steps=9)
    assert q.take(3, running=[9, 2, 8]) == ["X"]


# gather's clock is frozen in these tests: its window never ends, so only the rules under test can end a wait (a
# broken rule hangs, and the per-test timeout fails it by name).
def frozen() -> float:
    return 0.0


def test_gather_ends_once_nobody_came_for_the_quiet_time():
    queue: FairQueue[str] = FairQueue(size=8, user_rows=8)
    queue.put("a", "lone", 1, 1)
    queue.gather(window=1.0, quiet=0.001, rows=4, clock=frozen)
    assert queue.take(4) == ["lone"]


def test_gather_ends_at_once_when_the_rows_wait_or_the_window_is_zero():
    queue: FairQueue[str] = FairQueue(size=8, user_rows=8)
    for i in range(4):
        queue.put("a", f"r{i}", 1, 1)
    queue.gather(window=3600.0, quiet=3600.0, rows=4, clock=frozen)  # four rows wait: nothing to sit out
    queue.gather(window=0.0, quiet=3600.0, rows=8)  # no window: no wait
    assert queue.take(8) == ["r0", "r1", "r2", "r3"]


def test_gather_keeps_waiting_while_requests_keep_coming():
    queue: FairQueue[str] = FairQueue(size=8, user_rows=8)
    queue.put("a", "first", 1, 1)
    about_to_wait = threading.Event()

    def clock() -> float:  # gather reads it holding the queue's lock: a put can only land once it waits
        about_to_wait.set()
        return 0.0

    def arrive() -> None:
        for item in ("second", "third"):
            about_to_wait.wait()
            about_to_wait.clear()
            queue.put(item, item, 1, 1)

    other = threading.Thread(target=arrive)
    other.start()
    # A quiet time of an hour and a window that never ends (the clock stands still): only the arrivals (each
    # restarts the quiet time) and the third row can end this wait.
    queue.gather(window=0.5, quiet=3600.0, rows=3, clock=clock)
    assert queue.waiting_rows() == 3
    other.join()
    assert queue.take(3) == ["first", "second", "third"]
