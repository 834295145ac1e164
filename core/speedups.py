"""Inference speed-ups that keep the model's meaning: a fused GELU, and optional int8 dynamic quantization."""

from __future__ import annotations

import warnings

from torch import nn
from transformers.activations import ACT2FN, NewGELUActivation
from transformers.pytorch_utils import Conv1D


def fuse_gelu(model: nn.Module) -> nn.Module:
    """GPT-2's `gelu_new` is the tanh approximation written as five tensor operations; torch's
    `gelu(approximate="tanh")` is the same formula in one kernel (equal up to float rounding)."""
    for name, child in list(model.named_children()):
        if isinstance(child, NewGELUActivation):
            setattr(model, name, ACT2FN["gelu_pytorch_tanh"])
        else:
            fuse_gelu(child)
    return model


def _as_linear(conv: Conv1D) -> nn.Linear:
    """GPT-2's Conv1D is a linear layer with a transposed weight; nn.Linear is what quantization knows."""
    linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], device="meta")  # no throw-away random weights
    linear.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=False)
    linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
    return linear


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace GPT-2's Conv1D layers by nn.Linear, in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, Conv1D):
            setattr(model, name, _as_linear(child))
        else:
            conv1d_to_linear(child)
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    """int8 weights, activations quantized on the fly (torch's dynamic quantization); inference only.

    Layer by layer and in place: each fp32 layer is dropped as soon as its int8 copy exists, so the peak is the fp32
    model plus one layer (`quantize_dynamic` copies the whole model first, holding both)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import default_dynamic_qconfig

    model.eval()
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which would be one more dependency.
        warnings.simplefilter("ignore")
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Conv1D):
                    child = _as_linear(child)
                if type(child) is nn.Linear:
                    child.qconfig = default_dynamic_qconfig
                    setattr(parent, name, DynamicLinear.from_float(child))
    return model
