"""The workers' sweep: the database decides what must run, whatever happened to the broker's messages.

Each pass
- hands on jobs whose worker died (lease expired): queued again, or failed after ``max_attempts``;
- publishes queued jobs that were never published (the API died, or the broker was down: ``deferred``);
- publishes again queued jobs not claimed ``redeliver_after_seconds`` after they were published when their
  message no longer waits in the broker (lost in a Redis restart, acknowledged by a failing task, held in
  ``unacked`` by a killed worker until the visibility timeout). A duplicate delivery is harmless: the claim
  is atomic, and the extra copy finds nothing to do;
- publishes webhook deliveries that are due: first attempts whose publication was lost, retries whose
  backoff is over, attempts whose worker died mid-send (``core.webhooks.delivery.publish_due``; each is
  leased while published, so two sweeps never publish it twice);
- removes this machine's scratch directories of attempts that are no longer running;
- removes resume checkpoints (``resume/<tenant>/<job>/`` in artifact storage) of jobs that have ended, or no
  longer exist, without removing them (their worker died between the job's end and its cleanup).
"""

from __future__ import annotations

import logging
import shutil
import time
from datetime import timedelta

from celery import Celery

from core.db.engine import session_scope
from core.db.models import utcnow
from core.db.outage import DATABASE_UNAVAILABLE
from core.db.repositories import SystemRepository
from core.jobs import execution
from core.jobs.celery_queue import CeleryQueue
from core.jobs.queue import JobQueue, enqueue_after_commit
from core.jobs.state import ACTIVE, TERMINAL, JobStatus
from core.settings import Settings
from core.storage import keys, make_storage
from core.webhooks import delivery
from core.webhooks.celery_queue import CeleryDeliveryQueue
from core.webhooks.outbox import DeliveryQueue

log = logging.getLogger("secateurs.worker.sweep")


