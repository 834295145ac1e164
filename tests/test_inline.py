"""Inline mode's rules (core.inline) without Telegram: the debounce, the answer memory, one result per candidate."""

from __future__ import annotations

import asyncio

import pytest
from fake_backend import FakeClock, fake_core

from core import inline
from core.access import Access
from core.conversation import Conversation, Who
from core.inline import CANDIDATES, InlineAnswers, candidates
from core.settings import load_settings
from core.types import Generation


def _gen(prompt: str = "아 정말", n: int = 1, confidence: tuple[float, ...] | None = None) -> Generation:
    talk = Conversation(fake_core(load_settings(store={"path": ":memory:"}), FakeClock()))
    request = talk.from_text(f"긍정 {prompt} n={n}", Who("telegram:1", None)).request
    texts = tuple(f" 후보{i}" for i in range(n))
    return Generation(request, texts, tuple(range(40, 40 + n)), n, True, confidence=confidence)


async def test_a_query_left_unchanged_for_the_debounce_is_answered(monkeypatch):
    waited = []

    async def sleep(seconds):
        waited.append(seconds)

    monkeypatch.setattr(inline.asyncio, "sleep", sleep)
    answers = InlineAnswers(debounce_s=0.3)
    assert await answers.settled("telegram:5")
    assert waited == [0.3]
    assert await InlineAnswers().settled("telegram:5") and waited[-1] == inline.DEBOUNCE_S


async def test_a_newer_query_from_the_same_user_drops_the_older_one_only():
    answers = InlineAnswers(debounce_s=0)
    typed = [asyncio.create_task(answers.settled(user)) for user in ("telegram:5", "telegram:5", "telegram:6")]
    assert await asyncio.gather(*typed) == [False, True, True]
    # Settled queries leave nothing behind (the table does not grow with every user who ever typed), and the
    # same user typing again later is answered.
    assert answers._latest == {}
    assert await answers.settled("telegram:5")


def test_a_query_typed_again_with_other_spacing_is_the_same_answer():
    answers = InlineAnswers()
    gen = _gen()
    assert answers.cached("긍정 아 정말") is None
    answers.remember("긍정  아 정말 ", gen)
    assert answers.cached(" 긍정 아\n정말") is gen
    assert answers.cached("긍정 아 정말요") is None


def test_the_answer_memory_forgets_the_least_recently_asked_first():
    answers = InlineAnswers(capacity=2)
    first, second, third = _gen("하나"), _gen("둘"), _gen("셋")
    answers.remember("하나", first)
    answers.remember("둘", second)
    assert answers.cached("하나") is first  # asked again: now the most recent
    answers.remember("셋", third)
    assert answers.cached("둘") is None
    assert (answers.cached("하나"), answers.cached("셋")) == (first, third)


@pytest.mark.parametrize("confidence", [None, (0.9, 0.6, 0.55)])
def test_each_candidate_is_its_own_result_with_its_seed_and_confidence(confidence):
    gen = _gen(n=3, confidence=confidence)
    parts = candidates(gen)
    assert [(p.continuations, p.seeds) for p in parts] == [((" 후보0",), (40,)), ((" 후보1",), (41,)),
                                                           ((" 후보2",), (42,))]
    assert [p.confidence for p in parts] == ([None] * 3 if confidence is None else [(0.9,), (0.6,), (0.55,)])
    assert all(p.request is gen.request and p.done for p in parts)


def test_an_inline_query_offers_three_candidates_unless_it_sets_n():
    core = fake_core(load_settings(store={"path": ":memory:"}), FakeClock())
    talk = Conversation(core, Access({"user": []}))
    who = Who("telegram:5", "telegram:5", {"user": 5})
    assert talk.from_text("긍정 아 정말", who, candidates=CANDIDATES).request.knobs.n == 3
    assert talk.from_text("긍정 아 정말 n=1", Who("telegram:6", "telegram:6"), candidates=CANDIDATES).request.knobs.n == 1


@pytest.mark.parametrize(("limits", "best_of", "n"), [
    ({}, 4, 3),  # the shipped limits: three candidates of best_of 4 are 12 rows, within 16
    ({"max_candidates": 2}, 4, 2),
    ({"max_rows_per_request": 8}, 3, 2),  # 8 rows hold two candidates of best_of 3
    ({"max_rows_per_request": 4}, 4, 1),
    ({"max_rows_per_request": 2}, 1, 2),
])
def test_the_inline_candidates_are_held_to_the_limits(limits, best_of, n):
    settings = load_settings(store={"path": ":memory:"}, limits=limits, generation={"best_of": best_of})
    talk = Conversation(fake_core(settings, FakeClock()), Access({"user": []}))
    request = talk.from_text("긍정 아 정말", Who("telegram:5", "telegram:5", {"user": 5}), candidates=CANDIDATES).request
    assert (request.knobs.n, request.knobs.best_of) == (n, best_of) and request.rows <= settings.limits.max_rows_per_request
    two = talk.from_text("긍정 아 정말", Who("telegram:6", "telegram:6", {"user": 6}), candidates=2).request
    assert two.knobs.n == min(2, n)
