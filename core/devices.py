"""Where the model runs: the device, its dtype, whether to quantize, and how many CPU threads this process may use."""

from __future__ import annotations

import math
import os
from pathlib import Path

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


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup v2/v1 CPU quota (a container's
    `--cpus`). `os.cpu_count()` is the host's count and oversubscribes a shared or limited box."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota(root: Path) -> float | None:
    """The CPU quota in CPUs, or None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # cgroup v1: -1 = unlimited
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
