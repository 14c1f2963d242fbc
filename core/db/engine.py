"""Engine and session factory, one engine per process and URL (recreated after fork), and the unit of work."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("secateurs.db")
_lock = threading.Lock()
_AFTER_COMMIT = "secateurs.after_commit"
AfterCommit = Callable[[Session], None]
_engines: dict[tuple[int, str], Engine] = {}


def make_engine(url: str, echo: bool = False) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        # SQLite: take the write lock at BEGIN so read-then-write transactions never deadlock.
        @event.listens_for(engine, "connect")
        def _no_pysqlite_begin(dbapi_conn, _record):  # noqa: ANN001
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn):  # noqa: ANN001
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # a short connect timeout: an unreachable host must fail fast (and answer 503), not hang a request
    args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    return create_engine(url, echo=echo, connect_args=args, pool_pre_ping=True, pool_size=10, max_overflow=20)


def get_engine(url: str, echo: bool = False) -> Engine:
    key = (os.getpid(), url)
    with _lock:
        eng = _engines.get(key)
        if eng is None:
            eng = _engines[key] = make_engine(url, echo)
        return eng


def dispose_all() -> None:
    with _lock:
        for eng in _engines.values():
            eng.dispose(close=False)
        _engines.clear()


def session_factory(url: str, info: dict | None = None) -> sessionmaker[Session]:
    """``info``: what every session of the factory starts with in ``Session.info``."""
    return sessionmaker(bind=get_engine(url), expire_on_commit=False, autoflush=False, info=info)


def after_commit(session: Session, hook: AfterCommit) -> None:
    """Run ``hook(session)`` once the unit of work holding ``session`` has committed (e.g. publish a task
    only when its row is visible). Each hook runs in a transaction of its own, committed after it; a failing
    hook is logged and rolled back, never undoing what was committed before it."""
    session.info.setdefault(_AFTER_COMMIT, []).append(hook)


def commit(session: Session) -> None:
    """Commit, then run the after-commit hooks registered during the transaction."""
    session.commit()
    while hooks := session.info.pop(_AFTER_COMMIT, None):
        for hook in hooks:
            try:
                hook(session)
                session.commit()
            except Exception:
                session.rollback()
                log.exception("after-commit hook %r failed", hook)


@contextmanager
def unit_of_work(sessions: Callable[[], Session]) -> Iterator[Session]:
    """A unit of work: commit at the end (then the after-commit hooks), roll back on error."""
    session = sessions()
    try:
        yield session
        commit(session)
    except BaseException:
        session.info.pop(_AFTER_COMMIT, None)
        session.rollback()
        raise
    finally:
        session.close()


def session_scope(url: str) -> contextlib.AbstractContextManager[Session]:
    """``unit_of_work`` on a new session of ``url``'s engine."""
    return unit_of_work(session_factory(url))
