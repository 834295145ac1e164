"""The engine's fair admission, step by step (issue 19, item 1): no clock, only rows and their remaining steps."""

from __future__ import annotations

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
