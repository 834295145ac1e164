"""A seed gives the same text alone or inside any batch (issue 18 item 3), at int8 (the CPU default) and in fp32."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from browser import CHROMIUM, Page, chromium_page
from conftest import make_settings, running_core, running_engine, shared_steps

from bot.web import create_app
from core.engine import Engine, row_seeds
from core.errors import UserError
from core.grammar import GenRequest, parse_gen
from core.knobs import SEED_MAX

PROMPTS = ["아 정말", "배우들의 연기가 너무", "스토리가", "이 영화는 처음부터 끝까지", "음악이", "감독이 누구인지 모르지만 정말"]
KNOBS = ["top_k=50", "top_k=5 temperature=0.7", "top_p=0.8", "top_k=20 repetition_penalty=1.3",
         "no_repeat_ngram_size=2 temperature=1.3", "top_k=51200 top_p=0.95", "top_k=1", "temperature=0.9 top_p=0.9"]


def seeded(engine: Engine, seed: int, best_of: int) -> GenRequest:
    """Seed `seed`'s request: its own prompt, label, length and knobs, so a batch of them is as mixed as it gets."""
    label = ("긍정", "부정")[seed % 2]
    text = (f"{label} {PROMPTS[seed % len(PROMPTS)]} seed={seed * 7919} best_of={best_of} "
            f"min_length={6 + seed % 5} max_length={14 + 3 * (seed % 4)} {KNOBS[seed % len(KNOBS)]}")
    return parse_gen(text, engine.defaults, engine.limits)


async def _alone_and_batched(engine: Engine, best_of: int) -> None:
    requests = [seeded(engine, seed, best_of) for seed in range(20)]
    alone = [await engine.generate(engine.prepare(r)) for r in requests]
    # Batches of 8: the 20 requests and, in the last batch, four mates from the first ones with fresh seeds.
    mates = [seeded(engine, 100 + seed, best_of) for seed in range(4)]
    batched = []
    everyone = requests + mates
    for start in range(0, len(everyone), 8):
        batched += await asyncio.gather(*(engine.generate(engine.prepare(r)) for r in everyone[start:start + 8]))
    assert [(a.continuations, a.seeds) for a in alone] == [(b.continuations, b.seeds) for b in batched[:20]]
    assert len({a.continuations for a in alone}) > 15  # different seeds and knobs, different texts
    assert shared_steps(engine, 1) > 0  # they really shared batches


@pytest.mark.parametrize("best_of", [1, 4])
@pytest.mark.parametrize("quantize", ["int8", "none"])
async def test_twenty_seeds_give_the_same_text_alone_and_in_a_mixed_batch_of_eight(
    tiny_dir: Path, tmp_path: Path, quantize: str, best_of: int
):
    settings = make_settings(tiny_dir, tmp_path, model={"quantize": quantize}, limits={"max_batch_size": 32})
    async with running_engine(settings) as engine:
        await _alone_and_batched(engine, best_of)


async def test_the_embedded_model_at_int8_keeps_seeds_in_a_mixed_batch(tmp_path: Path):
    """The default bot as shipped (models/nsmc-small, int8 on a CPU, the chat's best_of): 8 mixed requests."""
    from core.settings import load_settings

    settings = load_settings(store={"path": str(tmp_path / "s.sqlite3")})
    async with running_engine(settings) as engine:
        assert engine.source.endswith("(int8)")
        assert parse_gen("x", engine.defaults, engine.limits).knobs.best_of > 1  # the chat default reranks
        requests = []
        for seed in range(8):
            text = f"{('긍정', '부정')[seed % 2]} {PROMPTS[seed % len(PROMPTS)]} seed={seed} {KNOBS[seed]}"
            requests.append(parse_gen(text, engine.defaults, engine.limits))
        alone = [await engine.generate(engine.prepare(r)) for r in requests]
        batched = await asyncio.gather(*(engine.generate(engine.prepare(r)) for r in requests))
        assert [a.continuations for a in alone] == [b.continuations for b in batched]
        assert shared_steps(engine, 1) > 0


async def test_drawn_seeds_fit_javascript_and_the_range_is_checked(tiny_dir: Path, tmp_path: Path):
    assert SEED_MAX == 2**53 - 1
    assert max(row_seeds(SEED_MAX, 3, 4)) <= SEED_MAX
    async with running_engine(make_settings(tiny_dir, tmp_path)) as engine:
        drawn = [await engine.generate(parse_gen("긍정 아 n=2 best_of=2 min_length=8 max_length=8", engine.defaults, engine.limits))
                 for _ in range(5)]
        assert all(0 <= s <= SEED_MAX for g in drawn for s in g.seeds)
        with pytest.raises(UserError, match="seed"):
            parse_gen(f"아 seed={2**53}", engine.defaults, engine.limits)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
async def test_the_page_shows_each_candidates_seed_and_typed_back_it_gives_the_same_text(tiny_dir: Path, tmp_path: Path):
    """Drawn seeds (no seed asked), the chat's best_of 4, two candidates, int8: each candidate's shown seed, sent
    again from the page (seed, n=1, best_of=1), gives that candidate's text."""
    settings = make_settings(tiny_dir, tmp_path, generation={"best_of": 4})
    async with running_core(settings) as core, TestServer(create_app(core), host="127.0.0.1") as server, \
            chromium_page(tmp_path / "profile") as page:
        await page.goto(f"http://127.0.0.1:{server.port}/?label=%EA%B8%8D%EC%A0%95&prompt=%EC%95%84%20%EC%A0%95%EB%A7%90"
                        "&n=2&min_length=14&max_length=20&run=1")
        await page.wait_for("document.getElementById('results').dataset.done === '1'")
        shown = await page.evaluate("""[...document.querySelectorAll('.candidate')].map((c) =>
            [c.querySelector('.continuation').textContent, c.querySelector('.again').dataset.seed])""")
        assert len(shown) == 2 and all(int(seed) > 0 for _, seed in shown)
        # The first candidate by its button, the second by typing its seed into the form.
        await page.evaluate("document.querySelector('.candidate .again button').click()")
        first = await _single_result(page)
        await page.evaluate(f"""document.getElementById('seed').value = '{shown[1][1]}';
            document.getElementById('n').value = '1'; document.getElementById('best_of').value = '1';
            document.getElementById('submit').click()""")
        second = await _single_result(page)
    assert [first, second] == [[text, seed, "1", "1"] for text, seed in shown]


async def _single_result(page: Page) -> list[str]:
    await page.wait_for("document.getElementById('results').dataset.done === '1' && "
                        "document.querySelectorAll('.candidate').length === 1")
    return await page.evaluate("""[document.querySelector('.continuation').textContent,
        document.getElementById('seed').value, document.getElementById('n').value,
        document.getElementById('best_of').value]""")
