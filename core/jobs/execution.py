"""Worker-facing job logic: atomic claim, heartbeats, progress, finishing, and the lost-job sweep.

Every function takes a session and leaves the commit to the caller (the task boundary). Writes from a
worker are fenced by ``attempt``: a worker that lost its job (lease expired, job handed on) cannot touch it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy.orm import Session

from core.db.models import Artifact, Job, utcnow
from core.db.repositories import JobRepository, SystemRepository
from core.jobs.state import ACTIVE, TERMINAL, JobStatus, transition
from core.webhooks.outbox import record_progress

WORKER_LOST = "worker_lost"


@dataclass
class Claim:
    outcome: Literal["claimed", "skipped", "exhausted"]
    job: Job | None = None
    attempt: int = 0
    reason: str = ""


def _expired(job: Job, now: datetime) -> bool:
    return job.lease_expires_at is None or job.lease_expires_at < now


def _fail_lost(session: Session, job: Job, now: datetime) -> None:
    job.error_code = WORKER_LOST
    job.error_message = f"the worker running this job was lost {job.attempt} time(s) (max_attempts={job.max_attempts})"
    transition(session, job, JobStatus.failed, now=now)


def claim(session: Session, tenant_id: str, job_id: str, worker_id: str, lease_seconds: float) -> Claim:
    """queued -> running with attempt += 1, atomically (row lock). Anything else is a no-op.

    A running job whose lease expired (its worker died) is taken over; after ``max_attempts`` deliveries
    it fails with ``worker_lost`` instead.
    """
    job = JobRepository(session, tenant_id).get(job_id, lock=True)
    now = utcnow()
    if job is None:
        return Claim("skipped", reason="no such job")
    if JobStatus(job.status) in ACTIVE and _expired(job, now):
        lost = _requeue(session, job, now)
        if lost == "failed":
            return Claim("exhausted", job, job.attempt, "worker lost too often")
        if lost == "cancelled":
            return Claim("skipped", job, job.attempt, "cancelled")
    status = JobStatus(job.status)
    if status is not JobStatus.queued:
        return Claim("skipped", job, job.attempt, f"job is {status.value}")
    if job.attempt >= job.max_attempts:
        _fail_lost(session, job, now)
        return Claim("exhausted", job, job.attempt, "max attempts reached")
    job.attempt += 1
    job.worker_id = worker_id
    job.lease_expires_at = now + timedelta(seconds=lease_seconds)
    job.progress = None
    job.error_code = job.error_message = None
    transition(session, job, JobStatus.running, now=now)
    return Claim("claimed", job, job.attempt)


def _owned(repo: JobRepository, job_id: str, attempt: int) -> Job | None:
    job = repo.get(job_id, lock=True)
    if job is None or job.attempt != attempt or JobStatus(job.status) not in ACTIVE:
        return None
    return job


def heartbeat(session: Session, tenant_id: str, job_id: str, attempt: int, lease_seconds: float) -> str:
    """Extend the lease. Returns 'ok', 'cancel' (cancel requested) or 'lost' (no longer ours)."""
    repo = JobRepository(session, tenant_id)
    job = _owned(repo, job_id, attempt)
    if job is None:
        return "lost"
    job.lease_expires_at = utcnow() + timedelta(seconds=lease_seconds)
    return "cancel" if job.cancel_requested else "ok"


def report(
    session: Session,
    tenant_id: str,
    job_id: str,
    attempt: int,
    lease_seconds: float,
    *,
    progress: dict[str, Any] | None = None,
    event: tuple[str, dict[str, Any]] | None = None,
) -> str:
    """Record progress and/or an event; also a heartbeat. Same return values as ``heartbeat``."""
    repo = JobRepository(session, tenant_id)
    job = _owned(repo, job_id, attempt)
    if job is None:
        return "lost"
    now = utcnow()
    job.lease_expires_at = now + timedelta(seconds=lease_seconds)
    if progress is not None:
        job.progress = progress
        job.updated_at = now
        job.version += 1
        record_progress(session, job, now)  # job.progress webhooks, for the endpoints that asked for them
    if event is not None:
        repo.add_event(job, *event)
    return "cancel" if job.cancel_requested else "ok"


def finish(
    session: Session,
    tenant_id: str,
    job_id: str,
    attempt: int,
    *,
    outcome: Literal["succeeded", "failed", "cancelled"],
    artifacts: list[Artifact] | None = None,
    metrics: dict[str, Any] | None = None,
    error: tuple[str, str] | None = None,
) -> str | None:
    """End the attempt. A success for a job whose cancel was requested ends ``cancelled`` and publishes
    nothing. Returns the final status, or None when the job is no longer this attempt's."""
    repo = JobRepository(session, tenant_id)
    job = _owned(repo, job_id, attempt)
    if job is None:
        return None
    now = utcnow()
    if outcome == "succeeded" and job.cancel_requested:
        outcome = "cancelled"
    if outcome == "cancelled" and job.status == JobStatus.running.value:
        transition(session, job, JobStatus.cancelling, now=now)
    if outcome == "succeeded":
        repo.add_artifacts(artifacts or [])
        job.metrics = metrics
        if job.progress:
            job.progress = {**job.progress, "fraction": 1.0, "eta_seconds": 0}
        if metrics is not None:
            repo.add_event(job, "metrics", metrics)
        transition(session, job, JobStatus.succeeded, now=now, artifacts=len(artifacts or []))
    elif outcome == "cancelled":
        transition(session, job, JobStatus.cancelled, now=now)
    else:
        code, message = error or ("internal_error", "unknown error")
        job.error_code, job.error_message = code, message[:4000]
        transition(session, job, JobStatus.failed, now=now)
    return job.status


def ended_by(session: Session, tenant_id: str, job_id: str, attempt: int) -> str | None:
    """The job's final status when ``attempt`` is the attempt that ended it, else None."""
    job = JobRepository(session, tenant_id).get(job_id)
    if job is None or job.attempt != attempt or JobStatus(job.status) not in TERMINAL:
        return None
    return job.status


def stale_jobs(session: Session, now: datetime | None = None) -> list[tuple[str, str]]:
    return SystemRepository(session).stale_running(now or utcnow())


def requeue_lost(
    session: Session, tenant_id: str, job_id: str
) -> tuple[Literal["requeued", "failed", "cancelled", "none"], int]:
    """The sweep's action on one job whose lease expired: hand it on, or fail it after max_attempts.
    Returns the outcome and the lost attempt's number."""
    job = JobRepository(session, tenant_id).get(job_id, lock=True)
    now = utcnow()
    if job is None or JobStatus(job.status) not in ACTIVE or not _expired(job, now):
        return "none", 0
    return _requeue(session, job, now), job.attempt


def _requeue(session: Session, job: Job, now: datetime) -> Literal["requeued", "failed", "cancelled"]:
    """A running or cancelling job whose worker was lost: cancelled if it was cancelling, failed after
    ``max_attempts``, else queued again for the next worker."""
    if job.status == JobStatus.cancelling.value:
        transition(session, job, JobStatus.cancelled, now=now, reason="worker lost while cancelling")
        return "cancelled"
    if job.attempt >= job.max_attempts:
        _fail_lost(session, job, now)
        return "failed"
    transition(session, job, JobStatus.queued, now=now, reason=f"worker lost during attempt {job.attempt}")
    return "requeued"


def never_enqueued(session: Session, grace_seconds: float = 30.0) -> list[tuple[str, str]]:
    return SystemRepository(session).never_enqueued(utcnow() - timedelta(seconds=grace_seconds))
