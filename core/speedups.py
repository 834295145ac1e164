"""Inference speed-ups that keep the model's meaning: a fused GELU, optional int8 quantization, and attention that
computes each row on its own.

Both the int8 layers and the attention are built so that a row's numbers do not depend on which other rows share its
batch, bit for bit: that is what lets a seed give the same text alone or in any batch (README "Seeds")."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.activations import ACT2FN, NewGELUActivation
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.pytorch_utils import Conv1D

from core.int8_rows import TINY, Int8Embedding, quantize_rows
from core.memory import return_freed_memory


def fuse_gelu(model: nn.Module) -> nn.Module:
    """GPT-2's `gelu_new` is the tanh approximation written as five tensor operations; torch's
    `gelu(approximate="tanh")` is the same formula in one kernel (equal up to float rounding)."""
    for name, child in list(model.named_children()):
        if isinstance(child, NewGELUActivation):
            setattr(model, name, ACT2FN["gelu_pytorch_tanh"])
        else:
            fuse_gelu(child)
    return model


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
        rows = x.reshape(-1, self.in_features)
        scale = rows.abs().amax(dim=1, keepdim=True).div_(127).clamp_(min=TINY)  # (an inf-norm is 8x slower)
        levels = rows.div(scale)  # in [-127, 127]; rounded to integers (half to even) as they are quantized
        if self.packed is not None:
            # fbgemm quantizes with scale 1 and zero point 128 (rounding half to even, as torch.round: one pass fewer
            # than rounding here), sums int8 products in int32 and multiplies by the channel scale:
            # float(acc) * weight_scale, as the line below.
            out = _FBGEMM_LINEAR(levels, 1.0, 128, self.packed).mul_(scale)
        else:
            acc = torch._int_mm(levels.round_().to(torch.int8), self.weight_int8.t())  # noqa: SLF001 (int8 GEMM)
            out = torch.mul(acc, self.weight_scale).mul_(scale)
        # Separate multiplies and adds (no fused multiply-add): each is correctly rounded wherever a kernel splits it.
        if self.bias is not None:
            out.add_(self.bias)
        return out.view(*x.shape[:-1], self.out_features)

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


def quantize_int8(model: nn.Module) -> nn.Module:
    """Every linear layer (GPT-2's Conv1D and the lm_head) as a RowInt8Linear and the token embedding as an
    Int8Embedding (a tied lm_head then reads the embedding's int8 rows); inference only.

    Layer by layer and in place: each fp32 layer is dropped as soon as its int8 copy exists, so the peak is the fp32
    model plus one layer."""
    model.eval()
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embedding) is nn.Embedding:
        tied = type(head) is nn.Linear and head.weight is embedding.weight
        int8 = Int8Embedding.from_float(embedding.weight)
        model.set_input_embeddings(int8)
        if tied:
            model.set_output_embeddings(RowInt8Linear.from_int8(int8.weight_int8, int8.weight_scale, head.bias))
        del embedding, head
    # (parent, name) pairs only: holding the layers themselves would keep every fp32 weight alive to the end.
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, Conv1D) or type(child) is nn.Linear]
    for parent, name in targets:
        child = getattr(parent, name)
        weight = child.weight.t() if isinstance(child, Conv1D) else child.weight
        setattr(parent, name, RowInt8Linear(weight, child.bias))
        del child, weight
    return_freed_memory()
    return model


ROW_ATTENTION = "rowwise_sdpa"


def rowwise_attention(model: nn.Module) -> nn.Module:
    """Attention whose every row is computed on its own unpadded keys: see `_rowwise_sdpa`."""
    AttentionInterface.register(ROW_ATTENTION, _rowwise_sdpa)
    AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)  # the masks it reads are SDPA's (boolean, 4-D)
    model.set_attn_implementation(ROW_ATTENTION)
    return model


def _rowwise_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, run on each row's own keys when a batch is padded.

    Over a padded batch, a row's softmax and weighted sum run across the padding columns too; they add zeros, but the
    kernels' vector lanes and blocks then group the real terms differently, so the row's result moves in the last bits
    with the width its batch mates impose. Here the rows are cut to their unpadded keys (runs of neighbouring rows with
    the same keys go together, as views) and each run goes through SDPA unmasked, exactly as it would alone; SDPA's CPU
    kernel computes each (row, head) by itself. Without padding there is nothing to cut."""
    sdpa = AttentionInterface()["sdpa"]
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None or attention_mask.dim() != 4 or (q_len != 1 and q_len != k_len):
        return sdpa(module, query, key, value, attention_mask, **kwargs)
    runs = getattr(attention_mask, "row_runs", None)  # every layer of a forward pass gets the same mask tensor
    if runs is None:
        runs = attention_mask.row_runs = _row_runs(attention_mask)
    if not runs:
        return sdpa(module, query, key, value, attention_mask, **kwargs)  # not one span per row: not the engine's
    out = query.new_zeros(query.shape[0], q_len, query.shape[1], value.shape[-1])
    for begin, end, start, stop in runs:
        keys = slice(start, stop)
        queries = keys if q_len == k_len else slice(0, 1)
        if q_len == 1 and stop != k_len:  # the query itself is padding: its output is never read
            continue
        part, _ = sdpa(module, query[begin:end, :, queries], key[begin:end, :, keys], value[begin:end, :, keys], None,
                       **kwargs)
        out[begin:end, queries] = part
    return out, None


def _row_runs(attention_mask: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(first row, end row, first key, end key) of each run of neighbouring rows with the same unpadded keys; empty
    when a row's keys are not one span."""
    valid = attention_mask[:, 0].any(dim=1)  # the keys some query of the row may see: its unpadded tokens
    positions = torch.arange(valid.shape[1], device=valid.device)
    first, last, count = torch.stack([torch.where(valid, positions, valid.shape[1]).amin(dim=1),
                                      torch.where(valid, positions, -1).amax(dim=1), valid.sum(dim=1)]).tolist()
    if any(f + n - 1 != la or n == 0 for f, la, n in zip(first, last, count)):
        return []
    runs: list[tuple[int, int, int, int]] = []
    for row, (f, n) in enumerate(zip(first, count)):
        if runs and runs[-1][2:] == (f, f + n):
            runs[-1] = (runs[-1][0], row + 1, f, f + n)
        else:
            runs.append((row, row + 1, f, f + n))
    return runs
