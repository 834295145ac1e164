"""Device, dtype, quantization and thread-count choices, with the GPU and the cgroup faked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import cpus, devices
from core.errors import ModelLoadError


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch):
    def fake(bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    return fake


def test_auto_is_the_cpu_without_a_gpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device = devices.resolve_device("auto")
    assert device.type == "cpu"
    assert devices.model_dtype(device) == torch.float32
    assert devices.resolve_quantize("auto", device) == "int8"


def test_auto_is_cuda_with_bf16_when_a_gpu_is_there(gpu):
    gpu(bf16=True)
    device = devices.resolve_device("auto")
    assert device.type == "cuda"
    assert devices.model_dtype(device) == torch.bfloat16
    assert devices.resolve_quantize("auto", device) == "none"


def test_fp16_where_the_gpu_has_no_bf16(gpu):
    gpu(bf16=False)
    assert devices.model_dtype(devices.resolve_device("cuda")) == torch.float16


def test_explicit_cpu_wins_over_a_gpu(gpu):
    gpu()
    assert devices.resolve_device("cpu").type == "cpu"


def test_int8_on_a_gpu_is_refused_clearly():
    with pytest.raises(ModelLoadError, match="CPU에서만"):
        devices.resolve_quantize("int8", torch.device("cuda"))


def test_cuda_without_a_gpu_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="GPU를 쓸 수 없습니다"):
        devices.resolve_device("cuda")


@pytest.mark.parametrize(
    ("files", "affinity", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, 8, 8),  # cgroup v2, no quota: the affinity mask
        ({"cpu.max": "150000 100000\n"}, 8, 2),  # --cpus=1.5 → 2 threads
        ({"cpu.max": "50000 100000\n"}, 8, 1),  # never below one
        ({"cpu.max": "400000 100000\n"}, 2, 2),  # the mask is smaller than the quota
        ({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 16, 3),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, 4, 4),  # v1 unlimited
        ({}, 6, 6),  # no cgroup files at all
        # cgroup v2 says unlimited: a v1 quota beside it (hybrid mounts) does not count
        ({"cpu.max": "max 100000\n", "cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, 8, 8),
        ({"cpu/cpu.cfs_quota_us": "0", "cpu/cpu.cfs_period_us": "100000"}, 4, 4),  # no quota written
        ({"cpu/cpu.cfs_quota_us": "1", "cpu/cpu.cfs_period_us": "100000"}, 4, 1),  # the smallest quota: one
        ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "0"}, 4, 4),  # no period: unknown, no crash
        ({"cpu/cpu.cfs_quota_us": "2", "cpu/cpu.cfs_period_us": "1"}, 8, 2),  # a period of 1 µs is a period
    ],
)
def test_usable_cpus_from_affinity_and_cgroup_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files, affinity,
                                                    expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    monkeypatch.setattr(cpus.os, "cpu_count", lambda: 64)  # the host's count must not matter
    assert cpus.usable_cpus(tmp_path) == expected


@pytest.mark.parametrize(("cpu_count", "expected"), [(6, 6), (None, 1)])
@pytest.mark.parametrize("no_affinity", ["missing", "refused"])
def test_usable_cpus_without_an_affinity_mask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_affinity: str,
                                             cpu_count: int | None, expected: int) -> None:
    """Not on Linux (no sched_getaffinity) or refused: the host's count, at least one."""
    if no_affinity == "missing":
        monkeypatch.delattr(cpus.os, "sched_getaffinity", raising=False)
    else:
        def refused(pid: int) -> set[int]:
            raise OSError("not permitted")
        monkeypatch.setattr(cpus.os, "sched_getaffinity", refused, raising=False)
    monkeypatch.setattr(cpus.os, "cpu_count", lambda: cpu_count)
    assert cpus.usable_cpus(tmp_path) == expected


def test_counting_cpus_imports_no_torch() -> None:
    """The benchmarks' CTranslate2 rows count CPUs too: torch imported there added ~170 MB to the reference's peak."""
    code = "import sys, core.cpus; core.cpus.usable_cpus(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
