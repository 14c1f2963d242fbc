"""What a database outage looks like to our code, and riding one out.

``DATABASE_UNAVAILABLE`` are the errors of a database that cannot be reached or answered nothing
(connection refused or lost, pool exhausted, SQLite locked) as opposed to errors in what we asked of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import exc as sa_exc

log = logging.getLogger("secateurs.db")
T = TypeVar("T")

DATABASE_UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)


def retry_while_unavailable(fn: Callable[[], T], *, seconds: float, what: str) -> T:
    """``fn()``, retried with backoff (0.25 s doubling to 5 s) while the database is unavailable, for at most
    ``seconds``; then the last error is raised. ``fn`` must be one whole transaction (safe to repeat)."""
    deadline = time.monotonic() + seconds
    delay = 0.25
    while True:
        try:
            return fn()
        except DATABASE_UNAVAILABLE as e:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database unavailable (%s); retrying in %.2g s", what, e.__class__.__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
