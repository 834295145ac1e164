"""best_of: pick, among k sampled continuations, the one the language model itself reads most surely as the label.

score(c) = log p(c | "긍정 " + prompt) − log p(c | "부정 " + prompt), sign flipped for 부정: the same model, one
batched forward pass over both contexts, no second model. With equal priors on the two labels, Bayes' rule turns
the score into the model's own P(label | text) = sigmoid(score), which the bot shows as the pick's confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from core.devices import device_of

# None: always the most on-label candidate. A threshold (take the first candidate read as at least this surely
# on-label) was measured against it with `python -m core.evaluate --accept max,0.9,0.75`: it kept distinct-2 at
# best_of 1's level but lost 1-3 points of control, while the arg-max cost at most 1.5 points of distinct-2
# (models/nsmc-small/MODEL_CARD.md); `core.evaluate --accept` repeats the comparison.
ACCEPT: float | None = None


@torch.inference_mode()
def continuation_logprobs(model: torch.nn.Module, contexts: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]], pad_id: int = 0) -> list[float]:
    """log p(continuation | context) for each pair, summed over the continuation's tokens, in one forward pass."""
    seqs = [list(ctx) + list(cont) for ctx, cont in zip(contexts, continuations)]
    width = max(map(len, seqs))
    device = device_of(model)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):  # right padding: every row's positions start at 0, as in training
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1).cpu()
    out = []
    for row, (ctx, cont) in enumerate(zip(contexts, continuations)):
        start = len(ctx) - 1  # logits at position t predict token t + 1
        out.append(float(logp[row, start:start + len(cont)].sum()))
    return out


def label_scores(model: torch.nn.Module, own: Sequence[int], other: Sequence[int],
                 continuations: Sequence[Sequence[int]], pad_id: int = 0) -> list[float]:
    """Per continuation: log p(c | own label's context) − log p(c | the other label's context)."""
    k = len(continuations)
    logps = continuation_logprobs(model, [own] * k + [other] * k, list(continuations) * 2, pad_id)
    return [a - b for a, b in zip(logps[:k], logps[k:])]


def pick_best(scores: Sequence[float], groups: int, accept: float | None = None) -> list[int]:
    """Per each of `groups` equal consecutive groups: the highest score (ties: the first candidate); with `accept`,
    the first candidate whose confidence reaches it, else the highest score."""
    k = len(scores) // groups
    picks = []
    for g in range(groups):
        group = range(g * k, (g + 1) * k)
        sure = [i for i in group if accept is not None and confidence(scores[i]) >= accept]
        picks.append(sure[0] if sure else max(group, key=lambda i: (scores[i], -i)))
    return picks


def confidence(score: float) -> float:
    """P(label | text) under equal label priors."""
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, score))))
