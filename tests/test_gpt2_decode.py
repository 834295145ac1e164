"""The engine's own GPT-2 decode path (core/gpt2_decode.py): transformers' numbers, and a row's numbers the same bit for
bit alone or in any batch, with rows joining and leaving mid-decode."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import make_settings, running_engine
from transformers import GPT2Config, GPT2LMHeadModel

from core.engine import Engine, _Batch
from core.gpt2_decode import WIDTH_STEP, DecodeBatch, decode_batch, supports
from core.grammar import parse_gen
from core.model_loading import load_model
from core.speedups import fuse_gelu, quantize_int8

PROMPTS = [[5, 6, 7, 8], [9, 10], list(range(11, 30)), [31]]


@pytest.fixture(scope="module")
def models(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.nn.Module]:
    store = tmp_path_factory.mktemp("decode-store")
    return {kind: load_model(make_settings(tiny_dir, store, model={"quantize": quantize}).model).model
            for kind, quantize in (("fp32", "none"), ("int8", "int8"))}


def _script(batch: DecodeBatch | _Batch) -> list[torch.Tensor]:
    """Drive a batch through prefills, steps, rows leaving and rows joining; returns every logits tensor."""
    out = [batch.prefill(PROMPTS[:3], [1, 2, 1])]
    for step in range(3):
        out.append(batch.step([40 + step, 41, 42, 43][: len(batch.positions)]))
    batch.select([0, 2, 3])  # the second row (a copy of prompt 1) leaves
    out.append(batch.prefill([PROMPTS[3], PROMPTS[1]], [2, 1]))  # and others join mid-decode
    for step in range(4):
        out.append(batch.step([50 + i + step for i in range(len(batch.positions))]))
    batch.select([4, 0, 2])  # rows leave, and the order changes
    for _ in range(3):
        out.append(batch.step([60 + i for i in range(3)]))
    return out


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_logits_equal_transformers_forward(models, kind: str):
    """fp32 checks the arithmetic: the same numbers to rounding. At int8 each layer re-quantizes its input, so the
    two paths' last-bit differences in attention (up to 9e-3 in logits with transformers 5.0.0, 2e-7 with 5.25) can
    move an activation across a rounding edge: one quantization step (~1e-2 here) where it happens."""
    model = models[kind]
    ours, theirs = _script(DecodeBatch(model)), _script(_Batch(model))
    assert len(ours) == len(theirs)
    tolerance = 1e-4 if kind == "fp32" else 2e-2
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == torch.float32
        assert torch.allclose(a, b, atol=tolerance, rtol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_alone_equals_that_row_in_a_changing_batch(models, threads: int):
    """At int8 (the CPU default) each prompt decoded alone (at 1 thread) gives the same logits, bit for bit, as
    inside a batch whose mates join and leave (at `threads`: the engine's thread tuner picks the count per batch
    size). (In fp32 the matrix products are MKL's, whose blocking follows the batch: close, not always equal.)"""
    model, before = models["int8"], torch.get_num_threads()
    tokens = [[70 + (i * 7 + s) % 50 for s in range(12)] for i in range(6)]
    try:
        torch.set_num_threads(1)
        alone = []
        for i, prompt in enumerate([PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3]]):
            batch = DecodeBatch(model)
            row = [batch.prefill([prompt], [1])[0]]
            row += [batch.step([tokens[i][s]])[0] for s in range(8)]
            alone.append(row)
        torch.set_num_threads(threads)
        batch = DecodeBatch(model)
        got: list[list[torch.Tensor]] = [[] for _ in range(4)]
        first = batch.prefill([PROMPTS[0], PROMPTS[2]], [1, 1])
        got[0].append(first[0])
        got[1].append(first[1])
        rows = [0, 1]
        for s in range(8):
            if s == 2:  # two rows join; the later ones start their own counts
                joined = batch.prefill([PROMPTS[1], PROMPTS[3]], [1, 1])
                got[2].append(joined[0])
                got[3].append(joined[1])
                rows += [2, 3]
            if s == 5:  # the first two leave, the longest among them: the buffers narrow
                width = batch.mask.shape[1]
                batch.select([2, 3])
                rows = [2, 3]
                assert batch.mask.shape[1] < width
            counts = {r: len(got[r]) - 1 for r in rows}
            logits = batch.step([tokens[r][counts[r]] for r in rows])
            for r, row_logits in zip(rows, logits):
                got[r].append(row_logits)
        for r in range(4):
            for a, b in zip(alone[r], got[r]):
                assert torch.equal(a, b), r
            assert len(got[r]) >= 4
    finally:
        torch.set_num_threads(before)


