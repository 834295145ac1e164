"""The engine with candidates that end unevenly and a batch at its limit, over a tiny model whose end-of-text token
is made likely (a bias on its logit), so rows really end at different steps."""

from __future__ import annotations

import asyncio

import pytest
from conftest import make_settings, shared_steps
from tiny_model import make_end_likely

from core.engine import Engine
from core.grammar import parse_gen
from core.model_loading import load_model
from core.types import Generation


@pytest.fixture
async def ending(tiny_dir, tmp_path):
    settings = make_settings(tiny_dir, tmp_path, model={"quantize": "none"},
                             limits={"max_batch_size": 4, "max_rows_per_request": 4, "batch_window_ms": 200})
    loaded = load_model(settings.model)
    make_end_likely(loaded.model, loaded.tokenizer.eos_token_id)
    engine = Engine(loaded, settings)
    engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


def lengths(engine: Engine, gen: Generation) -> list[int]:
    return [len(engine.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in gen.continuations]


async def generate(engine: Engine, text: str) -> Generation:
    return await engine.generate(engine.prepare(parse_gen(text, engine.defaults, engine.limits)))


async def test_a_request_is_answered_when_its_last_candidate_ends(ending: Engine):
    together = await generate(ending, "긍정 아 정말 n=3 seed=11 min_length=1 max_length=60")
    alone = [await generate(ending, f"긍정 아 정말 seed={11 + g} min_length=1 max_length=60") for g in range(3)]
    assert together.continuations == tuple(a.continuations[0] for a in alone)
    assert len(set(lengths(ending, together))) > 1  # they did end at different steps
    assert together.new_tokens == sum(a.new_tokens for a in alone)


async def test_a_stream_ends_with_every_candidate_complete(ending: Engine):
    prepared = ending.prepare(parse_gen("부정 별로 n=3 seed=5 min_length=1 max_length=60", ending.defaults, ending.limits))
    states = [gen async for gen in ending.stream(prepared)]
    assert states[-1].done and all(not s.done for s in states[:-1])
    assert states[-1].continuations == (await ending.generate(prepared)).continuations


async def test_the_batch_fills_up_to_max_batch_size_and_never_past_it(ending: Engine):
    texts = ["긍정 아 정말 n=3 seed=1", "부정 별로 n=3 seed=2", "긍정 배우 seed=3", "부정 최악 seed=4", "긍정 좋다 n=2 seed=5"]
    fixed = " min_length=30 max_length=30"  # no early end: every row runs its whole length
    results = await asyncio.gather(*(generate(ending, t + fixed) for t in texts))
    assert [len(r.continuations) for r in results] == [3, 3, 1, 1, 2]
    assert shared_steps(ending, 3) > 0  # four rows decoded together ...
    assert shared_steps(ending, 4) == 0  # ... and never five or more


async def test_a_request_that_does_not_fit_the_running_batch_waits_for_room(ending: Engine):
    first = asyncio.ensure_future(generate(ending, "긍정 아 정말 n=3 seed=1 min_length=30 max_length=30"))
    await asyncio.sleep(0)  # submitted first: the worker takes it and waits out the window for company
    second = asyncio.ensure_future(generate(ending, "부정 별로 n=2 seed=2 min_length=30 max_length=30"))
    results = await asyncio.gather(first, second)
    assert [len(r.continuations) for r in results] == [3, 2]
    assert shared_steps(ending, 4) == 0  # 3 + 2 rows would be five
