"""Per-row sampling rules for a batch in which every row has its own knobs.

The penalties read each row's `History` (kept up to date token by token) and change only the tokens concerned. The
warpers are callables with transformers' `LogitsProcessor` signature (transformers itself is not imported here),
whose parameters are tensors with one entry per row, so a row with
`top_k=1` stays greedy while its neighbours sample; they never read `input_ids`. Every rule works row by row,
elementwise or by a reduction along the vocabulary, so a row's result does not depend on which other rows share its
batch.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import torch

from core.knobs import Knobs

NEG_INF = float("-inf")


def _per_row(values: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(list(values), dtype=dtype)


class History:
    """One row's tokens (prompt included) as the penalties read them, kept up to date a token at a time: its length
    (min_length), its distinct tokens (repetition penalty) and, for `ngram_size` n, the tokens that followed each
    n-1 tokens (no-repeat n-grams), so a step costs the same however long the row has grown."""

    def __init__(self, tokens: Sequence[int], ngram_size: int = 0):
        if ngram_size < 0:
            raise ValueError(f"n-gram sizes must be >= 0, got [{ngram_size}]")
        self.ngram_size = ngram_size
        self.length = 0
        self.seen: set[int] = set()
        self.distinct = array("q")  # the seen tokens in first-seen order, ready to become an index tensor
        self.follows: dict[tuple[int, ...], dict[int, None]] = {}
        self.tail: tuple[int, ...] = ()  # the last n-1 tokens
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        self.length += 1
        if token not in self.seen:
            self.seen.add(token)
            self.distinct.append(token)
        n = self.ngram_size
        if n:
            if len(self.tail) == n - 1:
                self.follows.setdefault(self.tail, {})[token] = None
            self.tail = (*self.tail, token)[1 - n:] if n > 1 else ()

    def banned(self) -> list[int]:
        """The tokens that would complete an n-gram the row already holds."""
        return list(self.follows.get(self.tail, ()))


def penalise(scores: torch.Tensor, histories: Sequence[History], knobs: Sequence[Knobs],
             eos_token_id: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """Apply each row's repetition penalty (CTRL's, as transformers' RepetitionPenaltyLogitsProcessor; 1.0 = off),
    its no-repeat n-grams and its min_length (no end-of-sequence before the row holds that many tokens, prompt
    included, as `generate` counts) to `scores` in place, on the few tokens concerned only: no copy of the batch's
    logits. Returns where it wrote and the values it replaced (`scores[where] = replaced` undoes it), or None when
    no row has any of them."""
    if any(k.repetition_penalty <= 0 for k in knobs):
        raise ValueError(f"repetition penalties must be > 0, got {[k.repetition_penalty for k in knobs]}")
    # Index lists as arrays: torch reads them without a Python call per token. The penalised tokens come first, the
    # banned ones after them.
    rows, ids, penalties = array("q"), array("q"), array("f")
    banned_rows, banned_ids = array("q"), array("q")
    for row, (history, k) in enumerate(zip(histories, knobs)):
        if k.repetition_penalty != 1.0:
            count = len(history.distinct)
            rows += array("q", [row]) * count
            ids += history.distinct
            penalties += array("f", [k.repetition_penalty]) * count
        banned = history.banned()
        if history.length < k.min_length:
            banned.append(eos_token_id)
        if banned:
            banned_rows += array("q", [row]) * len(banned)
            banned_ids += array("q", banned)
    penalised = len(rows)
    rows += banned_rows
    ids += banned_ids
    if not rows:
        return None
    where = (_tensor(rows), _tensor(ids))
    replaced = scores[where]
    if penalised:
        seen = replaced[:penalised]
        penalty = _tensor(penalties)
        scores[where[0][:penalised], where[1][:penalised]] = torch.where(seen < 0, seen * penalty, seen / penalty)
    if banned_rows:
        scores[where[0][penalised:], where[1][penalised:]] = NEG_INF
    return where, replaced


def _tensor(values: array) -> torch.Tensor:
    """A tensor over a non-empty array's memory (int64 or float32, as the array's type)."""
    return torch.frombuffer(values, dtype=torch.long if values.typecode == "q" else torch.float32)


class RowTemperature:
    """Divide by each row's temperature, after shifting the maximum to 0 so tiny temperatures stay finite."""

    def __init__(self, temperatures: Sequence[float]):
        if any(t <= 0 for t in temperatures):
            raise ValueError(f"temperatures must be > 0, got {list(temperatures)}")
        self.temperature = _per_row(temperatures)[:, None]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        shifted = scores - scores.max(dim=-1, keepdim=True).values
        return shifted / self.temperature


