"""Inference speed-ups that keep the model's meaning: a fused GELU, and optional int8 dynamic quantization."""

from __future__ import annotations

import warnings

import torch
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


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace GPT-2's Conv1D (a linear layer with transposed weight) by nn.Linear, which quantization knows."""
    for name, child in list(model.named_children()):
        if isinstance(child, Conv1D):
            linear = nn.Linear(child.weight.shape[0], child.weight.shape[1])
            with torch.no_grad():
                linear.weight.copy_(child.weight.t())
                linear.bias.copy_(child.bias)
            setattr(model, name, linear)
        else:
            conv1d_to_linear(child)
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    """int8 weights, activations quantized on the fly (torch's dynamic quantization); inference only."""
    model = conv1d_to_linear(model.eval())
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which would be one more dependency.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
