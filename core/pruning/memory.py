"""Handing memory back to the operating system."""
from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import torch

MADV_DONTNEED = 4
_PROC_MAPS = Path("/proc/self/maps")


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc (macOS, musl)
        return None


def release_freed_memory() -> None:
    """glibc keeps freed buffers (activations, a Hessian's factorisation) in its arenas, so RSS grows phase
    after phase; hand them back. ~ms a call."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def in_private_file_mapping(t: torch.Tensor) -> bool:
    """Whether t is the whole of its storage and that lies in a copy-on-write mapping of a file: a checkpoint
    that safetensors mapped in place of reading it. False off Linux and off the CPU."""
    if t.device.type != "cpu" or not _PROC_MAPS.exists():
        return False
    storage = t.untyped_storage()
    lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    if t.data_ptr() != lo or t.numel() * t.element_size() != storage.nbytes():
        return False  # other tensors may view the rest
    for line in _PROC_MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        a, b = (int(x, 16) for x in fields[0].split("-"))
        if a <= lo < b:
            return hi <= b and fields[1].endswith("p") and fields[4] != "0" and len(fields) == 6
    return False


def release_file_pages(t: torch.Tensor) -> None:
    """Unmap the pages wholly inside t, which must lie in a private file mapping (in_private_file_mapping)
    and never be read again: the process stops holding them, and a later read would see the file again."""
    libc = _libc()
    if libc is None:
        return
    page = mmap.PAGESIZE
    storage = t.untyped_storage()
    lo = -(-storage.data_ptr() // page) * page  # pages shared with a neighbouring tensor stay
    hi = (storage.data_ptr() + storage.nbytes()) // page * page
    if hi > lo:
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED)
