"""The webhook outbox: a job's terminal transition writes one delivery row per subscribed endpoint in its own
transaction (an after-transition policy of ``core.jobs.state``), so a crash can neither lose a delivery of a
transition that committed nor invent one for a transition that rolled back. Once the transaction commits, each
delivery is published to the webhook queue; a publication that fails or never happens (the process died) is
made by the workers' sweep.

Progress reports (``job.progress``, opt-in per endpoint) are coalesced: at most one delivery per job and
endpoint per ``progress_interval_seconds``; a report while one waits unsent replaces its body (so it carries the
newest state), and the job's terminal transition drops those never sent.

How a process publishes (its ``Outbox``: the delivery queue, the base of the URLs in payloads) is set once per
process with ``configure()``, or per session factory through ``session_info()`` (the API's); without one, the
rows are still written and the sweep publishes them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.orm import Session

from core.db.engine import after_commit
from core.db.ids import new_id
from core.db.models import WebhookDelivery, WebhookEndpoint
from core.db.repositories import WebhookRepository
from core.jobs.views import job_out

if TYPE_CHECKING:
    from core.db.models import Job
    from core.jobs.state import StatusChange
    from core.settings import Settings

log = logging.getLogger("secateurs.webhooks")

JOB_EVENTS = ("job.succeeded", "job.failed", "job.cancelled")
PROGRESS_EVENT = "job.progress"
TEST_EVENT = "webhook.test"
_OUTBOX = "secateurs.webhooks.outbox"


class DeliveryQueue(Protocol):
    """Where deliveries are published for the webhook workers (Celery: ``core.webhooks.celery_queue``)."""

    def publish(self, tenant_id: str, delivery_id: str) -> None:
        """Hand one delivery to the webhook workers; raise when the broker did not take it."""

    def waiting(self) -> set[str] | None:
        """Ids of the deliveries whose messages wait in the broker; None when the broker cannot say."""


@dataclass(frozen=True)
class Outbox:
    """How this process publishes new deliveries. ``queue`` None: only the sweep publishes them."""

    queue: DeliveryQueue | None = None
    public_base_url: str = ""
    # how long a published delivery is left to its message before the sweep may publish it again
    redeliver_after_seconds: float = 60.0
    progress_interval_seconds: float = 10.0

    @classmethod
    def of(cls, settings: Settings, queue: DeliveryQueue | None) -> Outbox:
        return cls(
            queue,
            (settings.public_base_url or "").rstrip("/"),
            settings.webhook_redeliver_after_seconds,
            settings.webhook_progress_interval_seconds,
        )


_process_outbox = Outbox()


def configure(outbox: Outbox) -> None:
    """This process's outbox (worker processes; the API sets its own per session factory)."""
    global _process_outbox
    _process_outbox = outbox


def session_info(outbox: Outbox) -> dict[str, Any]:
    """``info`` for a session factory whose sessions publish through ``outbox``."""
    return {_OUTBOX: outbox}


def outbox_of(session: Session) -> Outbox:
    return session.info.get(_OUTBOX) or _process_outbox


def payload(event_type: str, at: datetime, data: dict[str, Any]) -> str:
    """The body of a delivery: ``{type, timestamp, data}``, the same bytes on every attempt."""
    stamp = at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return json.dumps({"type": event_type, "timestamp": stamp, "data": data}, separators=(",", ":"), default=str)


def add_delivery(
    session: Session,
    endpoint: WebhookEndpoint,
    event_type: str,
    body: str,
    *,
    now: datetime,
    job_id: str | None,
    due: datetime | None = None,
) -> WebhookDelivery:
    """Write one delivery, due now (published once the caller's transaction commits) or at ``due`` (published
    by the sweep then)."""
    box = outbox_of(session)
    due = due if due is not None and due > now else None
    publish = box.queue is not None and due is None
    lease = now + timedelta(seconds=box.redeliver_after_seconds) if publish else None
    d = WebhookDelivery(
        id=new_id("msg"),
        tenant_id=endpoint.tenant_id,
        endpoint_id=endpoint.id,
        event_type=event_type,
        job_id=job_id,
        payload=body,
        status="pending",
        attempts=0,
        next_attempt_at=due or now,
        lease_until=lease,
        created_at=now,
    )
    WebhookRepository(session, endpoint.tenant_id).add_delivery(d)
    if publish and box.queue is not None:
        after_commit(session, _publisher(box.queue, d.tenant_id, d.id))
    return d


def _publisher(queue: DeliveryQueue, tenant_id: str, delivery_id: str):  # noqa: ANN202
    def publish(s: Session) -> None:
        try:
            queue.publish(tenant_id, delivery_id)
        except Exception as e:
            log.warning("publishing delivery %s failed (%s: %s); the sweep will", delivery_id, type(e).__name__, e)
            WebhookRepository(s, tenant_id).release(delivery_id)

    return publish


def record_webhook_deliveries(session: Session, change: StatusChange) -> None:
    """After-transition policy: a terminal status writes a ``job.<status>`` delivery for every endpoint of the
    job's tenant subscribed to it, carrying the job as the API shows it."""
    event_type = f"job.{change.new.value}"
    if event_type not in JOB_EVENTS:
        return
    job = change.job
    repo = WebhookRepository(session, job.tenant_id)
    repo.drop_unsent(job.id, PROGRESS_EVENT)  # the terminal event says more than any progress still waiting
    endpoints = [e for e in repo.all_endpoints() if event_type in e.event_types]
    if not endpoints:
        return
    data = job_out(job, outbox_of(session).public_base_url).model_dump(mode="json")
    body = payload(event_type, change.at, data)
    for ep in endpoints:
        add_delivery(session, ep, event_type, body, now=change.at, job_id=job.id)


def record_progress(session: Session, job: Job, now: datetime) -> None:
    """A progress report of a running job: for each endpoint subscribed to ``job.progress``, the newest state
    replaces the body of a delivery that waits unsent, or else becomes a new delivery, due no sooner than
    ``progress_interval_seconds`` after the one before."""
    repo = WebhookRepository(session, job.tenant_id)
    endpoints = [e for e in repo.all_endpoints() if PROGRESS_EVENT in e.event_types]
    if not endpoints:
        return
    box = outbox_of(session)
    body = payload(PROGRESS_EVENT, now, job_out(job, box.public_base_url).model_dump(mode="json"))
    for ep in endpoints:
        last = repo.last_delivery(ep.id, job.id, PROGRESS_EVENT)
        if last is not None and last.status == "pending" and last.attempts == 0:
            last.payload = body  # coalesced: sent once, with the newest progress, under the waiting webhook-id
            continue
        due = None if last is None else last.created_at + timedelta(seconds=box.progress_interval_seconds)
        add_delivery(session, ep, PROGRESS_EVENT, body, now=now, job_id=job.id, due=due)
