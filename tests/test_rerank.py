"""best_of: the label rerank is the model's own log-likelihood ratio, picks reproducibly, and composes with n,
seeds, batching and streaming."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace

import pytest
import torch
from conftest import make_settings, running_engine

from core import rerank
from core.engine import Engine, row_seeds
from core.errors import UserError
from core.grammar import parse_gen
from core.types import Generation


@pytest.fixture
async def engine(tiny_dir, tmp_path):
    # fp32: int8 quantizes activations with one scale per batch, so exact equality across batches needs fp32.
    async with running_engine(make_settings(tiny_dir, tmp_path, model={"quantize": "none"})) as eng:
        yield eng


def req(engine: Engine, text: str):
    return engine.prepare(parse_gen(text, engine.defaults, engine.limits))


def label_scores(model, own, other, continuations):
    """Per continuation: log p(c | own label's context) − log p(c | the other label's context), both from scratch."""
    k = len(continuations)
    logps = rerank.continuation_logprobs(model, [own] * k + [other] * k, list(continuations) * 2)
    return [a - b for a, b in zip(logps[:k], logps[k:])]


@pytest.mark.parametrize("chunk", [rerank.LOGITS_PER_CHUNK, 1])  # 1: every row through the model on its own
def test_continuation_logprobs_are_the_log_likelihoods_computed_one_sequence_at_a_time(engine: Engine, monkeypatch,
                                                                                        chunk):
    monkeypatch.setattr(rerank, "LOGITS_PER_CHUNK", chunk)
    tok, model = engine.tokenizer, engine.model
    own = tok("긍정 아 정말", add_special_tokens=False)["input_ids"]
    other = tok("부정 아 정말", add_special_tokens=False)["input_ids"]
    conts = [tok(" 재밌다 최고", add_special_tokens=False)["input_ids"], [engine.eos_id],
             tok(" 별로 지루한 영화", add_special_tokens=False)["input_ids"] + [engine.eos_id]]

    def logp(ctx, cont):  # plain, unbatched, no padding
        with torch.inference_mode():
            out = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].float(), -1)
        return sum(float(out[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))

    expected = [logp(own, c) - logp(other, c) for c in conts]
    assert label_scores(model, own, other, conts) == pytest.approx(expected, abs=1e-3)


def test_pick_best_and_confidence():
    assert rerank.pick_best([0.1, 2.0, -1.0, 0.5, 0.5, 3.0], groups=2) == [1, 5]
    assert rerank.pick_best([1.0, 1.0], groups=1) == [0]  # a tie goes to the lowest seed
    # With a threshold: the first candidate read as surely on-label, else the arg-max of its group.
    sure = math.log(0.9 / 0.1) + 1e-9
    assert rerank.pick_best([0.1, sure, 5.0, 0.5, 0.2, 0.3], groups=2, accept=0.9) == [1, 3]
    assert rerank.confidence(0.0) == 0.5 and rerank.confidence(math.log(9)) == pytest.approx(0.9)
    assert 0.0 < rerank.confidence(-1e9) < 1e-20 and rerank.confidence(1e9) == 1.0


async def test_best_of_returns_n_picks_each_reproducible_from_its_seed(engine: Engine):
    result = await engine.generate(req(engine, "긍정 아 정말 n=2 best_of=3 seed=100 min_length=12 max_length=16"))
    assert len(result.continuations) == 2 and len(result.confidence) == 2
    assert all(0.0 <= c <= 1.0 for c in result.confidence)
    rows = row_seeds(100, 2, 3)
    assert rows[0] == 100 and rows[3] == 101  # each result's first candidate is what best_of=1 would sample
    assert result.seeds[0] in rows[:3] and result.seeds[1] in rows[3:]
    for seed, text in zip(result.seeds, result.continuations):
        alone = await engine.generate(req(engine, f"긍정 아 정말 seed={seed} min_length=12 max_length=16"))
        assert alone.continuations[0] == text


@pytest.mark.parametrize("accept", [None, 0.5])
async def test_the_pick_is_the_best_scored_or_first_sure_candidate(engine: Engine, accept):
    engine.accept = accept
    seen = []
    rerank_jobs = engine._rerank
    engine._rerank = lambda jobs: (seen.extend(jobs), rerank_jobs(jobs))  # the candidates' tokens, as decoded
    picked = await engine.generate(req(engine, "부정 스토리가 best_of=4 seed=7 min_length=10 max_length=14"))
    (job,) = seen
    singles = [await engine.generate(req(engine, f"부정 스토리가 seed={s} min_length=10 max_length=14"))
               for s in row_seeds(7, 1, 4)]
    assert all(g.confidence is None for g in singles)  # best_of 1 is a plain sample: no second pass, no score
    assert [engine._continuation(job, ids) for ids in job.generated] == [g.continuations[0] for g in singles]
    # The engine sums its own label's side while decoding; scored again from scratch, both sides agree with it.
    own, other = (engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("부정 스토리가", "긍정 스토리가"))
    conts = [ids + [engine.eos_id] * stop for ids, stop in zip(job.generated, job.stopped)]
    scores = label_scores(engine.model, own, other, conts)
    best = max(range(4), key=lambda i: (scores[i], -i))  # ties: the first, as pick_best
    if accept is not None:
        best = next((i for i in range(4) if rerank.confidence(scores[i]) >= accept), best)
    assert picked.seeds == (singles[best].seeds[0],) and picked.continuations == singles[best].continuations
    assert picked.confidence[0] == pytest.approx(rerank.confidence(scores[best]), abs=1e-4)


async def test_same_seed_same_pick_alone_or_batched(engine: Engine):
    texts = ["긍정 아 정말 best_of=4 seed=3", "부정 배우들 best_of=2 n=2 seed=9 temperature=1.3",
             "이 영화 seed=5", "긍정 스토리 seed=8 top_k=5"]
    alone = [await engine.generate(req(engine, t)) for t in texts]
    batched = await asyncio.gather(*(engine.generate(req(engine, t)) for t in reversed(texts)))
    assert [(a.continuations, a.seeds) for a in alone] == [(b.continuations, b.seeds) for b in reversed(batched)]


async def test_without_a_label_best_of_samples_once(engine: Engine):
    prepared = engine.prepare(parse_gen("아 정말 seed=4", engine.defaults, engine.limits))
    assert prepared.request.rows == 1
    result = await engine.generate(prepared)
    assert result.confidence is None and result.seeds == (4,)


async def test_streaming_with_best_of_publishes_only_the_pick(engine: Engine):
    updates: list[Generation] = [g async for g in engine.stream(req(engine, "긍정 아 정말 best_of=3 seed=1 max_length=24"))]
    assert len(updates) == 1 and updates[0].done
    plain = [g async for g in engine.stream(req(engine, "긍정 아 정말 seed=1 min_length=24 max_length=24"))]
    assert len(plain) > 1 and not plain[0].done  # best_of=1 still streams token by token


def test_rows_are_bounded(engine: Engine):
    with pytest.raises(UserError, match="n×best_of"):
        parse_gen("긍정 아 n=3 best_of=8", engine.defaults, engine.limits)
    with pytest.raises(UserError, match="best_of"):
        parse_gen("긍정 아 best_of=9", engine.defaults, engine.limits)


def test_best_of_asked_for_without_a_label_is_refused(engine: Engine):
    with pytest.raises(UserError, match="라벨"):
        parse_gen("아 정말 best_of=4", engine.defaults, engine.limits)
    assert parse_gen("아 정말 best_of=1", engine.defaults, engine.limits).rows == 1


def test_the_reply_shows_the_picks_confidence_and_help_warns_when_labels_cannot_steer(engine: Engine):
    from core.knobs import Knobs
    from core.replies import UNSTEERED, help_text, render_generation
    from core.types import GenRequest

    knobs = Knobs(10, 20, 1.0, 50, 1.0, 0, 1.0, best_of=4)
    gen = Generation(GenRequest("긍정", "아 정말", knobs), (" 재밌다",), (7,), 9, True, (0.934,))
    assert render_generation(gen, 4096).endswith("seed=7 · 긍정 93%")
    assert "긍정" not in render_generation(replace(gen, request=GenRequest(None, "아 정말", knobs), confidence=None),
                                          4096).split("seed=")[1]
    assert UNSTEERED in help_text(engine.defaults, engine.limits, steered=False)
    assert UNSTEERED not in help_text(engine.defaults, engine.limits)
    assert engine.sentiment is False  # the tiny test model carries no mark


def test_a_trained_model_is_marked_and_a_bare_one_is_not(tiny_dir, tmp_path, caplog):
    import json

    from core.model_loading import load_model
    from core.settings import ModelSettings

    assert not load_model(ModelSettings(pretrained=str(tiny_dir))).sentiment
    assert "will not steer" in caplog.text
    marked = tmp_path / "marked"
    marked.mkdir()
    for f in tiny_dir.iterdir():
        (marked / f.name).write_bytes(f.read_bytes())
    config = json.loads((marked / "config.json").read_text())
    (marked / "config.json").write_text(json.dumps({**config, "sentiment_labels": {"positive": "긍정", "negative": "부정"}}))
    assert load_model(ModelSettings(pretrained=str(marked))).sentiment


async def test_continue_keeps_the_label_so_best_of_still_aims_at_it(engine: Engine):
    from core.followups import FollowUps

    first = req(engine, "부정 이 영화는 best_of=3 seed=2 max_length=14")
    gen = await engine.generate(first)
    followups = FollowUps()
    key = followups.remember(gen, len(first.prompt_ids))
    nxt = followups.continuation(key, 0, engine.prepare, engine.limits.max_length)
    assert nxt.request.label == "부정" and nxt.request.model_prompt == gen.texts()[0]
    assert nxt.request.rows == 3
    more = await engine.generate(nxt)
    assert more.texts()[0].startswith(gen.texts()[0]) and more.confidence is not None