def test_prompts_of_one_length_prefilled_together_equal_each_alone(models):
    """Prompts of the same length share their attention's batched products in a prefill (in any order given)."""
    model = models["int8"]
    prompts = [[40, 41, 42, 43], PROMPTS[2], [50, 51, 52, 53], PROMPTS[0], [60, 61]]
    batch = DecodeBatch(model)
    together = [batch.prefill(prompts, [1, 1, 2, 1, 1])]
    together += [batch.step([7, 8, 9, 9, 10, 11]) for _ in range(3)]
    rows = [0, 1, 2, 2, 3, 4]  # each row's prompt
    for row, i in enumerate(rows):
        alone = DecodeBatch(model)
        got = [alone.prefill([prompts[i]], [1])[0]] + [alone.step([[7, 8, 9, 9, 10, 11][row]])[0] for _ in range(3)]
        assert all(torch.equal(a, b[row]) for a, b in zip(got, together)), row


def test_a_prompt_prefilled_zero_times_adds_no_rows(models):
    model = models["int8"]
    batch, reference = DecodeBatch(model), DecodeBatch(model)
    assert batch.prefill([PROMPTS[0]], [0]).shape[0] == 0 and batch.positions == []
    assert torch.equal(batch.prefill([PROMPTS[0], PROMPTS[1]], [0, 2]), reference.prefill([PROMPTS[1]], [2]))
    assert torch.equal(batch.step([3, 4]), reference.step([3, 4]))


@pytest.mark.parametrize("threads", [1, 2])
def test_attention_kernels_give_the_same_bits_at_any_width(threads: int):
    """The step's attention runs over the batch's longest row, rounded up to a multiple of WIDTH_STEP; a row's
    columns past its own length are -inf scores and zero values. That the matrix kernels then give the same bits
    whatever that width, the buffer's stride and the batch is what makes a row independent of its batch mates:
    checked on the installed torch at GPT-2's head size (64). Not at any width: at 49 columns instead of 64 this
    torch's float32 products round otherwise, which a width cap once got wrong (rows followed their mates'
    max_length); nor at every head size (at 16, 16 and 32 columns differ)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        heads, size, columns = 4, 64, 128
        lengths = torch.tensor([1, 5, 16, 17, 40, 33])
        rows = len(lengths)
        seen = torch.arange(columns) < lengths[:, None]
        keys, values = (torch.randn(rows, heads, columns, size, generator=gen) * seen[:, None, :, None] for _ in "kv")
        mask = torch.zeros(rows, columns).masked_fill(~seen, float("-inf"))
        q = torch.randn(rows, heads, 1, size, generator=gen)

        def attend(width: int, which: slice, capacity: int) -> torch.Tensor:
            """Rows `which` over `width` columns of buffers `capacity` columns wide, as DecodeBatch.attend does."""
            n = len(range(rows)[which])
            k, v = torch.zeros(n, heads, capacity, size), torch.zeros(n, heads, capacity, size)
            k[:, :, :width], v[:, :, :width] = keys[which, :, :width], values[which, :, :width]
            m = mask[which, None, None, :width].expand(n, heads, 1, width).reshape(-1, 1, width)
            s = torch.baddbmm(m, q[which].reshape(-1, 1, size), k[:, :, :width].reshape(-1, width, size).transpose(1, 2),
                              alpha=0.125)
            return torch.bmm(s.softmax(dim=-1), v[:, :, :width].reshape(-1, width, size))

        for row, length in enumerate(lengths.tolist()):
            alone = attend(-(-length // 16) * 16, slice(row, row + 1), 128)  # the row by itself: its own width
            for width in range(48, columns + 1, 16):  # in a batch whose longest row sets the width
                for capacity in (width, 128):
                    assert torch.equal(attend(width, slice(None), capacity)[row * heads:(row + 1) * heads], alone)
                    assert torch.equal(attend(width, slice(row, row + 1), capacity), alone)
    finally:
        torch.set_num_threads(before)


def test_buffers_are_always_a_multiple_of_the_width_step_wide(models):
    """The attention's width is a multiple of WIDTH_STEP (or the model's positions), whatever joins and leaves: the
    kernels' bits hold only at such widths (above)."""
    batch = DecodeBatch(models["int8"])
    widths = []
    original = batch._fit

    def fit(rows: int, width: int) -> None:
        widths.append(width)
        original(rows, width)

    batch._fit = fit
    _script(batch)
    batch.prefill([list(range(5, 60))], [1])
    batch.step([1] * len(batch.positions))
    assert widths and all(w % WIDTH_STEP == 0 for w in widths) and max(widths) == 64


def test_a_row_may_reach_the_models_last_position_and_no_further(models):
    model = models["int8"]
    limit = model.config.n_positions
    batch, reference = DecodeBatch(model), _Batch(model)
    prompt = [7 + i % 100 for i in range(limit - 2)]
    assert torch.allclose(batch.prefill([prompt], [1]), reference.prefill([prompt], [1]), atol=1e-4)
    for token in (8, 9):  # positions limit - 2 and limit - 1: the last one the model has
        assert torch.allclose(batch.step([token]), reference.step([token]), atol=1e-4)
    with pytest.raises(ValueError, match="positions"):
        batch.step([10])
    with pytest.raises(ValueError, match="positions"):
        DecodeBatch(model).prefill([prompt + [1, 2, 3]], [1])


def test_a_failed_step_is_undone_and_a_copy_is_independent(models):
    model = models["int8"]
    batch = DecodeBatch(model)
    batch.prefill(PROMPTS[:3], [1, 1, 1])
    batch.step([1, 2, 3])
    saved = batch.snapshot()
    probe = batch.copy()
    probe.select([1])
    probe.step([5])
    expected = list(probe.positions)
    with pytest.raises(IndexError):
        batch.step([1, 2, 10**9])  # an id past the vocabulary: the embedding fails
    batch.restore(saved)
    again = batch.step([4, 5, 6])
    fresh = DecodeBatch(model)
    fresh.prefill(PROMPTS[:3], [1, 1, 1])
    fresh.step([1, 2, 3])
    assert torch.equal(again, fresh.step([4, 5, 6]))
    assert probe.positions == expected and batch.positions == fresh.positions


def test_the_engine_decodes_gpt2_on_a_cpu_itself_and_anything_else_through_transformers(models, tiny_dir):
    settings = make_settings(tiny_dir, tiny_dir)
    loaded = load_model(settings.model)
    assert isinstance(Engine(loaded, settings)._new_batch(), DecodeBatch)

    class Wrapped(torch.nn.Module):  # e.g. a model behind a hook: not a GPT2LMHeadModel
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

    wrapped = dataclasses.replace(loaded, model=Wrapped(loaded.model))
    assert type(Engine(wrapped, settings)._new_batch()) is _Batch
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2, reorder_and_upcast_attn=True)
    assert not supports(GPT2LMHeadModel(config)) and decode_batch(GPT2LMHeadModel(config)) is None


def test_layer_scaling_options_match_transformers():
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=3, n_head=2,
                        scale_attn_by_inverse_layer_idx=True)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    # transformers' eager attention is the reference: its SDPA path ignores this option in some 5.x releases (5.0.0)
    model.set_attn_implementation("eager")
    model = quantize_int8(fuse_gelu(model))
    ours, theirs = DecodeBatch(model), _Batch(model)
    assert torch.allclose(ours.prefill([[1, 2, 3], [4]], [1, 1]), theirs.prefill([[1, 2, 3], [4]], [1, 1]), atol=1e-5)
    assert torch.allclose(ours.step([5, 6]), theirs.step([5, 6]), atol=1e-5)


async def test_engine_seeds_hold_when_rows_end_at_different_steps(tiny_dir, tmp_path):
    """Through the engine: requests of different lengths end while the others run."""

    settings = make_settings(tiny_dir, tmp_path, limits={"max_batch_size": 32})
    async with running_engine(settings) as engine:
        texts = [f"긍정 아 정말 seed={s} min_length={4 + s} max_length={6 + 3 * s} top_k=20" for s in range(6)]
        requests = [engine.prepare(parse_gen(t, engine.defaults, engine.limits)) for t in texts]
        alone = [await engine.generate(r) for r in requests]
        together = await asyncio.gather(*(engine.generate(r) for r in requests))
        assert [a.continuations for a in alone] == [b.continuations for b in together]


async def test_a_step_failing_midway_fails_only_its_request_and_the_others_keep_their_text(tiny_dir, tmp_path,
                                                                                         monkeypatch):
    """A step that fails inside the layers (after the mask and the first layer's keys were written) is undone: the
    request to blame fails, and the others go on to the very text they give alone."""
    settings = make_settings(tiny_dir, tmp_path)
    async with running_engine(settings) as engine:
        def request(text):
            return engine.prepare(parse_gen(text, engine.defaults, engine.limits))

        good = [request(f"긍정 아 정말 seed={s} min_length=20 max_length=20") for s in range(3)]
        # A prompt just long enough that only its rows pass the others' 20 tokens (max_length counts the prompt);
        # how many words that takes depends on the tokenizer (trained on NSMC, or on the fallback text without it).
        for words in range(1, 30):
            long_prompt = request("부정 " + "배우들 연기가 좋았다 " * words + "min_length=64 max_length=64")
            if len(long_prompt.prompt_ids) > 20:
                break
        cut = len(long_prompt.prompt_ids) + 3  # only the long request's rows reach this position
        assert 20 < cut < 64
        alone = [await engine.generate(g) for g in good]
        real_attend = DecodeBatch.attend

        def attend(self, layer, q, mask, rows):
            if layer is self.layers[1] and max(self.positions) >= cut:
                raise RuntimeError("step failed")
            return real_attend(self, layer, q, mask, rows)

        monkeypatch.setattr(DecodeBatch, "attend", attend)
        results = await asyncio.gather(engine.generate(long_prompt), *(engine.generate(g) for g in good),
                                       return_exceptions=True)
        assert isinstance(results[0], RuntimeError) and "step failed" in str(results[0])
        assert [r.continuations for r in results[1:]] == [a.continuations for a in alone]
