"""Giving memory back to the OS: freed heap blocks (glibc keeps them for reuse) and a checkpoint's mapped pages.

Every call is a no-op where the C library is not glibc or the system has no `madvise`."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
from collections.abc import Iterator

import torch


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


_LIBC = _libc()
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed blocks in each thread's arena for reuse: after a burst
    of requests the bot held ~100 MB more than before it, until this was called (measured: benchmarks/memory.py)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


@contextlib.contextmanager
def large_blocks_returned() -> Iterator[None]:
    """While loading, glibc gives every block over 128 KiB back to the OS when freed. By default it raises that
    threshold to the size of the largest block freed so far (up to 32 MiB) and keeps freed layers for reuse, which
    made the load's peak ~200 MB higher; afterwards the threshold stays at that 32 MiB maximum, as a running process
    would reach anyway."""
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is None:
        yield
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, 128 * 1024)
    try:
        yield
    finally:
        mallopt(m_mmap_threshold, 32 * 1024 * 1024)
        return_freed_memory()


def drop_mapped_pages(tensor: torch.Tensor) -> None:
    """Let the pages of a memory-mapped (read-only, private) checkpoint tensor leave this process's memory once read.
    The mapping stays valid: a later read would fetch them from the file again."""
    if _LIBC is None or _MADV_DONTNEED is None or tensor.numel() == 0:
        return
    page = mmap.PAGESIZE
    begin = tensor.data_ptr() // page * page
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    _LIBC.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), _MADV_DONTNEED)
