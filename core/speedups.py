"""Inference speed-ups that keep the model's meaning: a fused GELU, optional int8 quantization, and attention that
computes each row on its own.

Both the int8 layers and the attention are built so that a row's numbers do not depend on which other rows share its
batch, bit for bit: that is what lets a seed give the same text alone or in any batch (README "Seeds").

They apply to transformers' GPT2LMHeadModel, which a CPU serves only where core/gpt2_model.py's tree does not (so
transformers' activations and attention registries, ~100 MB of imports, are imported only here, when used)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from core.int8_rows import Int8Embedding, RowInt8Linear
from core.linear1d import Linear1D
from core.memory import return_freed_memory


def fuse_gelu(model: nn.Module) -> nn.Module:
    """GPT-2's `gelu_new` is the tanh approximation written as five tensor operations; torch's
    `gelu(approximate="tanh")` is the same formula in one kernel (equal up to float rounding)."""
    from transformers.activations import ACT2FN, NewGELUActivation

    for name, child in list(model.named_children()):
        if isinstance(child, NewGELUActivation):
            setattr(model, name, ACT2FN["gelu_pytorch_tanh"])
        else:
            fuse_gelu(child)
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    """Every linear layer (GPT-2's Conv1D, core.gpt2_model's Linear1D and the lm_head) as a RowInt8Linear and the token embedding as an
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
               if isinstance(child, (Conv1D, Linear1D)) or type(child) is nn.Linear]
    for parent, name in targets:
        child = getattr(parent, name)
        weight = child.weight.t() if isinstance(child, (Conv1D, Linear1D)) else child.weight
        setattr(parent, name, RowInt8Linear(weight, child.bias))
        del child, weight
    return_freed_memory()
    return model


ROW_ATTENTION = "rowwise_sdpa"


def rowwise_attention(model: nn.Module) -> nn.Module:
    """Attention whose every row is computed on its own unpadded keys: see `_rowwise_sdpa`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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
    from transformers import AttentionInterface

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
