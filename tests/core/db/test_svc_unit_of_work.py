"""The unit of work: one commit at the end, rollback on error, after-commit hooks only once committed."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from core.auth import create_tenant
from core.db.engine import after_commit, session_scope
from core.db.repositories import TenantRepository


def _exists(url: str, name: str) -> bool:
    with session_scope(url) as s:
        return TenantRepository(s).by_name(name) is not None


def test_hooks_run_after_the_commit_in_their_own_transaction(db_url: str):
    seen: list[bool] = []

    def hook(s: Session) -> None:
        seen.append(_exists(db_url, "a"))  # another connection already sees the row
        create_tenant(s, "from-hook")

    with session_scope(db_url) as s:
        create_tenant(s, "a")
        after_commit(s, hook)
        assert seen == []
    assert seen == [True] and _exists(db_url, "from-hook")


def test_an_error_rolls_back_and_drops_the_hooks(db_url: str):
    ran: list[str] = []
    with pytest.raises(RuntimeError), session_scope(db_url) as s:
        create_tenant(s, "b")
        after_commit(s, lambda _s: ran.append("hook"))
        raise RuntimeError("boom")
    assert ran == [] and not _exists(db_url, "b")


def test_a_failing_hook_is_rolled_back_alone(db_url: str):
    def bad(s: Session) -> None:
        create_tenant(s, "half")
        raise RuntimeError("broker down")

    def good(s: Session) -> None:
        create_tenant(s, "after")

    with session_scope(db_url) as s:
        create_tenant(s, "c")
        after_commit(s, bad)
        after_commit(s, good)
    assert _exists(db_url, "c") and not _exists(db_url, "half") and _exists(db_url, "after")
