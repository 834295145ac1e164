"""best_of: pick, among k sampled continuations, the one the language model itself reads most surely as the label.

score(c) = log p(c | "긍정 " + prompt) − log p(c | "부정 " + prompt), sign flipped for 부정: the same model, no second
model. The engine sums the asked label's side from the logits it sampled with and scores only the other side here
(`continuation_logprobs`). With equal priors on the two labels, Bayes' rule turns the score into the model's own
P(label | text) = sigmoid(score), which the bot shows as the pick's confidence.
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


# Logits held at once while scoring: rows x positions x vocabulary floats (64 rows of 40 tokens of KoGPT2's 51,200
# would be 0.5 GB), so the rows go through the model in chunks of at most this many logits.
LOGITS_PER_CHUNK = 16 * 1024 * 1024


def continuation_logprobs(model: torch.nn.Module, contexts: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]], pad_id: int = 0) -> list[float]:
    """log p(continuation | context) for each pair, summed over the continuation's tokens, in batched forward passes."""
    seqs = [list(ctx) + list(cont) for ctx, cont in zip(contexts, continuations)]
    if not seqs:
        return []
    vocab = int(model.config.vocab_size)
    per_chunk = max(1, LOGITS_PER_CHUNK // (max(map(len, seqs)) * vocab))
    out: list[float] = []
    for start in range(0, len(seqs), per_chunk):
        chunk = slice(start, start + per_chunk)
        out.extend(_logprobs(model, seqs[chunk], [len(ctx) for ctx in contexts[chunk]], pad_id))
    return out


@torch.inference_mode()
def _logprobs(model: torch.nn.Module, seqs: list[list[int]], starts: list[int], pad_id: int) -> list[float]:
    width = max(map(len, seqs))
    device = device_of(model)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):  # right padding: every row's positions start at 0, as in training
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
    targets = ids[:, 1:, None].to(device)
    logp = (logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(dim=-1)).cpu()
    # logits at position t predict token t + 1: a continuation after a context of c tokens starts at c - 1
    return [float(logp[row, c - 1:len(seq) - 1].sum()) for row, (seq, c) in enumerate(zip(seqs, starts))]


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
