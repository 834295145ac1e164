"""The engine: per-row knobs in one batch, seeds reproducible alone or batched, limits, backpressure, streaming."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import make_settings, running_engine, shared_steps
from helpers import held_after

from core.engine import Engine
from core.errors import BusyError, RequestTimeout, UserError
from core.gpt2_model import as_transformers
from core.grammar import GenRequest, parse_gen
from core.metrics import front_end_of
from core.model_loading import load_model


def req(engine: Engine, text: str) -> GenRequest:
    return parse_gen(text, engine.defaults, engine.limits)


@pytest.fixture
async def fp32_engine(tiny_dir, tmp_path):
    async with running_engine(make_settings(tiny_dir, tmp_path, model={"quantize": "none"})) as eng:
        yield eng


async def test_seeded_output_is_identical_alone_and_in_any_batch(fp32_engine: Engine):
    engine = fp32_engine
    texts = [
        "긍정 아 정말 seed=1 top_k=5",
        "부정 별로 seed=2 top_p=0.8 temperature=0.7 max_length=30",
        "긍정 배우들 seed=3 repetition_penalty=1.5 no_repeat_ngram_size=2 max_length=25",
        "스토리가 seed=4 temperature=1.5 min_length=15 max_length=15",
        "부정 seed=5 n=3",
    ]
    requests = [req(engine, t) for t in texts]
    alone = [await engine.generate(engine.prepare(r)) for r in requests]
    batched = await asyncio.gather(*(engine.generate(engine.prepare(r)) for r in requests))
    shuffled = await asyncio.gather(*(engine.generate(engine.prepare(r)) for r in reversed(requests)))
    assert [a.continuations for a in alone] == [b.continuations for b in batched]
    assert [a.continuations for a in alone] == [s.continuations for s in reversed(shuffled)]
    assert shared_steps(engine, 1) > 0  # they really shared a batch


async def test_top_k_1_row_is_greedy_while_neighbours_sample(engine: Engine):
    greedy = req(engine, "긍정 아 정말 top_k=1 min_length=20 max_length=20")
    samplers = [req(engine, f"긍정 아 정말 seed={s} min_length=20 max_length=20") for s in range(6)]
    results = await asyncio.gather(engine.generate(engine.prepare(greedy)), *(engine.generate(engine.prepare(r)) for r in samplers))
    ids = torch.tensor([engine.tokenizer(greedy.model_prompt, add_special_tokens=False)["input_ids"]])
    expected = as_transformers(engine.model).generate(ids, do_sample=False, max_length=20, min_length=20,
                                                      eos_token_id=engine.eos_id, pad_token_id=engine.eos_id)
    assert results[0].continuations[0] == engine.tokenizer.decode(expected[0], skip_special_tokens=True)[len("긍정 아 정말"):]
    assert len({r.continuations[0] for r in results[1:]}) > 1  # different seeds, different samples


async def test_lengths_count_the_prompt(engine: Engine):
    r = req(engine, "긍정 아 정말 min_length=12 max_length=12 seed=7")
    prompt_tokens = len(engine.prepare(r).prompt_ids)
    result = await engine.generate(engine.prepare(r))
    assert result.new_tokens == 12 - prompt_tokens
    assert result.texts()[0].startswith("긍정 아 정말")


async def test_candidates_get_distinct_reported_seeds(fp32_engine: Engine):
    engine = fp32_engine
    result = await engine.generate(req(engine, "긍정 아 정말 n=3 seed=10 min_length=15 max_length=15"))
    assert result.seeds == (10, 11, 12) and len(result.continuations) == 3
    again = await engine.generate(engine.prepare(req(engine, f"긍정 아 정말 seed={result.seeds[1]} min_length=15 max_length=15")))
    assert again.continuations[0] == result.continuations[1]


async def test_prompt_longer_than_max_length_is_a_precise_error(engine: Engine):
    with pytest.raises(UserError, match="max_length를 .* 이상"):
        await engine.generate(engine.prepare(req(engine, "긍정 " + "아 정말 " * 12 + "max_length=5 min_length=1")))


async def test_stream_yields_growing_text_then_final(engine: Engine):
    stream = engine.stream(engine.prepare(req(engine, "긍정 아 정말 seed=3 min_length=16 max_length=16")))
    with held_after(engine, 1):  # the worker waits before its second step: the first state read is a partial one
        parts = [await anext(stream)]
    parts += [p async for p in stream]
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert len(parts) >= 2
    for earlier, later in zip(parts, parts[1:]):
        assert later.continuations[0].startswith(earlier.continuations[0].rstrip("�"))
    final = await engine.generate(engine.prepare(req(engine, "긍정 아 정말 seed=3 min_length=16 max_length=16")))
    assert final.continuations == parts[-1].continuations


async def test_closing_a_stream_counts_it_cancelled_before_close_returns(engine: Engine):
    """A stopped reply (the stop button) is counted when the stream is closed, not a loop turn later."""
    r = req(engine, "긍정 아 정말 seed=3 min_length=60 max_length=60")
    cancelled = engine.telemetry.metrics.requests.labels(front_end_of(r.origin), "cancelled")
    before = cancelled._value.get()
    stream = engine.stream(engine.prepare(r))
    first = await anext(stream)
    assert not first.done
    await stream.aclose()
    assert cancelled._value.get() == before + 1


async def test_full_queue_fails_fast_with_busy(tiny_dir, tmp_path):
    settings = make_settings(tiny_dir, tmp_path, limits={"queue_size": 1, "max_batch_size": 1})
    async with running_engine(settings) as engine:
        r = parse_gen("긍정 아 정말 min_length=60 max_length=60", engine.defaults, settings.limits)
        outcomes = await asyncio.gather(*(engine.generate(engine.prepare(r)) for _ in range(8)), return_exceptions=True)
        busy = [o for o in outcomes if isinstance(o, BusyError)]
        assert busy and "잠시 후 다시" in str(busy[0])
        assert all(not isinstance(o, Exception) or isinstance(o, BusyError) for o in outcomes)
        assert (await engine.generate(engine.prepare(r))).new_tokens > 0  # still serving


async def test_timeout_fails_that_request_and_the_engine_goes_on(tiny_dir, tmp_path):
    settings = make_settings(tiny_dir, tmp_path, limits={"request_timeout_s": 0.01})
    async with running_engine(settings) as engine:
        slow = parse_gen("긍정 아 정말 min_length=128 max_length=128", engine.defaults, settings.limits)
        with pytest.raises(RequestTimeout, match="초 안에"):
            await engine.generate(engine.prepare(slow))
        engine.limits.request_timeout_s = 30
        quick = parse_gen("긍정 아 min_length=5 max_length=5", engine.defaults, settings.limits)
        assert (await engine.generate(engine.prepare(quick))).done


async def test_int8_engine_generates_and_keeps_seeds(tiny_dir, tmp_path):
    settings = make_settings(tiny_dir, tmp_path, model={"quantize": "int8"})
    loaded = load_model(settings.model)
    assert "int8" in loaded.source
    assert not any(isinstance(m, torch.nn.Linear) and type(m) is torch.nn.Linear for m in loaded.model.modules())
    async with running_engine(settings) as engine:
        r = parse_gen("긍정 아 정말 seed=9 min_length=14 max_length=14", engine.defaults, settings.limits)
        first, second = await engine.generate(engine.prepare(r)), await engine.generate(engine.prepare(r))
        assert first.continuations == second.continuations and first.new_tokens > 0


def test_padded_batch_prefill_and_steps_match_each_prompt_alone(fp32_engine: Engine):
    engine = fp32_engine
    from core.engine import _Batch

    prompts = [list(engine.prepare(req(engine, t)).prompt_ids) for t in ("긍정 아 정말 재밌다", "부정", "긍정 배우들의 연기가 너무 좋았다")]
    together = _Batch(engine.model)
    logits = together.prefill(prompts, [1, 2, 1])
    nxt = together.step([5, 6, 6, 7])
    for i, (prompt, row) in enumerate(zip(prompts, (0, 1, 3))):
        alone = _Batch(engine.model)
        assert torch.allclose(alone.prefill([prompt], [1])[0], logits[row], atol=1e-4)
        assert torch.allclose(alone.step([[5, 6, 7][i]])[0], nxt[row], atol=1e-4)
    assert torch.isfinite(nxt).all() and torch.equal(logits[1], logits[2])


async def test_partials_are_decoded_only_when_read(engine: Engine, monkeypatch):
    """Issue 11.4: the worker decoded every candidate's whole text at every step, and the throttle dropped most."""
    calls = []
    real = engine.tokenizer.decode
    monkeypatch.setattr(engine.tokenizer, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    prepared = engine.prepare(req(engine, "긍정 아 정말 seed=3 min_length=30 max_length=30"))
    parts = [p async for p in engine.stream(prepared)]
    before = len(calls)
    assert len(parts) > 3 and before <= 3  # the final result only (prompt + the text, decoded once)
    read = parts[len(parts) // 2].continuations[0]  # reading a partial decodes that one
    assert len(calls) > before and parts[-1].continuations[0].startswith(read.rstrip("�"))


def test_bf16_model_gives_float32_logits_on_the_cpu(fp32_engine: Engine):
    """The GPU path's dtype (bf16) runs through the same batch code; logits come back fp32 on the CPU for sampling."""
    import copy

    from core.engine import _Batch

    model = copy.deepcopy(fp32_engine.model).to(torch.bfloat16)
    prompts = [list(fp32_engine.prepare(req(fp32_engine, t)).prompt_ids) for t in ("긍정 아 정말 재밌다", "부정")]
    batch = _Batch(model)
    first, nxt = batch.prefill(prompts, [1, 1]), batch.step([5, 6])
    for logits in (first, nxt):
        assert logits.dtype == torch.float32 and logits.device.type == "cpu" and torch.isfinite(logits).all()
    reference = _Batch(fp32_engine.model).prefill(prompts, [1, 1])
    assert torch.allclose(first, reference, atol=0.1)


async def test_health_reports_the_local_backend(engine: Engine):
    health = await engine.health()
    assert health == {"backend": "local", "ok": True, "queue_depth": 0, "queue_size": engine.limits.queue_size,
                      "saturated": False, "device": "cpu"}
