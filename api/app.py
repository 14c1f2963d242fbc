"""The FastAPI application factory. ``uvicorn api.app:create_app --factory`` or ``secateurs service api``."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from api import dashboard, openapi, problems
from api.event_hub import EventHub
from api.methods import AllowedMethods
from api.metrics import JobCollector, MetricsMiddleware, count_transactions
from api.routes import calibration, health, jobs, webhooks
from api.streams import StreamMetrics, Streams
from core.db.engine import get_engine, session_factory
from core.jobs.calibration import MULTIPART_SLACK, too_large
from core.jobs.celery_queue import CeleryQueue, celery_client
from core.jobs.queue import JobQueue
from core.settings import Settings, get_settings
from core.storage import make_storage
from core.webhooks import outbox
from core.webhooks.celery_queue import CeleryDeliveryQueue

DESCRIPTION = """Prune LLMs as asynchronous jobs.

Authenticate with `Authorization: Bearer <api key>`. Every error is an RFC 9457 problem document
(`application/problem+json`) with `type`, `title`, `status`, `detail`, and for invalid input `errors[]`
naming each offending field.
"""


class UploadLimit:
    """Refuse oversized uploads with 413 before the multipart parser spools them to disk (the upload itself
    holds the file to ``max_bytes``; this guard allows for the multipart envelope around it)."""

    def __init__(self, app, path: str, max_bytes: int) -> None:  # noqa: ANN001
        self.app, self.path, self.max_bytes = app, path, max_bytes
        self.limit = max_bytes + MULTIPART_SLACK

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != self.path:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        cl = headers.get(b"content-length", b"")
        if cl.isdigit() and int(cl) > self.limit:
            await self._reject(scope, receive, send)
            return
        seen = 0

        async def counting_receive():  # noqa: ANN202
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, counting_receive, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope, receive, send) -> None:  # noqa: ANN001
        err = too_large(self.max_bytes)
        resp = problems.problem(
            err.status, err.title, err.detail, type_=err.type_, instance=scope["path"], code="too_large"
        )
        await resp(scope, receive, send)


class _TooLarge(Exception):
    pass


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """This server's event streams and, on Postgres, the hub that pushes job events to them (one listening
    connection). They are lifespan state, so each server running the app (and its event loop) has its own.
    On shutdown the streams end first, then the hub stops listening."""
    s: Settings = app.state.settings
    metrics: StreamMetrics = app.state.stream_metrics
    streams = Streams(s.sse_max_streams_per_tenant, metrics)
    # the embedded SQLite database has no NOTIFY: there each stream polls
    hub = (
        EventHub(s.db_url, app.state.sessions, on_notification=metrics.notifications.inc)
        if s.db_url.startswith("postgresql")
        else None
    )
    if hub is not None:
        await hub.start()
    ticker = asyncio.create_task(streams.tick_forever(), name="secateurs-sse-keepalive")
    streams.end_all_on_exit_signals()
    # What is loaded by now (the pruning engine's imports: ~0.3 M objects) lives as long as the process: keep
    # it out of the collector's full passes, which otherwise pause the loop for 150-400 ms every few seconds
    # while many streams are open (bench/api_load.py).
    gc.collect()
    gc.freeze()
    try:
        yield {"streams": streams, "hub": hub}
    finally:
        streams.end_all()
        ticker.cancel()
        if hub is not None:
            await hub.stop()


def create_app(settings: Settings | None = None, queue: JobQueue | None = None) -> FastAPI:
    """``queue``: where new jobs are published; by default the Celery broker of ``settings``."""
    s = settings or get_settings()
    s.ensure_dirs()
    app = FastAPI(
        title="secateurs",
        version="1.0.0",
        description=DESCRIPTION,
        responses=problems.error_responses(500),
        lifespan=lifespan,
    )
    app.state.settings = s
    celery = celery_client(s)
    # what the API's transactions write to the webhook outbox is published after their commit, through here
    box = outbox.Outbox.of(s, CeleryDeliveryQueue(celery))
    app.state.sessions = session_factory(s.db_url, info=outbox.session_info(box))
    app.state.storage = make_storage(s)
    app.state.queue = queue or CeleryQueue(celery)
    registry = CollectorRegistry()
    registry.register(JobCollector(app.state.sessions))
    app.state.registry = registry
    app.state.stream_metrics = StreamMetrics(registry)
    count_transactions(get_engine(s.db_url), registry)
    problems.install(app)
    openapi.install(app)
    # any route that touches the database answers 503 while it is unreachable
    app.include_router(jobs.router, responses=problems.error_responses(503))
    app.include_router(calibration.router, responses=problems.error_responses(503))
    app.include_router(webhooks.router, responses=problems.error_responses(503))
    app.include_router(health.router)
    app.add_middleware(AllowedMethods, router=app.router)
    app.add_middleware(UploadLimit, path="/v1/calibration-sets", max_bytes=s.calibration_max_bytes)
    app.add_middleware(MetricsMiddleware, registry=registry)
    dashboard.install(app, s)  # /dashboard/: static files, with their security headers on every response there
    app.add_middleware(problems.UnhandledErrors)  # outermost of ours: errors of the others are answered too
    logging.getLogger("secateurs").setLevel(logging.INFO)
    return app
