"""GPT-2's linear layer as its checkpoints store it, without transformers: a module of its own so that
core/gpt2_model.py (which builds with it) and core/speedups.py (which quantizes it) both import it."""

from __future__ import annotations

import torch
from torch import nn


def empty(*shape: int) -> nn.Parameter:
    """A weight a loader fills in: on the meta device, never initialized (random initialization of meta tensors goes
    through torch's reference kernels, which import torch._dynamo: ~100 MB)."""
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class Linear1D(nn.Module):
    """transformers' Conv1D (y = x W + b, W stored inputs × outputs as GPT-2's checkpoints hold it) with its forward's
    torch call, so the same bits, made empty."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight, self.bias = empty(nx, nf), empty(nf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.nf,))
