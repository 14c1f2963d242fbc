"""All SQL lives here. Every tenant-owned query is filtered by ``tenant_id``.

``SystemRepository`` is the one deliberate exception: cross-tenant maintenance (the lost-job sweep,
Prometheus gauges) and API-key lookup during authentication, which happens before a tenant is known.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.db.models import ApiKey, Artifact, CalibrationSet, IdempotencyRecord, Job, JobEvent, Tenant


class TenantScoped:
    def __init__(self, session: Session, tenant_id: str) -> None:
        if not tenant_id:
            raise ValueError("tenant_id is required")
        self.session = session
        self.tenant_id = tenant_id


class JobRepository(TenantScoped):
    def add(self, job: Job) -> Job:
        if job.tenant_id != self.tenant_id:
            raise ValueError("job belongs to another tenant")
        self.session.add(job)
        self.session.flush()
        return job

    def get(self, job_id: str, *, lock: bool = False) -> Job | None:
        q = select(Job).where(Job.tenant_id == self.tenant_id, Job.id == job_id)
        if lock:
            q = q.with_for_update()
        return self.session.scalars(q).first()

    def list(self, *, statuses: Sequence[str] | None, after: str | None, limit: int) -> tuple[builtins.list[Job], bool]:
        q = select(Job).where(Job.tenant_id == self.tenant_id)
        if statuses:
            q = q.where(Job.status.in_(list(statuses)))
        if after:
            q = q.where(Job.id < after)
        rows = list(self.session.scalars(q.order_by(Job.id.desc()).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    # events -----------------------------------------------------------------------------------
    def add_event(self, job: Job, type_: str, data: dict) -> JobEvent:
        """Append an event; the caller holds the job row lock, so ``event_seq`` increments safely."""
        job.event_seq = (job.event_seq or 0) + 1
        ev = JobEvent(tenant_id=self.tenant_id, job_id=job.id, seq=job.event_seq, type=type_, data=data)
        self.session.add(ev)
        return ev

    def events(self, job_id: str, *, after: int, limit: int) -> tuple[builtins.list[JobEvent], bool]:
        q = (
            select(JobEvent)
            .where(JobEvent.tenant_id == self.tenant_id, JobEvent.job_id == job_id, JobEvent.seq > after)
            .order_by(JobEvent.seq)
            .limit(limit + 1)
        )
        rows = list(self.session.scalars(q))
        return rows[:limit], len(rows) > limit

    # artifacts --------------------------------------------------------------------------------
    def add_artifacts(self, arts: Sequence[Artifact]) -> None:
        for a in arts:
            if a.tenant_id != self.tenant_id:
                raise ValueError("artifact belongs to another tenant")
            self.session.add(a)

    def artifacts(self, job_id: str) -> builtins.list[Artifact]:
        q = select(Artifact).where(Artifact.tenant_id == self.tenant_id, Artifact.job_id == job_id)
        return list(self.session.scalars(q.order_by(Artifact.name)))

    def artifact(self, job_id: str, name: str) -> Artifact | None:
        q = select(Artifact).where(
            Artifact.tenant_id == self.tenant_id, Artifact.job_id == job_id, Artifact.name == name
        )
        return self.session.scalars(q).first()


class CalibrationSetRepository(TenantScoped):
    def add(self, cs: CalibrationSet) -> CalibrationSet:
        if cs.tenant_id != self.tenant_id:
            raise ValueError("calibration set belongs to another tenant")
        self.session.add(cs)
        self.session.flush()
        return cs

    def get(self, set_id: str) -> CalibrationSet | None:
        q = select(CalibrationSet).where(CalibrationSet.tenant_id == self.tenant_id, CalibrationSet.id == set_id)
        return self.session.scalars(q).first()

    def list(self, *, after: str | None, limit: int) -> tuple[builtins.list[CalibrationSet], bool]:
        q = select(CalibrationSet).where(CalibrationSet.tenant_id == self.tenant_id)
        if after:
            q = q.where(CalibrationSet.id < after)
        rows = list(self.session.scalars(q.order_by(CalibrationSet.id.desc()).limit(limit + 1)))
        return rows[:limit], len(rows) > limit


class IdempotencyRepository(TenantScoped):
    def get(self, key: str, *, lock: bool = False) -> IdempotencyRecord | None:
        q = select(IdempotencyRecord).where(IdempotencyRecord.tenant_id == self.tenant_id, IdempotencyRecord.key == key)
        if lock:
            q = q.with_for_update()
        return self.session.scalars(q.execution_options(populate_existing=True)).first()

    def add(self, rec: IdempotencyRecord) -> None:
        if rec.tenant_id != self.tenant_id:
            raise ValueError("record belongs to another tenant")
        self.session.add(rec)
        self.session.flush()


class TenantRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, tenant: Tenant) -> Tenant:
        self.session.add(tenant)
        self.session.flush()
        return tenant

    def get(self, tenant_id: str) -> Tenant | None:
        return self.session.get(Tenant, tenant_id)

    def by_name(self, name: str) -> Tenant | None:
        return self.session.scalars(select(Tenant).where(Tenant.name == name)).first()

    def add_key(self, key: ApiKey) -> ApiKey:
        self.session.add(key)
        self.session.flush()
        return key

    def key(self, key_id: str) -> ApiKey | None:
        """Authentication lookup by the key's public id (the tenant is what we are finding out)."""
        return self.session.get(ApiKey, key_id)


class SystemRepository:
    """Cross-tenant reads for maintenance and monitoring only."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def stale_running(self, now: datetime, limit: int = 100) -> list[tuple[str, str]]:
        q = (
            select(Job.tenant_id, Job.id)
            .where(Job.status.in_(["running", "cancelling"]), Job.lease_expires_at < now)
            .limit(limit)
        )
        return [(t, j) for t, j in self.session.execute(q)]

    def never_enqueued(self, before: datetime, limit: int = 100) -> list[tuple[str, str]]:
        q = (
            select(Job.tenant_id, Job.id)
            .where(Job.status == "queued", Job.enqueued_at.is_(None), Job.created_at < before)
            .limit(limit)
        )
        return [(t, j) for t, j in self.session.execute(q)]

    def counts_by_status(self) -> dict[str, int]:
        q = select(Job.status, func.count()).group_by(Job.status)
        return {s: int(n) for s, n in self.session.execute(q)}

    def recent_durations(self, since: datetime, limit: int = 10_000) -> list[tuple[str, float]]:
        q = (
            select(Job.status, Job.running_at, Job.finished_at)
            .where(Job.finished_at.is_not(None), Job.running_at.is_not(None), Job.finished_at >= since)
            .order_by(Job.finished_at.desc())
            .limit(limit)
        )
        return [(s, (f - r).total_seconds()) for s, r, f in self.session.execute(q) if f is not None and r is not None]
