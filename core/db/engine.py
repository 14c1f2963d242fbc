"""Engine and session factory, one engine per process and URL (recreated after fork)."""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

_lock = threading.Lock()
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
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=20)


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


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False, autoflush=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A unit of work: commit at the end, roll back on error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
