"""Server-Sent Event streams of job events: the per-tenant cap, their metrics, ending them on shutdown, and
the stream itself (pushed by ``api.event_hub`` on Postgres, polled on the embedded SQLite database)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.event_hub import CLOSED, TICK, Delivery, EventHub, read_events, sse_text
from core.db.outage import DATABASE_UNAVAILABLE
from core.db.repositories import JobRepository
from core.errors import NotFound
from core.jobs.state import TERMINAL

KEEPALIVE_S = 15.0
DB_PATIENCE_S = 30.0  # a stream waits this long for an unreachable database, then ends (the client reconnects)


class TooManyStreams(Exception):
    pass


class StreamMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.open = Gauge("secateurs_sse_streams_open", "Open event streams in this process", registry=registry)
        self.notifications = Counter(
            "secateurs_sse_notifications", "Job event notifications received from Postgres", registry=registry
        )
        self.notify_to_send = Histogram(
            "secateurs_sse_notify_to_send_seconds",
            "From hearing of an event to writing it to a stream",
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )


class Streams:
    """This process's open streams: at most ``per_tenant`` per tenant, and all of them ended on shutdown."""

    def __init__(self, per_tenant: int, metrics: StreamMetrics) -> None:
        self.per_tenant = per_tenant
        self.metrics = metrics
        self.by_tenant: dict[str, int] = {}
        self.inboxes: set[asyncio.Queue[Delivery]] = set()
        self.closing = False

    def open(self, tenant_id: str) -> None:
        if self.by_tenant.get(tenant_id, 0) >= self.per_tenant:
            raise TooManyStreams(f"at most {self.per_tenant} open event streams per tenant")
        self.by_tenant[tenant_id] = self.by_tenant.get(tenant_id, 0) + 1
        self.metrics.open.inc()

    def close(self, tenant_id: str) -> None:
        n = self.by_tenant.get(tenant_id, 0) - 1
        if n > 0:
            self.by_tenant[tenant_id] = n
        else:
            self.by_tenant.pop(tenant_id, None)
        self.metrics.open.dec()

    async def tick_forever(self) -> None:
        """Wake every stream every KEEPALIVE_S to send a keep-alive comment (one timer for all of them)."""
        while True:
            await asyncio.sleep(KEEPALIVE_S)
            for inbox in list(self.inboxes):
                inbox.put_nowait(TICK)

    def end_all(self) -> None:
        """Every stream ends after what it is sending (the server is shutting down); clients reconnect."""
        self.closing = True
        for inbox in list(self.inboxes):
            inbox.put_nowait(CLOSED)

    def end_all_on_exit_signals(self) -> None:
        """uvicorn waits for open responses before it shuts down, and an event stream never finishes by
        itself: chain a handler to uvicorn's own (it stays in charge) that ends our streams first."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue

            def handler(signum: int, frame: Any, previous: Callable[..., Any] = previous) -> None:
                loop.call_soon_threadsafe(self.end_all)
                previous(signum, frame)

            signal.signal(sig, handler)


class EventStreamResponse(StreamingResponse):
    """A streaming response that gives its stream slot back however it ends (finished, client gone,
    cancelled, or never started)."""

    def __init__(self, content: AsyncIterator[str], on_end: Callable[[], None]) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_end()


def _ends_stream(e: dict[str, Any]) -> bool:
    return e["type"] == "status" and e["data"].get("status") in TERMINAL


class _DatabaseGone(Exception):
    pass


async def _read(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in the thread pool, retried while the database is unreachable (a restart takes seconds)."""
    deadline = time.monotonic() + DB_PATIENCE_S
    delay = 0.25
    while True:
        try:
            return await run_in_threadpool(fn, *args)
        except DATABASE_UNAVAILABLE:
            if time.monotonic() + delay > deadline:
                raise _DatabaseGone() from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def _job_terminal(sessions: sessionmaker[Session], tenant_id: str, job_id: str) -> bool:
    with sessions() as s:
        job = JobRepository(s, tenant_id).get(job_id)
        if job is None:
            raise NotFound(f"no pruning job {job_id!r}")
        return job.status in TERMINAL


async def job_events(
    streams: Streams,
    hub: EventHub | None,
    sessions: sessionmaker[Session],
    tenant_id: str,
    job_id: str,
    after: int,
    poll_seconds: float,
) -> AsyncIterator[str]:
    """The job's events after ``after`` as SSE, ending after its terminal status event. With a hub, events
    are pushed; without one (SQLite), the events table is polled every ``poll_seconds``."""
    inbox: asyncio.Queue[Delivery] = asyncio.Queue()
    follower = hub.follow(tenant_id, job_id) if hub is not None else None
    if follower is not None:
        inbox = follower.inbox
    streams.inboxes.add(inbox)
    try:
        yield "retry: 2000\n\n"
        since = after
        # what happened before (or while) we connected, then whatever the hub hands on
        terminal = await _read(_job_terminal, sessions, tenant_id, job_id)
        for e in await _read(read_events, sessions, tenant_id, job_id, since):
            yield sse_text(e)
            since = e["id"]
            if _ends_stream(e):
                return
        if terminal:
            return
        if follower is not None and hub is not None:
            hub.ready(follower, since)
        quiet_since = time.monotonic()
        while not streams.closing:
            if hub is not None:  # pushed: no timer per wake-up (Streams.tick_forever wakes idle streams)
                delivery: Delivery | None = await inbox.get()
            else:
                try:
                    delivery = await asyncio.wait_for(inbox.get(), poll_seconds)
                except TimeoutError:
                    delivery = None
            if delivery is CLOSED:
                return
            if delivery is TICK:
                yield ": keep-alive\n\n"
                continue
            pushed = delivery is not None and not (delivery.events and delivery.events[0]["id"] > since + 1)
            if pushed and delivery is not None:  # in order after what this stream sent: the rendered texts
                batch = list(zip(delivery.events, delivery.texts, strict=True))
            else:  # polling, or a gap in what was pushed: read from the database
                batch = [(e, sse_text(e)) for e in await _read(read_events, sessions, tenant_id, job_id, since)]
            sent = False
            for e, text in batch:
                if e["id"] <= since:
                    continue
                yield text
                since, sent = e["id"], True
                if delivery is not None:
                    streams.metrics.notify_to_send.observe(time.monotonic() - delivery.heard_at)
                if _ends_stream(e):
                    return
            if sent:
                quiet_since = time.monotonic()
            elif hub is None and time.monotonic() - quiet_since >= KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
    except _DatabaseGone:
        return  # a clean end: the client reconnects with Last-Event-ID once the database is back
    finally:
        streams.inboxes.discard(inbox)
        if follower is not None and hub is not None:
            hub.leave(follower)
