"""All SQL lives here. Every tenant-owned query is filtered by ``tenant_id``.

``SystemRepository`` is the one deliberate exception: cross-tenant maintenance (the lost-job sweep,
Prometheus gauges) and API-key lookup during authentication, which happens before a tenant is known.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from core.db.models import (
    ApiKey,
    Artifact,
    CalibrationSet,
    IdempotencyRecord,
    Job,
    JobEvent,
    Tenant,
    WebhookDelivery,
    WebhookEndpoint,
)

EVENTS_CHANNEL = "job_events"  # Postgres NOTIFY channel of committed job events


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
        """Append an event; the caller holds the job row lock, so ``event_seq`` increments safely.

        On Postgres the same transaction sends ``NOTIFY job_events, '<tenant> <job> <seq>'``: followers
        hear of the event exactly when it commits, and never of one that rolled back."""
        job.event_seq = (job.event_seq or 0) + 1
        ev = JobEvent(tenant_id=self.tenant_id, job_id=job.id, seq=job.event_seq, type=type_, data=data)
        self.session.add(ev)
        # a job's first event commits with the job itself, before anyone can follow it: no NOTIFY (which
        # takes a database-wide lock at commit) on the create path
        if job.event_seq > 1 and self.session.get_bind().dialect.name == "postgresql":
            payload = f"{self.tenant_id} {job.id} {job.event_seq}"
            self.session.execute(select(func.pg_notify(EVENTS_CHANNEL, payload)))
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


class WebhookRepository(TenantScoped):
    """A tenant's webhook endpoints and their deliveries (the outbox rows)."""

    def add_endpoint(self, ep: WebhookEndpoint) -> WebhookEndpoint:
        if ep.tenant_id != self.tenant_id:
            raise ValueError("webhook endpoint belongs to another tenant")
        self.session.add(ep)
        self.session.flush()
        return ep

    def endpoint(self, endpoint_id: str, *, lock: bool = False) -> WebhookEndpoint | None:
        q = select(WebhookEndpoint).where(
            WebhookEndpoint.tenant_id == self.tenant_id, WebhookEndpoint.id == endpoint_id
        )
        if lock:
            q = q.with_for_update()
        return self.session.scalars(q).first()

    def endpoints(self, *, after: str | None, limit: int) -> tuple[builtins.list[WebhookEndpoint], bool]:
        q = select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == self.tenant_id)
        if after:
            q = q.where(WebhookEndpoint.id < after)
        rows = list(self.session.scalars(q.order_by(WebhookEndpoint.id.desc()).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def all_endpoints(self) -> builtins.list[WebhookEndpoint]:
        q = select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == self.tenant_id)
        return list(self.session.scalars(q.order_by(WebhookEndpoint.id)))

    def count_endpoints(self) -> int:
        q = select(func.count()).select_from(WebhookEndpoint).where(WebhookEndpoint.tenant_id == self.tenant_id)
        return int(self.session.scalar(q) or 0)

    def delete_endpoint(self, ep: WebhookEndpoint) -> None:
        """Delete an endpoint and its deliveries (pending ones are never sent)."""
        if ep.tenant_id != self.tenant_id:
            raise ValueError("webhook endpoint belongs to another tenant")
        for d in self.session.scalars(
            select(WebhookDelivery).where(
                WebhookDelivery.tenant_id == self.tenant_id, WebhookDelivery.endpoint_id == ep.id
            )
        ):
            self.session.delete(d)
        self.session.delete(ep)
        self.session.flush()

    def add_delivery(self, d: WebhookDelivery) -> WebhookDelivery:
        if d.tenant_id != self.tenant_id:
            raise ValueError("webhook delivery belongs to another tenant")
        self.session.add(d)
        return d

    def delivery(self, delivery_id: str, *, lock: bool = False, skip_locked: bool = False) -> WebhookDelivery | None:
        """``lock``: lock the row; ``skip_locked``: lock it, or return None at once when another transaction holds
        it (Postgres ``FOR UPDATE SKIP LOCKED``; SQLite serialises writers at BEGIN anyway)."""
        q = select(WebhookDelivery).where(
            WebhookDelivery.tenant_id == self.tenant_id, WebhookDelivery.id == delivery_id
        )
        if lock or skip_locked:
            q = q.with_for_update(skip_locked=skip_locked)
        return self.session.scalars(q.execution_options(populate_existing=True)).first()

    def deliveries(
        self, endpoint_id: str, *, after: str | None, limit: int
    ) -> tuple[builtins.list[WebhookDelivery], bool]:
        q = select(WebhookDelivery).where(
            WebhookDelivery.tenant_id == self.tenant_id, WebhookDelivery.endpoint_id == endpoint_id
        )
        if after:
            q = q.where(WebhookDelivery.id < after)
        rows = list(self.session.scalars(q.order_by(WebhookDelivery.id.desc()).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def last_delivery(self, endpoint_id: str, job_id: str, event_type: str) -> WebhookDelivery | None:
        """The newest delivery of ``event_type`` about ``job_id`` to ``endpoint_id``, locked."""
        q = (
            select(WebhookDelivery)
            .where(
                WebhookDelivery.tenant_id == self.tenant_id,
                WebhookDelivery.job_id == job_id,
                WebhookDelivery.endpoint_id == endpoint_id,
                WebhookDelivery.event_type == event_type,
            )
            .order_by(WebhookDelivery.id.desc())
            .limit(1)
            .with_for_update()
        )
        return self.session.scalars(q.execution_options(populate_existing=True)).first()

    def drop_unsent(self, job_id: str, event_type: str) -> int:
        """Delete the deliveries of ``event_type`` about ``job_id`` that were never attempted."""
        q = (
            select(WebhookDelivery)
            .where(
                WebhookDelivery.tenant_id == self.tenant_id,
                WebhookDelivery.job_id == job_id,
                WebhookDelivery.event_type == event_type,
                WebhookDelivery.status == "pending",
                WebhookDelivery.attempts == 0,
            )
            .with_for_update()
        )
        rows = list(self.session.scalars(q))
        for d in rows:
            self.session.delete(d)
        return len(rows)

    def release(self, delivery_id: str) -> None:
        """Drop the publish lease of a pending delivery whose publication failed: the next sweep publishes it."""
        d = self.delivery(delivery_id, lock=True)
        if d is not None and d.status == "pending":
            d.lease_until = None


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

    def unclaimed(self, published_before: datetime, limit: int = 100) -> list[tuple[str, str]]:
        """Queued jobs last published before ``published_before`` and not claimed since, oldest first."""
        q = (
            select(Job.tenant_id, Job.id)
            .where(Job.status == "queued", Job.enqueued_at.is_not(None), Job.enqueued_at < published_before)
            .order_by(Job.enqueued_at)
            .limit(limit)
        )
        return [(t, j) for t, j in self.session.execute(q)]

    def attempts_of(self, job_ids: list[str]) -> dict[str, tuple[str, int]]:
        """Status and current attempt of each of ``job_ids`` that exists."""
        found: dict[str, tuple[str, int]] = {}
        for i in range(0, len(job_ids), 500):
            q = select(Job.id, Job.status, Job.attempt).where(Job.id.in_(job_ids[i : i + 500]))
            found.update({j: (st, a) for j, st, a in self.session.execute(q)})
        return found

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

    def claim_due_deliveries(self, now: datetime, lease_until: datetime, limit: int = 100) -> list[tuple[str, str]]:
        """Webhook deliveries to publish now, leased to the caller until ``lease_until`` (row locks with SKIP
        LOCKED: two sweeps never take the same row): pending ones that are due and not leased, and ones whose
        attempt died in flight (``sending`` past its lease), which become pending again."""
        due = or_(
            and_(
                WebhookDelivery.status == "pending",
                WebhookDelivery.next_attempt_at <= now,
                or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now),
            ),
            and_(WebhookDelivery.status == "sending", WebhookDelivery.lease_until < now),
        )
        q = (
            select(WebhookDelivery)
            .where(due)
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        out = []
        for d in self.session.scalars(q.execution_options(populate_existing=True)):
            d.status, d.lease_until = "pending", lease_until
            out.append((d.tenant_id, d.id))
        return out
