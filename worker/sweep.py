"""Find jobs whose worker died (lease expired) or whose enqueue never happened, and hand them on."""

from __future__ import annotations

import logging

from celery import Celery

from core.db.engine import session_scope
from core.jobs import execution
from core.jobs.celery_queue import CeleryQueue
from core.jobs.queue import enqueue_after_commit
from core.settings import Settings
from core.storage import keys, make_storage

log = logging.getLogger("secateurs.worker.sweep")


def sweep(settings: Settings, app: Celery) -> dict[str, int]:
    url = settings.db_url
    queue = CeleryQueue(app)
    counts = {"requeued": 0, "failed": 0, "cancelled": 0, "enqueued": 0}
    with session_scope(url) as s:
        stale = execution.stale_jobs(s)
    for tenant_id, job_id in stale:
        with session_scope(url) as s:
            outcome, attempt = execution.requeue_lost(s, tenant_id, job_id)
            if outcome == "requeued":
                enqueue_after_commit(s, queue, tenant_id, job_id)
        if outcome == "none":
            continue
        try:  # whatever the lost attempt uploaded was never recorded: remove it
            make_storage(settings).delete_prefix(keys.attempt_prefix(tenant_id, job_id, attempt))
        except Exception:
            log.exception("cleanup after lost attempt %d of %s failed", attempt, job_id)
        counts[outcome] += 1
        log.warning("job %s: worker lost -> %s", job_id, outcome)
    with session_scope(url) as s:
        pending = execution.never_enqueued(s, grace_seconds=30)
    for tenant_id, job_id in pending:
        with session_scope(url) as s:
            enqueue_after_commit(s, queue, tenant_id, job_id)
        counts["enqueued"] += 1
    return counts