class RowTopK:
    """Keep each row's k most likely tokens (ties at the boundary kept, as transformers does)."""

    def __init__(self, top_ks: Sequence[int]):
        if any(k < 1 for k in top_ks):
            raise ValueError(f"top_k must be >= 1, got {list(top_ks)}")
        self.top_k = _per_row(top_ks, torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        k = self.top_k.clamp(max=scores.shape[-1])
        kth = scores.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        return scores.masked_fill(scores < kth, NEG_INF)


class RowTopP:
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
# The top-k pass reads each row in chunks of this many tokens: the chunks' maxima pick the few chunks that can hold
# the k largest, and only those are searched (about a third of torch's topk over 51,200 tokens, measured).
CHUNK = 64
_IN_CHUNK = torch.arange(CHUNK)  # read only


class Rules(list):
    """Rules applied in order: transformers' LogitsProcessorList without its signature inspection at every call."""

    def __call__(self, input_ids: torch.LongTensor | None, scores: torch.Tensor) -> torch.Tensor:
        for rule in self:
            scores = rule(input_ids, scores)
        return scores


def build_warpers(knobs: Sequence[Knobs], top_k: bool = True) -> Rules:
    """The rules that reshape the distribution: temperature (keeps the order), top-k (unless the scores are already
    each row's top-k candidates), top-p."""
    rules = Rules()
    if any(k.temperature != 1.0 for k in knobs):
        rules.append(RowTemperature([k.temperature for k in knobs]))
    if top_k:
        rules.append(RowTopK([k.top_k for k in knobs]))
    if any(k.top_p < 1.0 for k in knobs):
        rules.append(RowTopP([k.top_p for k in knobs]))
    return rules


def largest(scores: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's `count` largest values, in descending order, and the ids of a set of tokens holding them.

    The values are exactly torch's topk's. Every token above the count-th largest chunk maximum is among the
    chunks searched, and those maxima are `count` tokens at least that large, so the values agree; which of several
    equal tokens comes back may differ from topk's choice (the caller checks the ties it cares about)."""
    rows, vocab = scores.shape
    chunks = vocab // CHUNK
    if count * CHUNK * 4 > vocab:
        return scores.topk(count, dim=-1)
    maxima = scores[:, :chunks * CHUNK].reshape(rows, chunks, CHUNK).amax(dim=-1)  # a view when it can be
    ids = (maxima.topk(count, dim=-1).indices[:, :, None] * CHUNK + _IN_CHUNK).flatten(1)
    if vocab > chunks * CHUNK:  # the tokens after the last whole chunk are always searched
        ids = torch.cat([ids, torch.arange(chunks * CHUNK, vocab).expand(rows, -1)], dim=1)
    values, where = scores.gather(1, ids).topk(count, dim=-1)
    return values, ids.gather(1, where)


@torch.inference_mode()  # the engine's logits are inference tensors, changed in place here and restored
def next_tokens(histories: Sequence[History], logits: torch.Tensor, knobs: Sequence[Knobs],
                generators: Sequence[torch.Generator], eos_token_id: int) -> list[int]:
    """Each row's next token under its own knobs, drawn with its own generator.

    The penalties touch only the tokens concerned; the warpers and the draw then run over each row's top-k
    candidates only, kept in token-id order so that a seed draws the same token as over the whole vocabulary.
    Temperature keeps the order, so the top k before it are the top k after it. Every step of a row is the same
    computation whatever rows share its batch, so its token is too, bit for bit."""
    scores = logits.float()
    undo = penalise(scores, histories, knobs, eos_token_id)
    try:
        return _choose(scores, knobs, generators)
    finally:  # the caller's logits as they came (the engine reports raw log-probabilities from them)
        if undo is not None:
            scores[undo[0]] = undo[1]


def _choose(scores: torch.Tensor, knobs: Sequence[Knobs], generators: Sequence[torch.Generator]) -> list[int]:
    vocab = scores.shape[-1]
    picks = [0] * len(knobs)
    narrow = [i for i, k in enumerate(knobs) if k.top_k <= CANDIDATES_MAX]
    if wide := [i for i, k in enumerate(knobs) if k.top_k > CANDIDATES_MAX]:
        index = None if len(wide) == len(knobs) else torch.tensor(wide)
        row_scores = scores if index is None else scores[index]
        drawn = sample(build_warpers([knobs[i] for i in wide])(None, row_scores), [generators[i] for i in wide])
        for i, token in zip(wide, drawn):
            picks[i] = token
    if not narrow:
        return picks
    part = scores if len(narrow) == len(knobs) else scores[torch.tensor(narrow)]
    widths = [min(knobs[i].top_k, vocab) for i in narrow]
    # One top-k pass for every narrowing row, one wider than the widest: a row's own k candidates are the first k,
    # unless its k-th and (k+1)-th values tie; such a row takes its own topk, as alone (which of the tied tokens
    # it keeps is then topk's choice for that row, whatever its batch).
    count = min(max(widths) + 1, vocab)
    values, order = largest(part, count)
    tops = values.tolist()
    # Rows go in groups of one width (their own top_k), never the widest of the batch: a row's softmax and
    # cumulative sum then run over the same numbers alone or beside any other rows.
    groups: dict[int, list[int]] = {}
    for j, w in enumerate(widths):
        groups.setdefault(w, []).append(j)
    for w, members in groups.items():
        index = _tensor(array("q", members))
        ids, kept = order[index, :w], values[index, :w]
        for m, j in enumerate(members):
            if w < count and tops[j][w - 1] == tops[j][w]:
                kept[m], ids[m] = (t[0] for t in part[j:j + 1].topk(w))
        candidates, where = ids.sort(dim=-1)
        rows = [narrow[j] for j in members]
        if w == 1:  # greedy: the one candidate, whatever a draw would say
            drawn = candidates[:, 0].tolist()
        else:
            warped = build_warpers([knobs[i] for i in rows], top_k=False)(None, kept.gather(1, where))
            chosen = sample(warped, [generators[i] for i in rows])
            drawn = [candidates[m, c].item() for m, c in enumerate(chosen)]
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
