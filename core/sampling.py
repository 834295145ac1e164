"""Per-row sampling rules for a batch in which every row has its own knobs.

Each rule is a transformers `LogitsProcessor` whose parameters are tensors with one entry per row, so a row with
`top_k=1` stays greedy while its neighbours sample. Rows of `input_ids` are left-padded with `PAD_ID` (-1), which
no rule ever counts as a token. Every rule works row by row, elementwise or by a reduction along the vocabulary, so a
row's result does not depend on which other rows share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from core.knobs import Knobs

PAD_ID = -1
NEG_INF = float("-inf")


def _per_row(values: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(list(values), dtype=dtype)


class RowRepetitionPenalty(LogitsProcessor):
    """CTRL's penalty (as transformers' RepetitionPenaltyLogitsProcessor), one penalty per row; 1.0 = off."""

    def __init__(self, penalties: Sequence[float]):
        if any(p <= 0 for p in penalties):
            raise ValueError(f"repetition penalties must be > 0, got {list(penalties)}")
        self.penalty = _per_row(penalties)[:, None]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # Only the row's own tokens change: gather them, penalise, scatter back (no pass over the vocabulary). A pad
        # stands for a real token of its row (written back with the same value); a row without any is left alone.
        real = input_ids >= 0
        fill = torch.where(real, input_ids, PAD_ID).max(dim=1, keepdim=True).values
        ids = torch.where(real, input_ids, fill).clamp(min=0)
        seen = scores.gather(1, ids)
        penalised = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return scores.scatter(1, ids, torch.where(fill >= 0, penalised, seen))


class RowNoRepeatNGram(LogitsProcessor):
    """Ban tokens that would repeat an n-gram already in the row; size 0 = off."""

    def __init__(self, sizes: Sequence[int]):
        if any(n < 0 for n in sizes):
            raise ValueError(f"n-gram sizes must be >= 0, got {list(sizes)}")
        self.sizes = list(sizes)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        banned_rows: list[int] = []
        banned_ids: list[int] = []
        for row, n in enumerate(self.sizes):
            if n == 0:
                continue
            tokens = [t for t in input_ids[row].tolist() if t != PAD_ID]
            if len(tokens) + 1 < n:
                continue
            prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
            for start in range(len(tokens) - n + 1):
                if tuple(tokens[start:start + n - 1]) == prefix:
                    banned_rows.append(row)
                    banned_ids.append(tokens[start + n - 1])
        if not banned_rows:
            return scores
        scores = scores.clone()
        scores[banned_rows, banned_ids] = NEG_INF
        return scores


class RowMinLength(LogitsProcessor):
    """No end-of-sequence before a row holds `min_length` tokens (prompt included, as `generate` counts)."""

    def __init__(self, min_lengths: Sequence[int], eos_token_id: int):
        self.min_length = _per_row(min_lengths, torch.long)
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        lengths = (input_ids != PAD_ID).sum(dim=1)
        too_short = lengths < self.min_length
        if not bool(too_short.any()):
            return scores
        scores = scores.clone()
        scores[too_short, self.eos_token_id] = NEG_INF
        return scores


class RowTemperature(LogitsProcessor):
    """Divide by each row's temperature, after shifting the maximum to 0 so tiny temperatures stay finite."""

    def __init__(self, temperatures: Sequence[float]):
        if any(t <= 0 for t in temperatures):
            raise ValueError(f"temperatures must be > 0, got {list(temperatures)}")
        self.temperature = _per_row(temperatures)[:, None]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        shifted = scores - scores.max(dim=-1, keepdim=True).values
        return shifted / self.temperature


