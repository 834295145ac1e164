"""Inference speed-ups that keep the model's meaning: a fused GELU, and optional int8 dynamic quantization."""

from __future__ import annotations

import contextlib
import ctypes
import json
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
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
    return _linear(conv.weight.detach(), conv.bias.detach())


def _linear(conv_weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(conv_weight.shape[0], conv_weight.shape[1], device="meta")  # no throw-away random weights
    linear.weight = nn.Parameter(conv_weight.t().contiguous(), requires_grad=False)
    linear.bias = nn.Parameter(bias, requires_grad=False)
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
        # (parent, name) pairs only: holding the layers themselves would keep every fp32 weight alive to the end.
        targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
                   if isinstance(child, Conv1D) or type(child) is nn.Linear]
        for parent, name in targets:
            child = getattr(parent, name)
            linear = _as_linear(child) if isinstance(child, Conv1D) else child
            linear.qconfig = default_dynamic_qconfig
            setattr(parent, name, DynamicLinear.from_float(linear))
            del child, linear
    _return_freed_memory()
    return model


def _return_freed_memory() -> None:
    """Hand the freed fp32 weights back to the OS: glibc keeps freed blocks of this size for reuse otherwise."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a safetensors file, one at a time, with plain reads: a memory map's pages would stay in the
    process's memory until the whole file is unmapped (the format: an 8-byte header size, a JSON header, the data)."""
    with path.open("rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{path.name}: tensor {name} has dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=dtype)
            raw = tensor.reshape(-1).view(torch.uint8).numpy()
            f.seek(8 + size + begin)
            if f.readinto(memoryview(raw)) != end - begin:
                raise ValueError(f"{path.name}: tensor {name} is truncated")
            yield name, tensor.float()


def load_int8_streaming(directory: Path, config: GPT2Config) -> nn.Module | None:
    """GPT-2 from a directory of safetensors weights, each linear layer quantized as soon as it is read, so the fp32
    model never exists as a whole: the peak is the int8 model, the fp32 embeddings and one layer. None when the
    directory has no safetensors weights or the model needs something this loader does not provide."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    with _large_blocks_returned():
        return _load_int8(files, config)


@contextlib.contextmanager
def _large_blocks_returned() -> Iterator[None]:
    """While loading, glibc gives every block over 128 KiB back to the OS when freed. By default it raises that
    threshold to the size of the largest block freed so far (up to 32 MiB) and keeps freed layers for reuse, which
    made the load's peak ~200 MB higher; afterwards the threshold stays at that 32 MiB maximum, as a running process
    would reach anyway."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        yield
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, 128 * 1024)
    try:
        yield
    finally:
        mallopt(m_mmap_threshold, 32 * 1024 * 1024)
        _return_freed_memory()


def _load_int8(files: list[Path], config: GPT2Config) -> nn.Module | None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import default_dynamic_qconfig

    with torch.device("meta"):
        model = GPT2LMHeadModel(config).eval()
    expected = set(model.state_dict())
    convs = {name for name, module in model.named_modules() if isinstance(module, Conv1D)}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation, as in quantize_int8
        for file in files:
            for key, tensor in _read_safetensors(file):
                key = key if key in expected else f"transformer.{key}"  # a base GPT2Model's weights have no prefix
                if key not in expected:
                    continue  # buffers older transformers saved (attn.bias, masked_bias)
                path, _, leaf = key.rpartition(".")
                if path not in convs:
                    module = model.get_submodule(path)
                    if leaf in dict(module.named_buffers(recurse=False)):
                        module.register_buffer(leaf, tensor)
                    else:
                        setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))
                    continue
                parts = pending.setdefault(path, {})
                parts[leaf] = tensor
                if len(parts) == 2:
                    linear = _linear(parts.pop("weight"), parts.pop("bias"))
                    linear.qconfig = default_dynamic_qconfig
                    parent, _, name = path.rpartition(".")
                    setattr(model.get_submodule(parent), name, DynamicLinear.from_float(linear))
                    del pending[path], linear
    if config.tie_word_embeddings:
        model.tie_weights()
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta and name.endswith("attn.bias"):  # GPT-2's causal mask in older transformers
            n = buffer.shape[-1]
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent).register_buffer(
                leaf, torch.tril(torch.ones(n, n, dtype=torch.bool)).view(buffer.shape), persistent=False
            )
    if pending or any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None
    return quantize_int8(model)  # what is left: the lm_head (an nn.Linear)
