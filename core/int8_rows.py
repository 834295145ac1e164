"""Matrices stored as int8 with one scale per row, and the token embedding built on them.

One rule quantizes every such matrix, so the tied lm_head and the token embedding share one quantization: the
lm_head's int8 weights are the embedding's, exactly."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

TINY = torch.finfo(torch.float32).tiny  # a row of zeros keeps a finite scale (its int8 values are all 0)
ROWS_AT_ONCE = 1024  # a few MB of float temporaries at a time


def quantize_rows(rows: int, columns: int, read: Callable[[int, int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per row) of a `rows` × `columns` matrix whose rows [begin, end) `read` returns:
    scale = the row's largest magnitude / 127, values = round(row / scale). The float matrix is read a block of rows
    at a time, so it never has to exist whole."""
    values = torch.empty(rows, columns, dtype=torch.int8)
    scale = torch.empty(rows)
    for begin in range(0, rows, ROWS_AT_ONCE):
        end = min(begin + ROWS_AT_ONCE, rows)
        part = read(begin, end).float()
        part_scale = part.abs().amax(dim=1).clamp(min=TINY) / 127
        values[begin:end] = part.div(part_scale[:, None]).round_().clamp_(-127, 127)
        scale[begin:end] = part_scale
    return values, scale


class Int8Embedding(nn.Module):
    """A token embedding whose rows are int8 values times a per-row scale: a quarter of float32's memory (KoGPT2-base:
    39 MB instead of 157 MB). A lookup is each looked-up row's values times its scale, one correctly rounded multiply
    per element, so a token's vector depends on that token alone (never on the batch) and equals what the tied int8
    lm_head reads as that token's weights."""

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", weight_scale)
        self.num_embeddings, self.embedding_dim = weight_int8.shape

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Embedding:
        weight = weight.detach()
        return cls(*quantize_rows(weight.shape[0], weight.shape[1], lambda begin, end: weight[begin:end]))

    def dequantized(self) -> torch.Tensor:
        """The float32 matrix this embedding stands for (what each lookup returns, row by row)."""
        return self.weight_int8.float().mul_(self.weight_scale[:, None])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[input_ids].float().mul_(self.weight_scale[input_ids].unsqueeze(-1))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"