class RowTopK(LogitsProcessor):
    """Keep each row's k most likely tokens (ties at the boundary kept, as transformers does)."""

    def __init__(self, top_ks: Sequence[int]):
        if any(k < 1 for k in top_ks):
            raise ValueError(f"top_k must be >= 1, got {list(top_ks)}")
        self.top_k = _per_row(top_ks, torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        k = self.top_k.clamp(max=scores.shape[-1])
        kth = scores.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        return scores.masked_fill(scores < kth, NEG_INF)


class RowTopP(LogitsProcessor):
    """Nucleus sampling per row (transformers' TopPLogitsWarper rule); rows with p = 1.0 are untouched."""

    def __init__(self, top_ps: Sequence[float]):
        if any(not 0 < p <= 1 for p in top_ps):
            raise ValueError(f"top_p must be in (0, 1], got {list(top_ps)}")
        self.top_p = _per_row(top_ps)[:, None]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # The whole row is sorted (narrowed rows are only their top-k candidates wide): sorting only the finite
        # tokens would make the softmax's width, and so its last bits, depend on the other rows' counts.
        sorted_scores, order = scores.sort(dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - self.top_p)
        remove_sorted[:, -1] = False  # always keep the most likely token
        remove_sorted &= self.top_p < 1
        remove = torch.zeros_like(scores, dtype=torch.bool).scatter(1, order, remove_sorted)
        return scores.masked_fill(remove, NEG_INF)


# Rows whose top_k is at most this are warped and sampled among their top-k candidates only, not the whole
# vocabulary: one top-k pass instead of several sorts and softmaxes over 51,200 tokens (about 10 ms a step for 16
# rows on 2 cores). Larger top_k (51,200 = off) takes the full path.
CANDIDATES_MAX = 1024


def build_penalties(knobs: Sequence[Knobs], eos_token_id: int) -> LogitsProcessorList:
    """The rules that change a few tokens' logits (so may change which tokens are the top k), skipping any rule
    that is neutral for every row (as TGI's NextTokenChooser)."""
    rules: list[LogitsProcessor] = []
    if any(k.repetition_penalty != 1.0 for k in knobs):
        rules.append(RowRepetitionPenalty([k.repetition_penalty for k in knobs]))
    if any(k.no_repeat_ngram_size for k in knobs):
        rules.append(RowNoRepeatNGram([k.no_repeat_ngram_size for k in knobs]))
    rules.append(RowMinLength([k.min_length for k in knobs], eos_token_id))
    return LogitsProcessorList(rules)


def build_warpers(knobs: Sequence[Knobs]) -> LogitsProcessorList:
    """The rules that reshape the distribution: temperature (keeps the order), top-k, top-p."""
    rules: list[LogitsProcessor] = []
    if any(k.temperature != 1.0 for k in knobs):
        rules.append(RowTemperature([k.temperature for k in knobs]))
    rules.append(RowTopK([k.top_k for k in knobs]))
    if any(k.top_p < 1.0 for k in knobs):
        rules.append(RowTopP([k.top_p for k in knobs]))
    return LogitsProcessorList(rules)


def next_tokens(input_ids: torch.LongTensor, logits: torch.Tensor, knobs: Sequence[Knobs],
                generators: Sequence[torch.Generator], eos_token_id: int) -> list[int]:
    """Each row's next token under its own knobs, drawn with its own generator.

    The penalties run over the vocabulary; the warpers and the draw then run over each row's top-k candidates
    only, kept in token-id order so that a seed draws the same token as over the whole vocabulary. Temperature
    keeps the order, so the top k before it are the top k after it. Every step of a row is the same computation
    whatever rows share its batch, so its token is too, bit for bit."""
    scores = build_penalties(knobs, eos_token_id)(input_ids, logits.float())
    picks = [0] * len(knobs)
    # Rows go in groups of one width (their own top_k, or the whole vocabulary), never the widest of the batch: a
    # row's softmax and cumulative sum then run over the same numbers alone or beside any other rows.
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(knobs):
        groups.setdefault(min(k.top_k, scores.shape[-1]) if k.top_k <= CANDIDATES_MAX else 0, []).append(i)
    for width, rows in groups.items():
        part = [knobs[i] for i in rows]
        index = None if len(rows) == len(knobs) else torch.tensor(rows)
        row_ids = input_ids if index is None else input_ids[index]
        row_scores = scores if index is None else scores[index]
        if width:
            candidates = row_scores.topk(width, dim=-1).indices.sort(dim=-1).values
            row_scores = row_scores.gather(1, candidates)
        drawn = sample(build_warpers(part)(row_ids, row_scores), [generators[i] for i in rows])
        if width:
            drawn = candidates.gather(1, torch.tensor(drawn)[:, None])[:, 0].tolist()
        for i, token in zip(rows, drawn):
            picks[i] = token
    return picks


def sample(scores: torch.Tensor, generators: Sequence[torch.Generator]) -> list[int]:
    """One token per row, each drawn with that row's own seeded generator.

    Inverse-CDF sampling: one cumulative sum for the whole batch, then one uniform number per row from its own
    generator. torch.multinomial per row does the same job a few times slower over a 51,200-token vocabulary.
    """
    cumulative = scores.float().softmax(dim=-1).cumsum(dim=-1)
    draws = torch.cat([torch.rand(1, generator=gen) for gen in generators])
    # Scale by each row's total so rounding in the cumulative sum never leaves a draw above the last entry.
    targets = (draws * cumulative[:, -1])[:, None]
    picks = torch.searchsorted(cumulative, targets, right=True).clamp(max=scores.shape[-1] - 1)
    return picks[:, 0].tolist()
