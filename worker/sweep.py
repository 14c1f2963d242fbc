"""Find jobs whose worker died (lease expired) or whose enqueue never happened, and hand them on."""
from __future__ import annotations

import logging

from celery import Celery

from core.db.engine import session_scope
from core.jobs import execution
from core.settings import Settings
from core.storage import make_storage
from worker.celery_app import enqueue

log = logging.getLogger("secateurs.worker.sweep")


def sweep(settings: Settings, app: Celery) -> dict[str, int]:
    url = settings.db_url
    counts = {"requeued": 0, "failed": 0, "cancelled": 0, "enqueued": 0}
    with session_scope(url) as s:
        stale = execution.stale_jobs(s)
    for tenant_id, job_id in stale:
        with session_scope(url) as s:
            outcome, attempt = execution.requeue_lost(s, tenant_id, job_id)
        if outcome == "none":
            continue
        try:  # whatever the lost attempt uploaded was never recorded: remove it
            make_storage(settings).delete_prefix(f"tenants/{tenant_id}/jobs/{job_id}/attempt-{attempt}/")
        except Exception:
            log.exception("cleanup after lost attempt %d of %s failed", attempt, job_id)
        counts[outcome] += 1
        log.warning("job %s: worker lost -> %s", job_id, outcome)
        if outcome == "requeued":
            enqueue(app, tenant_id, job_id)
            with session_scope(url) as s:
                execution.mark_enqueued(s, tenant_id, job_id)
    with session_scope(url) as s:
        pending = execution.never_enqueued(s, grace_seconds=30)
    for tenant_id, job_id in pending:
        enqueue(app, tenant_id, job_id)
        with session_scope(url) as s:
            execution.mark_enqueued(s, tenant_id, job_id)
        counts["enqueued"] += 1
    return counts
