"""Matrices stored as int8 with one scale per row: the token embedding and the linear layers built on them.

One rule quantizes every such matrix, so the tied lm_head and the token embedding share one quantization: the
lm_head's int8 weights are the embedding's, exactly. Where fbgemm packs the tied lm_head (its own copy of the int8
matrix, in a layout that gives no rows back cheaply) and the model was loaded from a file, the embedding keeps no
matrix: `FileInt8Embedding` reads the looked-up rows from the checkpoint and quantizes them by that same rule."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

from core.weight_files import CheckpointChanged

log = logging.getLogger(__name__)

TINY = torch.finfo(torch.float32).tiny  # a row of zeros keeps a finite scale (its int8 values are all 0)
ROWS_AT_ONCE = 1024  # a few MB of float temporaries at a time


def _row_scale(part: torch.Tensor) -> torch.Tensor:
    """Each float32 row's scale: its largest magnitude / 127 (a row of zeros: the smallest normal float)."""
    return part.abs().amax(dim=1).clamp(min=TINY) / 127


def _levels(part: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Each row's int8 values, as float32 integers: round(row / scale), in [-127, 127]."""
    return part.div(scale[:, None]).round_().clamp_(-127, 127)


def quantize_rows(rows: int, columns: int, read: Callable[[int, int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per row) of a `rows` × `columns` matrix whose rows [begin, end) `read` returns:
    scale = the row's largest magnitude / 127, values = round(row / scale). The float matrix is read a block of rows
    at a time, so it never has to exist whole."""
    values = torch.empty(rows, columns, dtype=torch.int8)
    scale = torch.empty(rows)
    for begin in range(0, rows, ROWS_AT_ONCE):
        end = min(begin + ROWS_AT_ONCE, rows)
        part = read(begin, end).float()
        part_scale = _row_scale(part)
        values[begin:end] = _levels(part, part_scale)
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


class FileInt8Embedding(nn.Module):
    """The token embedding of a tied int8 model whose lm_head fbgemm packed, without a resident matrix: an
    Int8Embedding would be a second copy of the packed head's int8 rows (KoGPT2-base: 37.5 MiB). A lookup reads each
    distinct looked-up row from the checkpoint (`pick`, core/weight_files.py), quantizes it by `quantize_rows`'s rule
    and multiplies it back as `Int8Embedding.forward` does: every vector is bit for bit Int8Embedding's, the tied
    lm_head's weights for that token.

    `weight_scale` (4 bytes a row) is kept from the load: a row read again must come back with the same scale, a cheap
    check beside the file's size and modification time. Should the file be written after all, the rows are taken
    back from the packed lm_head (`recover`, one copy of the int8 matrix, logged once) and lookups go on from them."""

    def __init__(self, pick: Callable[[torch.Tensor], torch.Tensor], weight_scale: torch.Tensor, embedding_dim: int,
                 recover: Callable[[], torch.Tensor]):
        super().__init__()
        self.register_buffer("weight_scale", weight_scale)
        self.num_embeddings, self.embedding_dim = len(weight_scale), embedding_dim
        self._pick, self._recover = pick, recover
        self.resident: Int8Embedding | None = None  # set once the file has changed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.resident is not None:
            return self.resident(input_ids)
        ids, where = torch.unique(input_ids.reshape(-1), return_inverse=True)  # each distinct row read once
        if len(ids) and ((bad := ids[0].item()) < 0 or (bad := ids[-1].item()) >= self.num_embeddings):
            raise IndexError(f"token id {bad} is outside the embedding's [0, {self.num_embeddings})")
        try:
            part = self._pick(ids).float()
            scale = _row_scale(part)
            if not torch.equal(scale, self.weight_scale[ids]):
                raise CheckpointChanged("the checkpoint's rows read again differ from the loaded ones")
        except CheckpointChanged as exc:
            log.warning("%s; the token embedding takes its rows from the lm_head from now on (+%d MB)", exc,
                        self.num_embeddings * self.embedding_dim >> 20)
            self.resident = Int8Embedding(self._recover(), self.weight_scale)
            return self.resident(input_ids)
        rows = _levels(part, scale).to(torch.int8).float().mul_(scale[:, None])  # as Int8Embedding: no -0.0 kept
        return rows[where].view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row, rows read from the checkpoint at lookup"


class RowInt8Linear(nn.Module):
    """y = x Wᵀ + b with int8 weights (one scale per output channel) and int8 activations (one scale per row).

    torch's dynamic quantization scales a whole batch's input with one number, so a row's result moved with its batch
    mates. Here each row is quantized with its own scale, the int8 products are summed exactly in int32
    (`torch._int_mm`, oneDNN's VNNI kernel on x86), and the rescaling is elementwise: a row's output is a function of
    that row alone, bit for bit, whatever the batch around it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        weight = weight.detach()
        self._store(*quantize_rows(weight.shape[0], weight.shape[1], lambda begin, end: weight[begin:end]), bias)

    @classmethod
    def from_int8(cls, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> RowInt8Linear:
        """The layer over weights already quantized by `quantize_rows` (a tied lm_head over its Int8Embedding's)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._store(weight_int8, weight_scale, bias)  # noqa: SLF001 (its own class)
        return layer

    def _store(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.out_features, self.in_features = weight_int8.shape
        self.packed = _fbgemm_pack(self.weight_int8, self.weight_scale)
        if self.packed is not None:
            self.weight_int8 = None  # fbgemm keeps its own copy, in the layout its kernels read

    @property
    def int8_weight(self) -> torch.Tensor:
        return self.weight_int8 if self.packed is None else torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, scale = self._products(x)
        # One fused multiply-add per element (torch.addcmul: correctly rounded once, in its vector and scalar loops
        # alike), so a kernel's split of the rows cannot change a row's bits.
        out = out.mul_(scale) if self.bias is None else torch.addcmul(self.bias, out, scale)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + self(x), in two passes over the output instead of three: (residual + products × row scale)
        with one rounding, then + bias. x and residual are (rows, features)."""
        out, scale = self._products(x)
        out = torch.addcmul(residual, out, scale)
        return out if self.bias is None else out.add_(self.bias)

    def _products(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the int32 products times each channel's scale, each row's scale), for x as (rows, in_features)."""
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        # 127.0, not 127: an integer scalar costs a conversion per call. (An inf-norm is 8x slower than abs + amax.)
        scale = rows.abs().amax(dim=1, keepdim=True).div_(127.0).clamp_(min=TINY)
        levels = rows.div(scale)  # in [-127, 127]; rounded to integers (half to even) as they are quantized
        if self.packed is not None:
            # fbgemm quantizes with scale 1 and zero point 128 (rounding half to even, as torch.round: one pass fewer
            # than rounding here), sums int8 products in int32 and multiplies by the channel scale:
            # float(acc) * weight_scale, as the line below.
            return _FBGEMM_LINEAR(levels, 1.0, 128, self.packed), scale
        acc = torch._int_mm(levels.round_().to(torch.int8), self.weight_int8.t())  # noqa: SLF001 (int8 GEMM)
        return torch.mul(acc, self.weight_scale), scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per row"


_FBGEMM_LINEAR = getattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32", None)


def _fbgemm_pack(weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.ScriptObject | None:
    """fbgemm's prepacked int8 weights where this torch has fbgemm (x86), else None (`torch._int_mm` then).

    Measured on KoGPT2-base's shapes (2 cores): the same exact int32 products as `torch._int_mm`, about 3x faster
    for the 51,200-wide lm_head at one row, because the weights are packed once instead of at every call."""
    if _FBGEMM_LINEAR is None or "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated in favour of torchao; only packing uses one
        qweight = torch._make_per_channel_quantized_tensor(  # noqa: SLF001 (wraps the int8 values, no copy of floats)
            weight_int8, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qweight, None)
