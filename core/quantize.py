"""Optional int8 dynamic quantization of GPT-2's linear layers, for faster CPU inference."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


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
