"""The job state machine. ``transition()`` is the only way a job's status changes."""
from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from core.db.models import Job, utcnow


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


S = JobStatus
TERMINAL = frozenset({S.succeeded, S.failed, S.cancelled})
ACTIVE = frozenset({S.running, S.cancelling})

LEGAL: dict[JobStatus, frozenset[JobStatus]] = {
    # queued -> failed: a job that can no longer be run (e.g. delivered after max_attempts)
    S.queued: frozenset({S.running, S.cancelled, S.failed}),
    # running -> queued: the worker was lost and the job is handed to the next one
    S.running: frozenset({S.succeeded, S.failed, S.cancelling, S.queued}),
    # cancelling -> queued is not allowed: a lost cancelling job just ends cancelled
    S.cancelling: frozenset({S.cancelled, S.failed}),
    S.succeeded: frozenset(),
    S.failed: frozenset(),
    S.cancelled: frozenset(),
}


class IllegalTransition(Exception):
    def __init__(self, current: str, new: str) -> None:
        super().__init__(f"illegal job transition {current} -> {new}")
        self.current, self.new = current, new


def can_transition(current: str, new: str) -> bool:
    return JobStatus(new) in LEGAL[JobStatus(current)]


def transition(job: Job, new_status: str | JobStatus, now: datetime | None = None) -> Job:
    """Move ``job`` to ``new_status``, stamping ``<status>_at`` (and ``finished_at`` for terminal states).

    Raises IllegalTransition for a move the machine does not allow (including X -> X).
    """
    new = JobStatus(new_status)
    cur = JobStatus(job.status)
    if new not in LEGAL[cur]:
        raise IllegalTransition(cur, new)
    now = now or utcnow()
    job.status = new.value
    setattr(job, f"{new.value}_at", now)
    if new in TERMINAL:
        job.finished_at = now
        job.lease_expires_at = None
    if new is S.queued:
        job.worker_id = None
        job.lease_expires_at = None
    job.updated_at = now
    job.version = (job.version or 0) + 1
    return job
