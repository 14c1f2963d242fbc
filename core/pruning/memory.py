"""Handing freed memory back to the operating system."""
from __future__ import annotations

import ctypes


def release_freed_memory() -> None:
    """glibc keeps freed buffers (activations, a Hessian's factorisation) in its arenas, so RSS grows phase
    after phase; hand them back. ~ms a call."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass
