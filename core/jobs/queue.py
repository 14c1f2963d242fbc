"""Where queued jobs are published for the workers. The Celery implementation is ``core.jobs.celery_queue``.

A job is published only after the transaction that queued it has committed (a worker must find the row),
and ``enqueued_at`` is set once the broker took the message. A publish that fails, or never happens because
the process died, leaves ``enqueued_at`` empty and the worker's sweep publishes the job again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.orm import Session

from core.db.engine import after_commit
from core.db.models import utcnow
from core.db.repositories import JobRepository
from core.jobs.state import JobStatus

log = logging.getLogger("secateurs.jobs")


class JobQueue(Protocol):
    def publish(self, tenant_id: str, job_id: str) -> None:
        """Hand one job to the workers; raise when the broker did not take it."""

    def check(self) -> None:
        """Raise when the broker cannot be reached."""

    def waiting(self) -> set[str] | None:
        """Ids of the jobs whose messages wait for a worker in the broker; None when the broker cannot say."""


def mark_enqueued(session: Session, tenant_id: str, job_id: str) -> None:
    job = JobRepository(session, tenant_id).get(job_id, lock=True)
    if job is not None and job.status == JobStatus.queued.value:
        job.enqueued_at = utcnow()


@dataclass
class Publication:
    """What became of one job's publication: None until the commit, then whether the broker took it."""

    published: bool | None = None


def enqueue_after_commit(session: Session, queue: JobQueue, tenant_id: str, job_id: str) -> Publication:
    """Publish the job once ``session``'s unit of work commits, then note that it was published. A broker
    that cannot take it (down, or slower than the enqueue timeout) leaves the job for the sweep."""
    outcome = Publication()

    def publish(s: Session) -> None:
        try:
            queue.publish(tenant_id, job_id)
        except Exception as e:
            outcome.published = False
            log.warning("publishing %s failed (%s: %s); the sweep will publish it", job_id, e.__class__.__name__, e)
            return
        outcome.published = True
        mark_enqueued(s, tenant_id, job_id)

    after_commit(session, publish)
    return outcome
