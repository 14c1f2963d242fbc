"""The FastAPI application factory. ``uvicorn api.app:create_app --factory`` or ``secateurs service api``."""
from __future__ import annotations

import logging

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from api import problems
from api.metrics import JobCollector, MetricsMiddleware
from api.routes import calibration, health, jobs
from core.db.engine import session_factory
from core.settings import Settings, get_settings
from core.storage import make_storage
from worker.celery_app import make_celery

DESCRIPTION = """Prune LLMs as asynchronous jobs.

Authenticate with `Authorization: Bearer <api key>`. Every error is an RFC 9457 problem document
(`application/problem+json`) with `type`, `title`, `status`, `detail`, and for invalid input `errors[]`
naming each offending field.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    s = settings or get_settings()
    s.ensure_dirs()
    app = FastAPI(title="secateurs", version="1.0.0", description=DESCRIPTION,
                  responses={500: {"description": "Internal error", "model": problems.Problem}})
    app.state.settings = s
    app.state.sessions = session_factory(s.db_url)
    app.state.storage = make_storage(s)
    app.state.celery = make_celery(s)
    registry = CollectorRegistry()
    registry.register(JobCollector(app.state.sessions))
    app.state.registry = registry
    problems.install(app)
    app.include_router(jobs.router)
    app.include_router(calibration.router)
    app.include_router(health.router)
    app.add_middleware(MetricsMiddleware, registry=registry)
    logging.getLogger("secateurs").setLevel(logging.INFO)
    return app
