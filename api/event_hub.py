"""Push, not poll: one Postgres ``LISTEN`` connection per API process fans committed job events out to the
process's SSE streams.

Writing an event sends ``NOTIFY job_events, '<tenant> <job> <seq>'`` in the same transaction
(``JobRepository.add_event``), so a notification arrives exactly when its event is visible. For each job
that has followers here, the hub reads the new events once (not once per follower) and hands the same batch
to every follower of that job; an idle follower costs no database work. Notifications missed while the
listening connection was down (a Postgres restart) are repaired by one catch-up read of every followed job
when it is back. Followers keep their own cursor, so a batch they already have is skipped and a gap is read
from the database: order and exactly-once hold per stream whatever the hub does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.schemas import event_out
from core.db.repositories import EVENTS_CHANNEL, JobRepository

log = logging.getLogger("secateurs.api.events")
KEEPALIVE_S = 15.0  # an idle listening connection is checked this often (a dead one raises)
READ_LIMIT = 500


def sse_text(e: dict[str, Any]) -> str:
    """One event as a Server-Sent Event (its ``id:`` is the event's sequence number)."""
    return f"id: {e['id']}\nevent: {e['type']}\ndata: {json.dumps(e, separators=(',', ':'))}\n\n"


@dataclass
class Delivery:
    """A batch of a job's events (as JSON-ready dicts, in order), each already rendered as SSE text (once for
    all the job's followers), and when the hub heard of them."""

    events: list[dict[str, Any]]
    heard_at: float  # time.monotonic()
    texts: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, events: list[dict[str, Any]], heard_at: float) -> Delivery:
        return cls(events, heard_at, [sse_text(e) for e in events])


CLOSED = Delivery([], 0.0)  # put in an inbox: the stream must end (server shutting down)
TICK = Delivery([], 0.0)  # put in every inbox every KEEPALIVE_S: the stream sends a keep-alive comment


@dataclass(eq=False)
class Follower:
    tenant_id: str
    job_id: str
    listen: int  # the hub's LISTEN session when the follower came (0: none yet)
    inbox: asyncio.Queue[Delivery] = field(default_factory=asyncio.Queue)


@dataclass(eq=False)
class _Job:
    tenant_id: str
    followers: set[Follower] = field(default_factory=set)
    seq: int | None = None  # the last event handed to the followers; None until one is ready
    heard_at: float = 0.0
    reading: bool = False
    again: bool = False  # heard of more while reading


def read_events(sessions: sessionmaker[Session], tenant_id: str, job_id: str, after: int) -> list[dict[str, Any]]:
    """Every event of the job after ``after``, in order."""
    out: list[dict[str, Any]] = []
    with sessions() as s:
        repo = JobRepository(s, tenant_id)
        while True:
            evs, more = repo.events(job_id, after=after, limit=READ_LIMIT)
            out += [event_out(e).model_dump(mode="json") for e in evs]
            if not more:
                return out
            after = evs[-1].seq


class EventHub:
    def __init__(
        self, db_url: str, sessions: sessionmaker[Session], on_notification: Callable[[], None] = lambda: None
    ) -> None:
        self.conninfo = make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.sessions = sessions
        self.on_notification = on_notification
        self.jobs: dict[str, _Job] = {}
        self.listening = asyncio.Event()
        self.listens = 0  # LISTEN sessions so far: a follower from an earlier one may have missed notifications
        self._task: asyncio.Task[None] | None = None
        self._reads: set[asyncio.Task[None]] = set()

    # lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="secateurs-event-hub")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._reads) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # followers ---------------------------------------------------------------------------------
    def follow(self, tenant_id: str, job_id: str) -> Follower:
        """Register a follower. Call ``ready`` once it has read the backlog; events after that reach its inbox."""
        f = Follower(tenant_id, job_id, self.listens if self.listening.is_set() else 0)
        self.jobs.setdefault(job_id, _Job(tenant_id)).followers.add(f)
        return f

    def ready(self, f: Follower, seq: int) -> None:
        """``f`` has every event up to ``seq``: the hub hands it what comes after."""
        job = self.jobs[f.job_id]
        if job.seq is None:  # the job's first follower: start from where it stands
            job.seq = seq
        # Heard of an event before anyone was ready, or the hub was not listening all the time since the
        # follower read its backlog (an event committed in between was announced to nobody, and the
        # catch-up after (re)connecting skipped this job, which had no ready follower yet): read once more.
        if job.again or f.listen == 0 or f.listen != self.listens:
            self._read(f.job_id, job)

    def leave(self, f: Follower) -> None:
        job = self.jobs.get(f.job_id)
        if job is None:
            return
        job.followers.discard(f)
        if not job.followers:
            del self.jobs[f.job_id]

    # notifications -----------------------------------------------------------------------------
    def heard(self, payload: str) -> None:
        self.on_notification()
        try:
            _tenant, job_id, seq = payload.split(" ")
            n = int(seq)
        except ValueError:
            log.warning("unreadable notification %.100r", payload)
            return
        job = self.jobs.get(job_id)
        if job is None or (job.seq is not None and n <= job.seq):
            return
        job.heard_at = job.heard_at or time.monotonic()
        if job.seq is None:
            job.again = True
            return
        self._read(job_id, job)

    def _read(self, job_id: str, job: _Job) -> None:
        """Read the job's new events (one read at a time per job; what is heard meanwhile is read after)."""
        job.again = True
        if job.reading:
            return
        job.reading = True
        task = asyncio.create_task(self._read_while_heard(job_id, job))
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    async def _read_while_heard(self, job_id: str, job: _Job) -> None:
        try:
            while job.again and job.seq is not None and self.jobs.get(job_id) is job:
                job.again = False
                heard_at, job.heard_at = job.heard_at or time.monotonic(), 0.0
                try:
                    events = await run_in_threadpool(read_events, self.sessions, job.tenant_id, job_id, job.seq)
                except Exception as e:  # noqa: BLE001
                    log.warning("reading the events of %s failed (%s: %s)", job_id, e.__class__.__name__, e)
                    if not self.listening.is_set():
                        return  # the database is gone: the catch-up after reconnecting reads it
                    await asyncio.sleep(1.0)
                    job.again = True
                    continue
                if events:
                    job.seq = events[-1]["id"]
                    delivery = Delivery.of(events, heard_at)
                    for f in job.followers:
                        f.inbox.put_nowait(delivery)
        finally:
            job.reading = False

    def _catch_up(self) -> None:
        """After (re)connecting: whatever was committed while nobody listened is read once per followed job."""
        for job_id, job in list(self.jobs.items()):
            if job.seq is not None:
                self._read(job_id, job)

    async def _listen_forever(self) -> None:
        delay = 0.25
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, connect_timeout=5
                ) as conn:
                    await conn.execute(f"LISTEN {EVENTS_CHANNEL}")
                    self.listens += 1
                    self.listening.set()
                    delay = 0.25
                    log.info("listening for job events")
                    self._catch_up()
                    while True:
                        async for n in conn.notifies(timeout=KEEPALIVE_S):
                            self.heard(n.payload)
                        await conn.execute("SELECT 1")  # raises when the connection died quietly
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001  (Postgres restarting, network): listen again
                self.listening.clear()
                log.warning("event listener lost (%s: %s); reconnecting in %.2g s", e.__class__.__name__, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
