"""The job state machine. ``transition()`` is the only way a job's status changes.

A transition stamps the job and then runs the after-transition policies in the caller's transaction, so
what follows from a status change (its ``status`` event; for a terminal status, a webhook delivery per
subscribed endpoint, the outbox rows of ``core.webhooks.outbox``) is written atomically with it, and no call
site writes it by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session

from core.db.models import Job, utcnow
from core.db.repositories import JobRepository
from core.webhooks.outbox import record_webhook_deliveries


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


S = JobStatus
INITIAL = S.queued
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
    def __init__(self, current: str | None, new: str) -> None:
        super().__init__(f"illegal job transition {current or '(new)'} -> {new}")
        self.current, self.new = current, new


@dataclass(frozen=True)
class StatusChange:
    """One applied transition, as the after-transition policies see it. ``old`` is None for a new job."""

    job: Job
    old: JobStatus | None
    new: JobStatus
    at: datetime
    details: dict[str, Any] = field(default_factory=dict)


AfterTransition = Callable[[Session, StatusChange], None]


def status_event_data(change: StatusChange) -> dict[str, Any]:
    """The ``status`` event of a change: the new status, what the job now says about it, and the caller's details."""
    job = change.job
    data: dict[str, Any] = {"status": change.new.value}
    if change.new is S.running:
        data.update(attempt=job.attempt, worker=job.worker_id)
    elif change.new is S.failed:
        data["error"] = {"code": job.error_code, "message": job.error_message}
    return {**data, **change.details}


def record_status_event(session: Session, change: StatusChange) -> None:
    JobRepository(session, change.job.tenant_id).add_event(change.job, "status", status_event_data(change))


# Run in order after every transition, in the same transaction.
AFTER_TRANSITION: list[AfterTransition] = [record_status_event, record_webhook_deliveries]


def can_transition(current: str | None, new: str) -> bool:
    if current is None:
        return JobStatus(new) is INITIAL
    return JobStatus(new) in LEGAL[JobStatus(current)]


def transition(
    session: Session, job: Job, new_status: str | JobStatus, *, now: datetime | None = None, **details: Any
) -> StatusChange:
    """Move ``job`` to ``new_status``, stamping ``<status>_at`` (and ``finished_at`` for terminal states), then
    run the after-transition policies. A job without a status (a new one) may only enter ``INITIAL``.

    Set the fields the new status reports (attempt, worker, error) before calling: the policies read them.
    ``details`` go into the status event (e.g. ``reason``). Raises IllegalTransition for a move the machine
    does not allow (including X -> X).
    """
    new = JobStatus(new_status)
    cur = JobStatus(job.status) if job.status is not None else None
    if not can_transition(cur, new):
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
        job.enqueued_at = None  # a (re)queued job has not been published yet
    job.updated_at = now
    job.version = (job.version or 0) + 1
    change = StatusChange(job, cur, new, now, details)
    for policy in AFTER_TRANSITION:
        policy(session, change)
    return change
