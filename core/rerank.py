"""best_of: pick, among k sampled continuations, the one the language model itself reads most surely as the label.

score(c) = log p(c | "긍정 " + prompt) − log p(c | "부정 " + prompt), sign flipped for 부정: the same model, no second
model. The engine sums the asked label's side from the logits it sampled with and scores only the other side here
(`continuation_logprobs`). With equal priors on the two labels, Bayes' rule turns the score into the model's own
P(label | text) = sigmoid(score), which the bot shows as the pick's confidence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core.devices import device_of
from core.gpt2_model import GPT2LM
from core.int8_rows import RowInt8Linear
from core.rerank_rule import ACCEPT, confidence, pick_best

__all__ = ["ACCEPT", "confidence", "continuation_logprobs", "pick_best"]  # the rule itself: core/rerank_rule.py

# Logits held at once while scoring: rows x positions x vocabulary floats (64 rows of 40 tokens of KoGPT2's 51,200
# would be 0.5 GB), so the rows go through the model in chunks of at most this many logits. core.gpt2_model's tree
# computes int8 logits only where a continuation's tokens are (a fraction of them: 9 rows of 35 tokens made the bot's
# peak ~120 MB higher with every position's). Not float32's: its matrix product can round a row differently with the
# number of rows, and the scores stay the previous releases' numbers.
LOGITS_PER_CHUNK = 16 * 1024 * 1024
POSITIONS_AT_ONCE = 32  # the own int8 tree's logits at once: 32 x 51,200 floats, 6.5 MB (and logsumexp's temporaries)


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
    if isinstance(model, GPT2LM) and isinstance(model.lm_head, RowInt8Linear):
        return _scored_positions(model, ids, mask, seqs, starts)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
    targets = ids[:, 1:, None].to(device)
    logp = (logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(dim=-1)).cpu()
    # logits at position t predict token t + 1: a continuation after a context of c tokens starts at c - 1
    return [float(logp[row, c - 1:len(seq) - 1].sum()) for row, (seq, c) in enumerate(zip(seqs, starts))]


def _scored_positions(model: GPT2LM, ids: torch.Tensor, mask: torch.Tensor, seqs: list[list[int]],
                      starts: list[int]) -> list[float]:
    """`_logprobs` with the int8 lm_head run only at the positions that predict a continuation's token: the same
    numbers (the head and the log-softmax work on each position by itself, bit for bit), without the other
    positions' logits."""
    hidden = model.hidden(ids, mask)
    rows = torch.tensor([row for row, (seq, c) in enumerate(zip(seqs, starts)) for _ in range(c - 1, len(seq) - 1)],
                        dtype=torch.long)
    positions = torch.tensor([t for seq, c in zip(seqs, starts) for t in range(c - 1, len(seq) - 1)], dtype=torch.long)
    targets = ids[rows, positions + 1][:, None]
    logp = torch.empty(len(rows))
    with torch.inference_mode():
        for begin in range(0, len(rows), POSITIONS_AT_ONCE):
            part = slice(begin, begin + POSITIONS_AT_ONCE)
            logits = model.lm_head(hidden[rows[part], positions[part]]).float()
            logp[part] = logits.gather(-1, targets[part])[:, 0] - logits.logsumexp(dim=-1)
    out, begin = [], 0
    for seq, c in zip(seqs, starts):
        end = begin + len(seq) - c
        out.append(float(logp[begin:end].sum()))
        begin = end
    return out
