"""Prometheus metrics: HTTP latencies (middleware) and job gauges read from the database at scrape time."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session, sessionmaker

from core.db.models import utcnow
from core.db.repositories import SystemRepository
from core.jobs.state import JobStatus

DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)


class JobCollector:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self):  # noqa: ANN201
        with self.sessions() as s:
            repo = SystemRepository(s)
            counts = repo.counts_by_status()
            durations = repo.recent_durations(utcnow() - timedelta(days=1))
        g = GaugeMetricFamily("secateurs_jobs", "Pruning jobs by status", labels=["status"])
        for st in JobStatus:
            g.add_metric([st.value], counts.get(st.value, 0))
        yield g
        yield GaugeMetricFamily("secateurs_queue_depth", "Jobs waiting for a worker", value=counts.get("queued", 0))
        h = HistogramMetricFamily(
            "secateurs_job_duration_seconds",
            "Run time (running -> finished) of jobs finished in the last 24h",
            labels=["status"],
        )
        by: dict[str, list[float]] = {}
        for status, d in durations:
            by.setdefault(status, []).append(d)
        for status, ds in by.items():
            buckets = [(str(b), sum(1 for d in ds if d <= b)) for b in DURATION_BUCKETS] + [("+Inf", len(ds))]
            h.add_metric([status], buckets, sum_value=sum(ds))
        yield h


def count_transactions(engine: Engine, registry: CollectorRegistry) -> None:
    """``secateurs_db_transactions_total``: database transactions this process began (what idle event streams
    must not add to)."""
    counter = Counter("secateurs_db_transactions", "Database transactions begun by this process", registry=registry)
    event.listen(engine, "begin", lambda _conn: counter.inc())


class MetricsMiddleware:
    """Pure ASGI middleware timing every HTTP request by route template."""

    def __init__(self, app: Any, registry: CollectorRegistry) -> None:
        self.app = app
        self.hist = Histogram(
            "secateurs_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def _send(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.hist.labels(scope["method"], path, str(status["code"])).observe(time.perf_counter() - start)
