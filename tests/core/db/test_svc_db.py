"""Migrations, tenant scoping of repositories, API-key hashing; on SQLite and on Postgres."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from core.auth import KEY_RE, authenticate, create_key, create_tenant, hash_key
from core.db.engine import get_engine, session_scope
from core.db.ids import new_id
from core.db.migrate import check
from core.db.models import Job
from core.db.repositories import CalibrationSetRepository, JobRepository
from core.errors import Unauthorized

PEPPER = b"pepper"


def test_schema_comes_from_migrations_and_has_no_drift(db_url: str):
    check(db_url)  # raises when models and the migrated schema differ
    names = set(inspect(get_engine(db_url)).get_table_names())
    assert {
        "tenants",
        "api_keys",
        "jobs",
        "job_events",
        "artifacts",
        "calibration_sets",
        "idempotency_keys",
        "alembic_version",
    } <= names


def _job(tenant: str) -> Job:
    return Job(
        id=new_id("job"),
        tenant_id=tenant,
        status="queued",
        request={},
        config={"model": "m"},
        job_metadata={},
        attempt=0,
        max_attempts=3,
        cancel_requested=False,
        event_seq=0,
        version=1,
    )


def test_repositories_never_cross_tenants(db_url: str):
    with session_scope(db_url) as s:
        a = create_tenant(s, "a").id
        b = create_tenant(s, "b").id
        ja = JobRepository(s, a).add(_job(a))
        repo_a = JobRepository(s, a)
        repo_a.add_event(ja, "status", {"status": "queued"})
        ja_id = ja.id
    with session_scope(db_url) as s:
        rb = JobRepository(s, b)
        assert rb.get(ja_id) is None
        assert rb.list(statuses=None, after=None, limit=10) == ([], False)
        assert rb.events(ja_id, after=0, limit=10) == ([], False)
        assert rb.artifacts(ja_id) == []
        assert CalibrationSetRepository(s, b).list(after=None, limit=10) == ([], False)
        ra = JobRepository(s, a)
        assert ra.get(ja_id) is not None
        assert [e.seq for e in ra.events(ja_id, after=0, limit=10)[0]] == [1]
        with pytest.raises(ValueError):
            rb.add(_job(a))
    with pytest.raises(ValueError):
        JobRepository(None, "")  # type: ignore[arg-type]


def test_cursor_pagination_is_newest_first(db_url: str):
    with session_scope(db_url) as s:
        t = create_tenant(s, "p").id
        ids = [JobRepository(s, t).add(_job(t)).id for _ in range(5)]
    with session_scope(db_url) as s:
        repo = JobRepository(s, t)
        page1, more1 = repo.list(statuses=None, after=None, limit=2)
        page2, more2 = repo.list(statuses=None, after=page1[-1].id, limit=2)
        page3, more3 = repo.list(statuses=None, after=page2[-1].id, limit=2)
    assert [j.id for j in page1 + page2 + page3] == ids[::-1]
    assert (more1, more2, more3) == (True, True, False)


def test_api_keys_are_prefixed_stored_hashed_and_bound_to_tenant(db_url: str):
    with session_scope(db_url) as s:
        t = create_tenant(s, "k")
        row, full = create_key(s, t.id, PEPPER, "ci")
        tid = t.id
    assert KEY_RE.match(full) and full.startswith("sct_")
    with session_scope(db_url) as s:
        stored = s.execute(text("SELECT key_hash FROM api_keys")).scalar_one()
        assert stored == hash_key(full, PEPPER) and full not in stored
        assert authenticate(s, f"Bearer {full}", PEPPER).tenant_id == tid
        for bad in (None, "Basic abc", f"Bearer {full[:-1]}x", f"Bearer {full}", "Bearer sct_zz"):
            pepper = b"other" if bad == f"Bearer {full}" else PEPPER
            with pytest.raises(Unauthorized):
                authenticate(s, bad, pepper)