class Sweeper:
    """One worker's sweep. It remembers database outages: while the database was unreachable no worker could
    renew its lease either, so leases are not judged until a full lease period after it came back."""

    def __init__(self, settings: Settings, queue: JobQueue, webhooks: DeliveryQueue | None = None) -> None:
        self.s = settings
        self.queue = queue
        self.webhooks = webhooks
        self._judge_leases_after = 0.0  # monotonic time
        self._in_outage = False

    def tick(self) -> dict[str, int]:
        """One pass; a database outage is noted and reported as an empty pass."""
        try:
            counts = self.sweep()
        except DATABASE_UNAVAILABLE as e:
            if not self._in_outage:
                log.warning("sweep paused: database unavailable (%s)", e.__class__.__name__)
            self._in_outage = True
            self._judge_leases_after = float("inf")  # until a pass reaches the database again
            return {}
        if self._in_outage:
            self._in_outage = False
            self._judge_leases_after = time.monotonic() + self.s.lease_seconds
            log.info("database back; leases are judged again in %.0f s", self.s.lease_seconds)
        return counts

    def sweep(self) -> dict[str, int]:
        counts = {
            "requeued": 0,
            "failed": 0,
            "cancelled": 0,
            "enqueued": 0,
            "republished": 0,
            "webhooks_published": 0,
            "scratch_removed": 0,
            "resume_removed": 0,
        }
        if time.monotonic() >= self._judge_leases_after:
            self._hand_on_lost(counts)
        self._publish_unpublished(counts)
        self._republish_unclaimed(counts)
        if self.webhooks is not None:
            counts["webhooks_published"] = delivery.publish_due(self.s, self.webhooks)
        counts["scratch_removed"] = self._remove_dead_scratch()
        counts["resume_removed"] = self._remove_dead_resume()
        return counts

    def _hand_on_lost(self, counts: dict[str, int]) -> None:
        url = self.s.db_url
        with session_scope(url) as s:
            stale = execution.stale_jobs(s)
        for tenant_id, job_id in stale:
            with session_scope(url) as s:
                outcome, attempt = execution.requeue_lost(s, tenant_id, job_id)
                if outcome == "requeued":
                    enqueue_after_commit(s, self.queue, tenant_id, job_id)
            if outcome == "none":
                continue
            try:  # whatever the lost attempt uploaded was never recorded: remove it
                make_storage(self.s).delete_prefix(keys.attempt_prefix(tenant_id, job_id, attempt))
            except Exception:
                log.exception("cleanup after lost attempt %d of %s failed", attempt, job_id)
            counts[outcome] += 1
            log.warning("job %s: worker lost -> %s", job_id, outcome)

    def _publish_unpublished(self, counts: dict[str, int]) -> None:
        # the API publishes right after its commit; give it a moment before doing it in its place
        grace = min(30.0, self.s.redeliver_after_seconds)
        with session_scope(self.s.db_url) as s:
            pending = execution.never_enqueued(s, grace_seconds=grace)
        for tenant_id, job_id in pending:
            with session_scope(self.s.db_url) as s:
                enqueue_after_commit(s, self.queue, tenant_id, job_id)
            counts["enqueued"] += 1

    def _republish_unclaimed(self, counts: dict[str, int]) -> None:
        before = utcnow() - timedelta(seconds=self.s.redeliver_after_seconds)
        with session_scope(self.s.db_url) as s:
            unclaimed = SystemRepository(s).unclaimed(before)
        if not unclaimed:
            return
        try:
            waiting = self.queue.waiting()
        except Exception as e:  # the broker is down: nothing can be published now anyway
            log.warning("sweep cannot read the queue (%s: %s)", e.__class__.__name__, e)
            return
        for tenant_id, job_id in unclaimed:
            if waiting is not None and job_id in waiting:
                continue  # still in line behind other jobs
            with session_scope(self.s.db_url) as s:
                enqueue_after_commit(s, self.queue, tenant_id, job_id)  # enqueued_at = now: once per period
            counts["republished"] += 1
            log.warning("job %s: not claimed and its message is gone; published again", job_id)

    def _remove_dead_resume(self) -> int:
        """Checkpoints of jobs that ended (or are gone); those of queued and running jobs stay."""
        storage = make_storage(self.s)
        try:
            found = storage.list(keys.RESUME_ROOT)
        except Exception as e:
            log.warning("sweep cannot list resume checkpoints (%s: %s)", e.__class__.__name__, e)
            return 0
        jobs = {tuple(k.split("/")[1:3]) for k in found if k.count("/") >= 3}
        if not jobs:
            return 0
        with session_scope(self.s.db_url) as s:
            current = SystemRepository(s).attempts_of(sorted({j for _, j in jobs}))
        removed = 0
        for tenant_id, job_id in sorted(jobs):
            status, _ = current.get(job_id, (None, None))
            if status is None or JobStatus(status) in TERMINAL:
                storage.delete_prefix(keys.resume_prefix(tenant_id, job_id))
                removed += 1
                log.info("job %s: resume checkpoint of an ended job removed", job_id)
        return removed

    def _remove_dead_scratch(self) -> int:
        """Scratch is ``<work>/<job id>/attempt-<n>``; only the job's current attempt, while it runs, may
        keep one. (Listed before the database is read: a directory is made only after its attempt's claim
        committed, so a live attempt is always seen as the job's current one.)"""
        root = self.s.work_path
        if not root.is_dir():
            return 0
        dirs = {d: [a for a in d.iterdir() if a.is_dir() and a.name.startswith("attempt-")] for d in root.iterdir()}
        if not dirs:
            return 0
        with session_scope(self.s.db_url) as s:
            current = SystemRepository(s).attempts_of([d.name for d in dirs])
        removed = 0
        for job_dir, attempts in dirs.items():
            status, attempt = current.get(job_dir.name, (None, None))
            for a in attempts:
                live = status is not None and JobStatus(status) in ACTIVE and a.name == f"attempt-{attempt}"
                if not live:
                    shutil.rmtree(a, ignore_errors=True)
                    removed += 1
            if not any(job_dir.iterdir()):
                job_dir.rmdir()
        return removed


def sweep(settings: Settings, app: Celery) -> dict[str, int]:
    """One pass of a fresh sweeper (no outage memory)."""
    return Sweeper(settings, CeleryQueue(app), CeleryDeliveryQueue(app)).sweep()
