"""A checkpoint's tensors, read one at a time: a load holds one tensor of the file in memory, never the whole file.

safetensors files are read with plain reads at each tensor's offset (the format: an 8-byte header size, a JSON
header, the data). PyTorch's `.bin`/`.pt`/`.ckpt` files are opened with `torch.load(mmap=True)`: nothing is read
until a tensor is used, and a tensor's pages leave the process's memory once it has been copied out."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from core.memory import drop_mapped_pages

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a checkpoint, not read yet."""

    shape: tuple[int, ...]
    read: Callable[[int, int], torch.Tensor]  # rows [begin, end) of the first dimension as a new tensor, as stored
    drop: Callable[[], None] = lambda: None  # lets go of whatever file pages reading it brought into memory

    def rows(self, begin: int, end: int) -> torch.Tensor:
        """Rows [begin, end) as a new float32 tensor."""
        return self.read(begin, end).float()

    def load(self) -> torch.Tensor:
        """The whole tensor as a new float32 tensor, after which its file pages are let go."""
        tensor = self.rows(0, self.shape[0] if self.shape else 1).reshape(self.shape)
        self.drop()
        return tensor


def mapped_tensor(tensor: torch.Tensor) -> StoredTensor:
    """A tensor of `torch.load(mmap=True)`: it lies in a memory map of the file, whose pages are dropped as soon as
    rows have been copied out of them."""
    flat = tensor.reshape(1) if tensor.dim() == 0 else tensor

    def read(begin: int, end: int) -> torch.Tensor:
        part = flat[begin:end]
        copied = part.clone()
        drop_mapped_pages(part)
        return copied

    return StoredTensor(tuple(tensor.shape), read, lambda: drop_mapped_pages(tensor))


def safetensors_file(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file, by name, in the file's order; ValueError when it is not one we can read
    (checked here, before any tensor is read: a tensor's bytes lie inside the file)."""
    with path.open("rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    file_size = path.stat().st_size
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: not a safetensors header")
    tensors: dict[str, StoredTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path.name}: tensor {name} has dtype {info['dtype']}")
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path.name}: tensor {name} has {end - begin} bytes for shape {list(shape)}")
        if 8 + size + end > file_size:
            raise ValueError(f"{path.name}: tensor {name} is truncated")
        tensors[name] = StoredTensor(shape, _file_rows(path, 8 + size + begin, row_bytes, shape, dtype, name))
    return tensors


def _file_rows(path: Path, offset: int, row_bytes: int, shape: tuple[int, ...], dtype: torch.dtype,
               name: str) -> Callable[[int, int], torch.Tensor]:
    def read(begin: int, end: int) -> torch.Tensor:
        tensor = torch.empty((end - begin, *shape[1:]), dtype=dtype)
        raw = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        with path.open("rb") as f:
            f.seek(offset + begin * row_bytes)
            if f.readinto(raw) != len(raw):
                raise ValueError(f"{path.name}: tensor {name} is truncated")
        return tensor

    return read
