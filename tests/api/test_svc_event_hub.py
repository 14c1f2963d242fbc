"""The event hub on Postgres: a follower never misses an event committed while the hub was not listening,
whichever side of its backlog read the hub (re)connected on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url

from api.event_hub import EventHub, read_events
from core.auth import create_tenant
from core.db.engine import session_factory, session_scope
from core.db.ids import new_id
from core.db.models import Job
from core.db.repositories import JobRepository
from tests.service_fixtures import wipe

LISTEN_SQL = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query = 'LISTEN job_events'"


@pytest.fixture
def job(pg_database: str) -> Iterator[tuple[str, str]]:
    wipe(pg_database)
    with session_scope(pg_database) as s:
        tenant = create_tenant(s, "hub").id
        j = Job(
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
        JobRepository(s, tenant).add(j)
        JobRepository(s, tenant).add_event(j, "status", {"status": "queued"})
        job_id = j.id
    yield tenant, job_id


def _add_event(db_url: str, tenant: str, job_id: str, message: str) -> None:
    with session_scope(db_url) as s:
        repo = JobRepository(s, tenant)
        j = repo.get(job_id, lock=True)
        assert j is not None
        repo.add_event(j, "log", {"level": "info", "message": message})


def _listener_pids(db_url: str) -> set[int]:
    dsn = make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as c:
        return {r[0] for r in c.execute(LISTEN_SQL)}


async def _until(pred, timeout: float = 10) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def _next_ids(hub_follower_inbox: asyncio.Queue, timeout: float = 5) -> list[int]:
    delivery = await asyncio.wait_for(hub_follower_inbox.get(), timeout)
    return [e["id"] for e in delivery.events]


def test_an_event_committed_before_the_hub_first_listens_reaches_a_follower(pg_database: str, job):
    """The follower reads its backlog before the hub's first LISTEN; an event commits (announced to nobody);
    the hub starts listening (its catch-up skips the job: no follower was ready); then the follower is ready."""
    tenant, job_id = job

    async def main() -> list[int]:
        hub = EventHub(pg_database, session_factory(pg_database))
        f = hub.follow(tenant, job_id)
        backlog = await asyncio.to_thread(read_events, hub.sessions, tenant, job_id, 0)
        await asyncio.to_thread(_add_event, pg_database, tenant, job_id, "while nobody listened")
        await hub.start()
        try:
            await asyncio.wait_for(hub.listening.wait(), 10)
            hub.ready(f, backlog[-1]["id"])
            return await _next_ids(f.inbox)
        finally:
            await hub.stop()

    assert asyncio.run(main()) == [2]


def test_an_event_committed_while_the_hub_reconnects_reaches_a_follower(pg_database: str, job):
    """The follower came while the hub listened; the listening connection is killed; an event commits while it
    is down; the hub listens again before the follower has finished reading its backlog."""
    tenant, job_id = job

    async def main() -> list[int]:
        before = await asyncio.to_thread(_listener_pids, pg_database)
        hub = EventHub(pg_database, session_factory(pg_database))
        await hub.start()
        try:
            await asyncio.wait_for(hub.listening.wait(), 10)
            pid = (await asyncio.to_thread(_listener_pids, pg_database)) - before
            assert len(pid) == 1
            f = hub.follow(tenant, job_id)
            backlog = await asyncio.to_thread(read_events, hub.sessions, tenant, job_id, 0)
            dsn = make_url(pg_database).set(drivername="postgresql").render_as_string(hide_password=False)
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("SELECT pg_terminate_backend(%s)", (pid.pop(),))
            await _until(lambda: not hub.listening.is_set())
            await asyncio.to_thread(_add_event, pg_database, tenant, job_id, "while the hub reconnected")
            await _until(lambda: hub.listening.is_set() and hub.listens == 2)
            hub.ready(f, backlog[-1]["id"])
            first = await _next_ids(f.inbox)
            # and it goes on hearing what comes next
            await asyncio.to_thread(_add_event, pg_database, tenant, job_id, "after")
            return first + await _next_ids(f.inbox)
        finally:
            await hub.stop()

    assert asyncio.run(main()) == [2, 3]
