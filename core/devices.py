"""Where the model runs: the device, its dtype and whether to quantize (the CPUs it may use: core/cpus.py)."""

from __future__ import annotations

import torch

from core.errors import ModelLoadError


def device_of(model: torch.nn.Module) -> torch.device:
    """Where `model`'s weights live (inputs must be put there)."""
    return next(model.parameters()).device


def resolve_device(wanted: str) -> torch.device:
    """`auto` → CUDA when torch sees one, else CPU; `cuda` without a GPU is an error, never a silent fallback."""
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "model.device가 \"cuda\"인데 이 torch에서 GPU를 쓸 수 없습니다. CUDA용 torch를 설치하거나 model.device를 "
            "\"auto\" 또는 \"cpu\"로 두세요. (model.device is \"cuda\" but torch sees no GPU: install a CUDA build of "
            "torch, or use \"auto\"/\"cpu\")"
        )
    return torch.device(wanted)


def model_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that supports it, else fp16 there; fp32 on the CPU (its int8 path quantizes fp32 weights)."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_quantize(wanted: str, device: torch.device) -> str:
    """`auto` → int8 on the CPU (about 2.5× faster here), none on a GPU (bf16/fp16 is its fast path already)."""
    if wanted == "auto":
        return "int8" if device.type == "cpu" else "none"
    if wanted == "int8" and device.type != "cpu":
        raise ModelLoadError(
            "model.quantize = \"int8\"은 CPU에서만 됩니다 (PyTorch의 동적 양자화). GPU에서는 \"auto\" 또는 \"none\"을 "
            "쓰세요. (int8 dynamic quantization runs on the CPU only; use \"auto\" or \"none\" on a GPU)"
        )
    return wanted
