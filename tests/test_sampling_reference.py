"""The sampling rules against transformers' own logits processors and warpers, row by row: the reference never
uses core.sampling's builders, so a rule dropped or changed there shows up here."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from core.knobs import Knobs
from core.sampling import CANDIDATES_MAX, History, build_warpers, next_tokens, penalise, sample

EOS = 5
VOCAB = 3000
PAD_ID = -1  # left padding in these tests' id tensors: not a token


def histories(ids: torch.Tensor, knobs: list[Knobs]) -> list[History]:
    return [History([t for t in row.tolist() if t != PAD_ID], k.no_repeat_ngram_size) for row, k in zip(ids, knobs)]


def ours(ids: torch.Tensor, logits: torch.Tensor, knobs: list[Knobs]) -> torch.Tensor:
    """The rules over the whole vocabulary: the penalties, then the warpers."""
    scores = logits.clone()
    penalise(scores, histories(ids, knobs), knobs, EOS)
    return build_warpers(knobs)(None, scores)


def reference(ids: torch.Tensor, logits: torch.Tensor, knobs: list[Knobs]) -> torch.Tensor:
    """Each row through transformers' processors, in `generate`'s order, on the row's own tokens (no padding)."""
    out = []
    for row, k in enumerate(knobs):
        tokens = ids[row][ids[row] != PAD_ID][None]
        rules = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(k.repetition_penalty)])
        if k.no_repeat_ngram_size:
            rules.append(NoRepeatNGramLogitsProcessor(k.no_repeat_ngram_size))
        rules.append(MinLengthLogitsProcessor(k.min_length, EOS))
        rules.append(TemperatureLogitsWarper(k.temperature))
        rules.append(TopKLogitsWarper(k.top_k))
        if k.top_p < 1.0:
            rules.append(TopPLogitsWarper(k.top_p))
        out.append(rules(tokens, logits[row:row + 1].clone())[0])
    return torch.stack(out)


def batch(seed: int, rows: int = 24):
    """Random logits and histories (some left-padded, some with repeated n-grams) and a mix of every knob."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, VOCAB, generator=gen) * 3
    ids = torch.randint(0, VOCAB, (rows, 12), generator=gen)
    ids[::3, :4] = PAD_ID
    ids[1::4, -3:] = ids[1::4, 2:5]
    ids[2::5, -1] = EOS + 1
    logits[:, ids[0, -1]] += 4  # a seen token among the likely ones, for the penalty to matter
    knobs = [Knobs(min_length=[14, 10, 1][i % 3], max_length=30, top_p=[1.0, 0.9, 0.5, 0.95][i % 4],
                   top_k=[1, 7, 50, CANDIDATES_MAX + 500, 3][i % 5], repetition_penalty=[1.0, 1.3, 2.5][i % 3],
                   no_repeat_ngram_size=[0, 2, 3, 1][i % 4], temperature=[1.0, 0.7, 1.4][(i // 2) % 3])
             for i in range(rows)]
    return ids, logits, knobs


@pytest.mark.parametrize("seed", range(3))
def test_every_rule_matches_transformers_row_by_row(seed):
    ids, logits, knobs = batch(seed)
    mine = ours(ids, logits, knobs)
    theirs = reference(ids, logits, knobs)
    assert torch.equal(torch.isinf(mine), torch.isinf(theirs))  # the same tokens banned or cut
    assert torch.allclose(mine.softmax(-1), theirs.softmax(-1), atol=1e-6)


@pytest.mark.parametrize("rows", ["mixed", "narrow", "few", "wide"])
@pytest.mark.parametrize("seed", range(3))
def test_next_tokens_draws_what_transformers_rules_give(seed, rows):
    """The engine's path (penalties on the tokens concerned, warpers and the draw over each row's top-k candidates,
    or the whole vocabulary above CANDIDATES_MAX) draws, seed for seed, what transformers' rules give. "few": top_k
    at most 7, where the top-k pass searches only the vocabulary's most likely chunks (and its last, partial one)."""
    ids, logits, knobs = batch(seed)
    if rows != "mixed":
        keep = [i for i, k in enumerate(knobs) if (k.top_k <= CANDIDATES_MAX) == (rows != "wide")
                and (rows != "few" or k.top_k <= 7)]
        ids, logits, knobs = ids[keep], logits[keep], [knobs[i] for i in keep]
    theirs = reference(ids, logits, knobs)
    before = logits.clone()
    for draw in range(8):
        def gens(draw: int = draw) -> list[torch.Generator]:
            return [torch.Generator().manual_seed(seed * 1000 + draw * 100 + i) for i in range(len(knobs))]

        assert next_tokens(histories(ids, knobs), logits, knobs, gens(), eos_token_id=EOS) == sample(theirs, gens())
    assert torch.equal(logits, before)  # the penalties were undone: the caller's logits are as they came


@pytest.mark.parametrize(("knob", "value"), [("repetition_penalty", 1.8), ("no_repeat_ngram_size", 2),
                                             ("min_length", 20), ("temperature", 0.3), ("top_k", 3), ("top_p", 0.6)])
def test_each_knob_alone_changes_what_greedy_or_sampled_rows_see(knob, value):
    """One knob set, every other neutral: the result is transformers' rule for that knob, and differs from no rule."""
    ids, logits, _ = batch(7, rows=4)
    ids[:, -2:] = ids[:, 2:4]  # a bigram that repeats, for no_repeat_ngram_size
    logits[:, EOS] += 6  # end-of-text likely, for min_length
    neutral = Knobs(min_length=1, max_length=30, top_p=1.0, top_k=VOCAB, repetition_penalty=1.0,
                    no_repeat_ngram_size=0, temperature=1.0)
    knobs = [Knobs(**{**neutral.as_dict(), knob: value})] * 4
    mine = ours(ids, logits, knobs)
    theirs = reference(ids, logits, knobs)
    assert torch.equal(torch.isinf(mine), torch.isinf(theirs))
    assert torch.allclose(mine.softmax(-1), theirs.softmax(-1), atol=1e-6)
    assert not torch.allclose(mine.softmax(-1), logits.softmax(-1), atol=1e-4)
