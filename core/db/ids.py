"""Prefixed, time-ordered identifiers: sorting ids sorts by creation (newest first = id descending)."""

from __future__ import annotations

import secrets
import threading
import time

_lock = threading.Lock()
_last = (0, 0)


def new_id(prefix: str) -> str:
    """``{prefix}_`` + 12 hex digits of milliseconds + 14 random hex digits, monotonic within a process."""
    global _last
    with _lock:
        ms = time.time_ns() // 1_000_000
        last_ms, last_rand = _last
        if ms <= last_ms:
            ms, rand = last_ms, last_rand + 1
        else:
            rand = secrets.randbits(52)
        _last = (ms, rand)
    return f"{prefix}_{ms:012x}{rand:014x}"
