"""Per-row sampling rules on synthetic tensors: each row keeps its own knobs."""

from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from core.sampling import (
    PAD_ID,
    RowMinLength,
    RowNoRepeatNGram,
    RowRepetitionPenalty,
    RowTemperature,
    RowTopK,
    RowTopP,
    sample,
)

INF = float("-inf")


def test_top_k_per_row_matches_transformers():
    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    ids = torch.zeros(3, 1, dtype=torch.long)
    out = RowTopK([1, 5, 50])(ids, scores)
    for row, k in enumerate([1, 5, 50]):
        expected = TopKLogitsWarper(k)(ids[row:row + 1], scores[row:row + 1])
        assert torch.equal(out[row:row + 1], expected)
    assert (out[0] > INF).sum() == 1  # greedy row


def test_top_p_per_row_matches_transformers_and_leaves_p1_rows_alone():
    torch.manual_seed(1)
    scores = torch.randn(3, 40)
    ids = torch.zeros(3, 1, dtype=torch.long)
    out = RowTopP([0.3, 0.9, 1.0])(ids, scores)
    for row, p in enumerate([0.3, 0.9]):
        assert torch.equal(out[row:row + 1], TopPLogitsWarper(p)(ids[row:row + 1], scores[row:row + 1]))
    assert torch.equal(out[2], scores[2])
    assert not torch.equal(scores, out) and torch.isfinite(scores).all()  # input not changed in place


def test_repetition_penalty_per_row_ignores_padding():
    scores = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    ids = torch.tensor([[PAD_ID, 0, 1], [2, 2, 2]])
    out = RowRepetitionPenalty([2.0, 1.0])(ids, scores)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]]
    expected = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1]]), scores[:1].clone())
    assert torch.equal(out[:1], expected)


def test_no_repeat_ngram_per_row():
    scores = torch.zeros(3, 6)
    ids = torch.tensor([[1, 2, 3, 1, 2], [1, 2, 3, 1, 2], [PAD_ID, PAD_ID, PAD_ID, 1, 2]])
    out = RowNoRepeatNGram([3, 0, 3])(ids, scores)
    assert out[0, 3] == INF and torch.isfinite(out[0, [0, 1, 2, 4, 5]]).all()  # "1 2 3" would repeat
    assert torch.isfinite(out[1]).all()  # size 0 = off
    assert torch.isfinite(out[2]).all()  # padding never forms n-grams


def test_min_length_counts_prompt_and_blocks_eos():
    scores = torch.zeros(2, 5)
    ids = torch.tensor([[PAD_ID, 7, 8], [6, 7, 8]])
    out = RowMinLength([3, 3], eos_token_id=1)(ids, scores)
    assert out[0, 1] == INF and out[1, 1] == 0


def test_temperature_tiny_stays_finite_and_greedy():
    scores = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    out = RowTemperature([1e-9, 1.0])(torch.zeros(2, 1, dtype=torch.long), scores)
    probs = out.softmax(-1)
    assert not torch.isnan(probs).any()
    assert probs[0].tolist() == [0.0, 1.0, 0.0]
    assert torch.allclose(probs[1], scores[1].softmax(-1))


def test_sample_uses_each_rows_generator():
    scores = torch.zeros(2, 1000)
    a = sample(scores, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    b = sample(scores[:1], [torch.Generator().manual_seed(1)])
    assert a[0] == b[0] and a[0] != a[1]


@pytest.mark.parametrize("bad", [lambda: RowTopK([0]), lambda: RowTopP([1.5]), lambda: RowTemperature([0.0]),
                                 lambda: RowRepetitionPenalty([0.0]), lambda: RowNoRepeatNGram([-1])])
def test_rules_validate_arguments(bad):
    with pytest.raises(ValueError):
        bad()


def test_sample_follows_the_distribution_and_never_picks_masked_tokens():
    scores = torch.log(torch.tensor([[0.2, 0.3, 0.5, 0.0]])).expand(3000, -1)
    gens = [torch.Generator().manual_seed(i) for i in range(3000)]
    counts = torch.bincount(torch.tensor(sample(scores, gens)), minlength=4).tolist()
    assert counts[3] == 0
    for count, p in zip(counts, [0.2, 0.3, 0.5]):
        assert abs(count / 3000 - p) < 0.04


def test_fused_gelu_matches_gpt2s_gelu_new():
    from transformers.activations import NewGELUActivation

    from core.speedups import fuse_gelu

    x = torch.linspace(-6, 6, 1001)
    module = torch.nn.Sequential(NewGELUActivation())
    expected = module(x)
    assert torch.allclose(fuse_gelu(module)(x), expected, atol=1e-6)
    assert not isinstance(module[0], NewGELUActivation)


def test_repetition_penalty_touches_only_seen_tokens_and_leaves_tokenless_rows_alone():
    scores = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    ids = torch.tensor([[PAD_ID, PAD_ID, 2], [PAD_ID, PAD_ID, PAD_ID]])
    out = RowRepetitionPenalty([2.0, 2.0])(ids, scores)
    assert out.tolist() == [[2.0, -2.0, 0.5], [2.0, -2.0, 1.0]]
    assert scores.tolist() == [[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]]  # not changed in place
