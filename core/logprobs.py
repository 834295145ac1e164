"""Log-probabilities as the engine node reports them: of the model's raw distribution (log-softmax of its logits,
before temperature, top-k/top-p or penalties), which is what vLLM returns by default (`logprobs_mode=raw_logprobs`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core.devices import device_of
from core.types import TokenLogprob


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], tops: Sequence[int]) -> list[TokenLogprob]:
    """For each row of next-token `logits`: the chosen token's log-probability, its rank, and the row's `tops[i]`
    most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = torch.tensor(list(tokens), device=logp.device)[:, None]
    values = logp.gather(1, chosen)
    ranks = (logp > values).sum(dim=1) + 1
    width = min(max(tops, default=0), logp.shape[-1])
    top_values, top_ids = logp.topk(width, dim=-1) if width else (None, None)
    out = []
    for i, token in enumerate(tokens):
        top = () if not tops[i] else tuple(zip(top_ids[i, : tops[i]].tolist(), top_values[i, : tops[i]].tolist()))
        out.append(TokenLogprob(int(token), float(values[i, 0]), int(ranks[i]), top))
    return out


@torch.inference_mode()
def prompt_logprobs(model: torch.nn.Module, ids: Sequence[int], top: int) -> tuple[TokenLogprob, ...]:
    """Each prompt token's log-probability given the tokens before it, from the second token on (the first has no
    context), in one forward pass of the prompt alone (no padding: the values are those of a plain forward pass)."""
    if len(ids) < 2:
        return ()
    inputs = torch.tensor([list(ids)], device=device_of(model))
    logits = model(input_ids=inputs).logits[0, :-1]
    return tuple(token_logprobs(logits, ids[1:], [top] * (len(ids) - 1)))
