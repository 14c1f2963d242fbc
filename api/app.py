"""The FastAPI application factory. ``uvicorn api.app:create_app --factory`` or ``secateurs service api``."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from api import problems
from api.metrics import JobCollector, MetricsMiddleware
from api.routes import calibration, health, jobs
from core.db.engine import session_factory
from core.jobs.calibration import MULTIPART_SLACK, too_large
from core.jobs.celery_queue import CeleryQueue, celery_client
from core.jobs.queue import JobQueue
from core.settings import Settings, get_settings
from core.storage import make_storage

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


def create_app(settings: Settings | None = None, queue: JobQueue | None = None) -> FastAPI:
    """``queue``: where new jobs are published; by default the Celery broker of ``settings``."""
    s = settings or get_settings()
    s.ensure_dirs()
    app = FastAPI(
        title="secateurs",
        version="1.0.0",
        description=DESCRIPTION,
        responses={500: {"description": "Internal error", "model": problems.Problem}},
    )
    app.state.settings = s
    app.state.sessions = session_factory(s.db_url)
    app.state.storage = make_storage(s)
    app.state.queue = queue or CeleryQueue(celery_client(s))
    registry = CollectorRegistry()
    registry.register(JobCollector(app.state.sessions))
    app.state.registry = registry
    problems.install(app)
    # any route that touches the database answers 503 while it is unreachable
    app.include_router(jobs.router, responses=problems.error_responses(503))
    app.include_router(calibration.router, responses=problems.error_responses(503))
    app.include_router(health.router)
    app.add_middleware(UploadLimit, path="/v1/calibration-sets", max_bytes=s.calibration_max_bytes)
    app.add_middleware(MetricsMiddleware, registry=registry)
    app.add_middleware(problems.UnhandledErrors)  # outermost of ours: errors of the others are answered too
    logging.getLogger("secateurs").setLevel(logging.INFO)
    return app
