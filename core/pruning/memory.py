"""Handing memory back to the operating system."""

from __future__ import annotations

import bisect
import ctypes
import functools
import mmap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

MADV_DONTNEED = 4
_PROC_MAPS = Path("/proc/self/maps")


@functools.cache
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


# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
GLIBC_INITIAL_THRESHOLD = 128 << 10  # both thresholds' values when a process starts
HEAP_BUFFER_LIMIT = 32 << 20  # the largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
_reuse_lock = threading.Lock()
_reuse_depth = 0


@contextmanager
def reusing_freed_memory() -> Iterator[None]:
    """Keep freed buffers of up to 32 MiB in the heap for the next allocation of the same size, instead of
    giving their pages back at once: a forward pass allocates and frees the same activation-sized buffers
    for every window, and each fresh page costs a page fault and its zeroing (on a float32 110M Llama block,
    a quarter of the forward's time, almost all of the elementwise products'). glibc's own dynamic threshold
    does not get there: it trims the heap's top whenever more than twice its threshold is free. What the
    heap holds is handed back explicitly at the end of each phase (release_freed_memory). On exit both
    thresholds go back to glibc's initial values (its dynamic adjustment stays off: mallopt cannot restore
    it). Re-entrant; a no-op off glibc."""
    global _reuse_depth
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    with _reuse_lock:
        _reuse_depth += 1
        if _reuse_depth == 1:
            libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))
            libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(HEAP_BUFFER_LIMIT))
    try:
        yield
    finally:
        with _reuse_lock:
            _reuse_depth -= 1
            if _reuse_depth == 0:
                libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(GLIBC_INITIAL_THRESHOLD))
                libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(GLIBC_INITIAL_THRESHOLD))
                libc.malloc_trim(0)


def file_mapped(tensors: list[torch.Tensor]) -> list[bool]:
    """Whether each tensor is the whole of its storage and that lies in a copy-on-write mapping of a file (a
    checkpoint that safetensors mapped in place of reading it), reading the process's mappings once. False
    off Linux and off the CPU."""
    spans = [_own_span(t) for t in tensors]
    if not any(spans) or not _PROC_MAPS.exists():
        return [False] * len(tensors)
    files = []  # (start, end) of private file mappings
    for line in _PROC_MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1].endswith("p") and fields[4] != "0":
            a, b = (int(x, 16) for x in fields[0].split("-"))
            files.append((a, b))
    files.sort()
    starts = [a for a, _ in files]
    out = []
    for span in spans:
        if span is None:
            out.append(False)
            continue
        k = bisect.bisect_right(starts, span[0]) - 1
        out.append(k >= 0 and files[k][0] <= span[0] and span[1] <= files[k][1])
    return out


def _own_span(t: torch.Tensor) -> tuple[int, int] | None:
    """[start, end) of t's memory if t is a CPU tensor that is the whole of its storage, else None (other
    tensors may view the rest)."""
    if t.device.type != "cpu":
        return None
    storage = t.untyped_storage()
    lo, n = storage.data_ptr(), storage.nbytes()
    if not n or t.data_ptr() != lo or t.numel() * t.element_size() != n:
        return None
    return lo, lo + n


def release_file_pages(t: torch.Tensor) -> None:
    """Unmap the pages wholly inside t, which must lie in a private file mapping (file_mapped): the process
    stops holding them, and a later read sees the file again (so t must not be read again if it was written
    since it was mapped)."""
    libc = _libc()
    if libc is None:
        return
    page = mmap.PAGESIZE
    storage = t.untyped_storage()
    lo = -(-storage.data_ptr() // page) * page  # pages shared with a neighbouring tensor stay
    hi = (storage.data_ptr() + storage.nbytes()) // page * page
    if hi > lo:
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED)


def spill_to_file(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Write CPU tensors to a safetensors file and return them mapped back from it: still readable, but held
    as file pages (read on use, dropped under pressure) instead of anonymous memory. A run keeps every
    pruned layer's packed mask until export, 1/16 of a bf16 model (0.8 GB for a 7B one)."""
    from safetensors.torch import load_file, save_file

    if not tensors:
        return {}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    back = load_file(str(path))
    for t, mapped in zip(back.values(), file_mapped(list(back.values())), strict=True):
        if mapped:  # loading touched the pages; they are the file's own, so let them go until read
            release_file_pages(t)
    return back
