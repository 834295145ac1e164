"""A checkpoint's tensors, read one at a time: a load holds one tensor of the file in memory, never the whole file.

safetensors files are read with positional reads (`pread`: no shared file position, so any thread may read) at each
tensor's offset (the format: an 8-byte header size, a JSON header, the data), through one descriptor per file that
stays open as long as something may still read from it. PyTorch's `.bin`/`.pt`/`.ckpt` files are opened with
`torch.load(mmap=True)`: nothing is read until a tensor is used, and a tensor's pages leave the process's memory once
it has been copied out.

A tensor can also be read again after loading, a few rows at a time (`StoredTensor.pick`: the token embedding's
looked-up rows, core/int8_rows.py). The open descriptor (or mapping) keeps reading the file that was loaded when it is
replaced by a rename or deleted; a file changed in place (its size or modification time) is refused with
`CheckpointChanged`, never read as if it were the loaded one."""

from __future__ import annotations

import json
import math
import os
import struct
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from core.memory import drop_mapped_pages


class CheckpointChanged(RuntimeError):
    """A checkpoint file read after loading is no longer the file that was loaded."""


class OpenFile:
    """A checkpoint file held open for positional reads, closed once nothing refers to it any more. What it reads is
    the file as it was opened: one replaced by a rename or deleted is still read through this descriptor; one written
    in place (a different size or modification time) is refused."""

    def __init__(self, path: Path):
        self.name = path.name
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        weakref.finalize(self, os.close, self.fd)
        self._as_opened = self._stamp()
        self.size = self._as_opened[0]
        self._lock = threading.Lock()  # only where the system has no pread (seek + read share the position)

    def _stamp(self) -> tuple[int, int]:
        stat = os.fstat(self.fd)
        return stat.st_size, stat.st_mtime_ns

    def check(self) -> None:
        """CheckpointChanged when the file was written since it was opened (its size or modification time)."""
        size, mtime = self._stamp()
        if (size, mtime) != self._as_opened:
            what = f"is now {size} bytes instead of {self.size}" if size != self.size else "was written to"
            raise CheckpointChanged(f"{self.name} {what} since the model was loaded from it: its rows are no longer "
                                    f"the loaded model's (restart the bot to load the new file)")

    def read_into(self, buffer: memoryview, offset: int) -> None:
        """Fill `buffer` with the file's bytes from `offset`; CheckpointChanged when the file ends before."""
        if hasattr(os, "preadv"):
            done = os.preadv(self.fd, [buffer], offset)
        else:
            with self._lock:
                os.lseek(self.fd, offset, os.SEEK_SET)
                done = os.readv(self.fd, [buffer])
        if done != len(buffer):
            raise CheckpointChanged(f"{self.name} ends at byte {self._stamp()[0]}, before the {len(buffer)} bytes at "
                                    f"{offset} that the loaded model read there (the file was truncated)")

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a checkpoint, not read yet."""

    shape: tuple[int, ...]
    read: Callable[[int, int], torch.Tensor]  # rows [begin, end) of the first dimension as a new tensor, as stored
    drop: Callable[[], None] = lambda: None  # lets go of whatever file pages reading it brought into memory
    # The rows at the given distinct indices (a 1-D integer tensor) as a new tensor as stored, read from the file
    # now, leaving no file pages in the process; CheckpointChanged when the file is no longer the one loaded. Valid
    # for as long as it is referenced (it keeps the file open).
    pick: Callable[[torch.Tensor], torch.Tensor] | None = None

    def rows(self, begin: int, end: int) -> torch.Tensor:
        """Rows [begin, end) as a new float32 tensor."""
        return self.read(begin, end).float()

    def load(self) -> torch.Tensor:
        """The whole tensor as a new float32 tensor, after which its file pages are let go."""
        tensor = self.rows(0, self.shape[0] if self.shape else 1).reshape(self.shape)
        self.drop()
        return tensor


def mapped_tensor(tensor: torch.Tensor, file: OpenFile | None = None) -> StoredTensor:
    """A tensor of `torch.load(mmap=True)`: it lies in a memory map of the file, whose pages are dropped as soon as
    rows have been copied out of them. `file`, the same file opened before it was mapped, lets `pick` check that it
    was not written since (a mapped file truncated under the process would end it with SIGBUS)."""
    flat = tensor.reshape(1) if tensor.dim() == 0 else tensor

    def read(begin: int, end: int) -> torch.Tensor:
        part = flat[begin:end]
        copied = part.clone()
        drop_mapped_pages(part)
        return copied

    def pick(ids: torch.Tensor) -> torch.Tensor:
        file.check()  # before touching the mapping: past a truncated file's end lies SIGBUS
        rows = flat.index_select(0, ids)
        drop_mapped_pages(flat)  # the kernel maps neighbouring pages too: the whole tensor's range goes (cheap)
        file.check()  # written while being read: what was read may be a mix
        return rows

    return StoredTensor(tuple(tensor.shape), read, lambda: drop_mapped_pages(tensor),
                        None if file is None or tensor.dim() == 0 else pick)


def safetensors_file(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file, by name, in the file's order; ValueError when it is not one we can read
    (checked here, before any tensor is read: a tensor's bytes lie inside the file)."""
    file = OpenFile(path)
    if file.size < 8:
        raise ValueError(f"{path.name}: not a safetensors file")
    size = struct.unpack("<Q", _bytes(file, 0, 8))[0]
    if 8 + size > file.size:
        raise ValueError(f"{path.name}: the header is truncated")
    header = json.loads(_bytes(file, 8, size))
    file_size = file.size
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
        read, pick = _file_rows(file, 8 + size + begin, row_bytes, shape, dtype)
        tensors[name] = StoredTensor(shape, read, pick=pick if shape else None)
    return tensors


def _bytes(file: OpenFile, offset: int, count: int) -> bytearray:
    data = bytearray(count)
    file.read_into(memoryview(data), offset)
    return data


def _file_rows(file: OpenFile, offset: int, row_bytes: int, shape: tuple[int, ...],
               dtype: torch.dtype) -> tuple[Callable[[int, int], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    def rows_of(count: int) -> tuple[torch.Tensor, memoryview]:
        tensor = torch.empty((count, *shape[1:]), dtype=dtype)
        return tensor, memoryview(tensor.reshape(-1).view(torch.uint8).numpy())

    def read(begin: int, end: int) -> torch.Tensor:
        tensor, raw = rows_of(end - begin)
        file.read_into(raw, offset + begin * row_bytes)
        return tensor

    def pick(ids: torch.Tensor) -> torch.Tensor:
        tensor, raw = rows_of(len(ids))
        for k, row in enumerate(ids.tolist()):
            if not 0 <= row < shape[0]:
                raise IndexError(f"row {row} of a tensor of {shape[0]} rows")
            file.read_into(raw[k * row_bytes:(k + 1) * row_bytes], offset + row * row_bytes)
        file.check()  # written since the load (or while being read): what was read may not be the loaded rows
        return tensor

    return read, pick
