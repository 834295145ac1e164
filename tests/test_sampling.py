"""Per-row sampling rules on synthetic tensors: each row keeps its own knobs."""

from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from core.knobs import Knobs
from core.sampling import (
    CANDIDATES_MAX,
    History,
    RowTemperature,
    RowTopK,
    RowTopP,
    largest,
    next_tokens,
    penalise,
    sample,
)

INF = float("-inf")
NEUTRAL = Knobs(min_length=0, max_length=30, top_p=1.0, top_k=50, repetition_penalty=1.0, no_repeat_ngram_size=0,
                temperature=1.0)


def knobs(**changes: object) -> Knobs:
    return Knobs(**{**NEUTRAL.as_dict(), **changes})


def penalised(scores: torch.Tensor, rows: list[list[int]], row_knobs: list[Knobs], eos: int = 99) -> torch.Tensor:
    """The penalties on a copy of `scores`, each row's tokens given as a list."""
    out = scores.clone()
    penalise(out, [History(r, k.no_repeat_ngram_size) for r, k in zip(rows, row_knobs)], row_knobs, eos)
    return out


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


def test_repetition_penalty_per_row():
    scores = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    out = penalised(scores, [[0, 1], [2, 2, 2]], [knobs(repetition_penalty=2.0), NEUTRAL])
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]]
    expected = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1]]), scores[:1].clone())
    assert torch.equal(out[:1], expected)


def test_no_repeat_ngram_per_row():
    scores = torch.zeros(3, 6)
    out = penalised(scores, [[1, 2, 3, 1, 2], [1, 2, 3, 1, 2], [1, 2]],
                    [knobs(no_repeat_ngram_size=3), NEUTRAL, knobs(no_repeat_ngram_size=3)])
    assert out[0, 3] == INF and torch.isfinite(out[0, [0, 1, 2, 4, 5]]).all()  # "1 2 3" would repeat
    assert torch.isfinite(out[1]).all()  # size 0 = off
    assert torch.isfinite(out[2]).all()  # a row's own tokens only


def test_min_length_counts_prompt_and_blocks_eos():
    scores = torch.zeros(2, 5)
    out = penalised(scores, [[7, 8], [6, 7, 8]], [knobs(min_length=3)] * 2, eos=1)
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
                                 lambda: penalise(torch.zeros(1, 3), [History([1])], [knobs(repetition_penalty=0.0)], 0),
                                 lambda: History([1], -1)])
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
    out = penalised(scores, [[2], []], [knobs(repetition_penalty=2.0)] * 2)
    assert out.tolist() == [[2.0, -2.0, 0.5], [2.0, -2.0, 1.0]]
    assert scores.tolist() == [[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]]


def scanned(tokens: list[int], n: int) -> set[int]:
    """The tokens no-repeat n-grams ban after `tokens`, by scanning the whole row (as transformers does)."""
    if n == 0 or len(tokens) + 1 < n:
        return set()
    prefix = tokens[len(tokens) - n + 1:] if n > 1 else []
    return {tokens[s + n - 1] for s in range(len(tokens) - n + 1) if tokens[s:s + n - 1] == prefix}


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4])
def test_a_history_kept_token_by_token_is_a_scan_of_the_whole_row(n):
    gen = torch.Generator().manual_seed(n)
    tokens = torch.randint(0, 4, (60,), generator=gen).tolist()  # four tokens: n-grams repeat often
    prompt, history = tokens[:5], History(tokens[:5], n)
    for length in range(5, len(tokens) + 1):
        row = tokens[:length]
        assert history.length == length
        assert list(history.distinct) == list(dict.fromkeys(row))
        assert sorted(history.banned()) == sorted(scanned(row, n)), (prompt, row)
        if length < len(tokens):
            history.append(tokens[length])
    assert History([], 3).banned() == [] and History([7, 7], 3).banned() == [] and History([7, 7], 2).banned() == [7]


@pytest.mark.parametrize(("vocab", "count"), [(3000, 1), (3000, 8), (3000, 11), (3000, 12), (1280, 5), (51200, 51)])
@pytest.mark.parametrize("ties", [False, True])
def test_largest_gives_topks_values_and_tokens_holding_them(vocab, count, ties):
    gen = torch.Generator().manual_seed(vocab + count)
    scores = torch.randn(5, vocab, generator=gen)
    if ties:
        scores = (scores * 2).round()  # a few values shared by hundreds of tokens each
    scores[1, -3:] += 20  # the likeliest tokens in the last, partial chunk
    scores[2, :count] = INF  # and some impossible ones
    values, ids = largest(scores, count)
    assert torch.equal(values, scores.topk(count).values)
    assert torch.equal(scores.gather(1, ids), values)
    assert all(len(set(row)) == count for row in ids.tolist())
    assert set(ids[1, :3].tolist()) <= {vocab - 3, vocab - 2, vocab - 1}


def alone(scores: torch.Tensor, k: int, seed: int) -> int:
    """A row's token as a batch of its own would draw it: its own topk(k) candidates, in token order."""
    candidates = scores[None].topk(k).indices.sort().values
    return candidates[0, sample(scores[None].gather(1, candidates), [torch.Generator().manual_seed(seed)])[0]].item()


@pytest.mark.parametrize("vocab", [3000, 51200])
def test_a_row_whose_kth_and_next_tokens_tie_draws_what_it_draws_alone(vocab):
    """With ties at a row's k-th token, which tied tokens are its candidates is topk's choice for that row alone
    (what a batch of its own gives), whatever the other rows' k."""
    gen = torch.Generator().manual_seed(vocab)
    scores = torch.randint(0, 40, (6, vocab), generator=gen).float() / 4  # hundreds of tokens per value
    widths = [1, 2, 3, 5, 40, CANDIDATES_MAX]
    row_knobs = [knobs(top_k=k) for k in widths]
    for draw in range(10):
        seeds = [draw * 10 + i for i in range(6)]
        batched = next_tokens([History([])] * 6, scores, row_knobs, [torch.Generator().manual_seed(s) for s in seeds], 99)
        for i, k in enumerate(widths):
            expected = alone(scores[i], k, seeds[i])
            assert batched[i] == expected
            own = next_tokens([History([])], scores[i:i + 1], [row_knobs[i]], [torch.Generator().manual_seed(seeds[i])], 99)
            assert own == [expected]


def test_top_p_of_one_leaves_even_tokens_of_probability_zero_as_they_were():
    scores = torch.tensor([[0.0, -1000.0, INF, 1.0]])  # exp(-1000) is 0 in float32
    assert torch.equal(RowTopP([1.0])(None, scores), scores)


def test_a_top_k_above_a_small_vocabulary_keeps_every_token():
    """A model with fewer tokens than a row's top_k (at most CANDIDATES_MAX): every token is a candidate."""
    scores = torch.randn(2, 30, generator=torch.Generator().manual_seed(3))
    row_knobs = [knobs(top_k=50), knobs(top_k=30)]
    for seed in range(20):
        drawn = next_tokens([History([]), History([])], scores, row_knobs,
                            [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)], 99)
        expected = sample(scores, [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)])
        assert drawn == expected
