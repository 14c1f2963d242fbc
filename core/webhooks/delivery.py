"""Sending deliveries: the deliver task's claim, send and record, the retry schedule, and the sweep's part.

An attempt claims its row atomically (``FOR UPDATE SKIP LOCKED`` on Postgres): only a ``pending`` delivery
that is due, or a ``sending`` one whose attempt outlived its lease (the worker died mid-send), is taken, and
taking it makes it ``sending`` with ``attempts + 1``. A duplicate or stale task finds nothing to take, and a
delivery that succeeded is never sent again. The attempt is recorded fenced by its number: an attempt that
was presumed dead and handed on cannot overwrite its successor. A failed attempt schedules the next one
(exponential backoff with jitter) as a row update; the sweep publishes it when it is due: no Celery ETA or
countdown is ever used.

Every attempt carries the delivery's id as ``webhook-id``, a fresh ``webhook-timestamp`` and one signature
per valid secret (the current one, and the previous one during its grace period after a rotation).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from core.db.engine import session_scope
from core.db.models import utcnow
from core.db.outage import retry_while_unavailable
from core.db.repositories import SystemRepository, WebhookRepository
from core.settings import Settings
from core.webhooks.outbox import DeliveryQueue
from core.webhooks.signing import SecretBox, signature_header
from core.webhooks.transport import RESPONSE_PREFIX_BYTES, Answer, post

log = logging.getLogger("secateurs.webhooks")
LEASE_MARGIN_S = 5.0  # an attempt is presumed dead this long after its total timeout
MAX_ERROR_CHARS = 1000
JITTER = 0.2  # each wait is drawn within +-20 % of the nominal one


def backoff_seconds(failed_attempts: int, s: Settings, rand: Callable[[], float] = random.random) -> float:
    """The wait after the ``failed_attempts``-th failed attempt: base * 2^(n-1), capped at the maximum, with
    jitter (so receivers that come back are not hit by every delivery at once)."""
    nominal = min(s.webhook_backoff_max_seconds, s.webhook_backoff_base_seconds * 2 ** max(0, failed_attempts - 1))
    return nominal * (1 - JITTER + 2 * JITTER * rand())


def attempt_lease_seconds(s: Settings) -> float:
    return s.webhook_timeout_seconds + LEASE_MARGIN_S


@dataclass
class Attempt:
    """One claimed attempt: what to send and where."""

    tenant_id: str
    delivery_id: str
    number: int
    url: str
    body: bytes
    secrets: list[str] = field(repr=False)
    at: datetime


def claim(session: Session, s: Settings, tenant_id: str, delivery_id: str) -> Attempt | None:
    """Take the delivery for one attempt, or None when there is nothing to send (missing, not due, in flight
    elsewhere, succeeded, given up, or locked by another claim right now)."""
    repo = WebhookRepository(session, tenant_id)
    d = repo.delivery(delivery_id, skip_locked=True)
    now = utcnow()
    if d is None:
        return None
    if d.status == "pending":
        if d.next_attempt_at is not None and d.next_attempt_at > now:
            return None
    elif d.status == "sending":
        if d.lease_until is not None and d.lease_until >= now:
            return None  # an attempt is in flight
    else:
        return None  # succeeded or failed: final
    ep = repo.endpoint(d.endpoint_id)
    if ep is None:
        return None
    if d.attempts >= s.webhook_max_attempts:  # the last attempt died in flight
        d.status, d.finished_at, d.lease_until, d.next_attempt_at = "failed", now, None, None
        d.last_error = (d.last_error or "") + f" (given up after {d.attempts} attempts)"
        return None
    d.status = "sending"
    d.attempts += 1
    d.last_attempt_at = now
    d.lease_until = now + timedelta(seconds=attempt_lease_seconds(s))
    attempt = Attempt(tenant_id, d.id, d.attempts, ep.url, d.payload.encode(), [], now)
    box = SecretBox(s.pepper)
    try:
        attempt.secrets.append(box.open(ep.secret_encrypted))
        if ep.previous_secret_encrypted and ep.previous_secret_expires_at and ep.previous_secret_expires_at > now:
            attempt.secrets.append(box.open(ep.previous_secret_encrypted))
    except ValueError as e:  # this process has another secret key: a failed attempt, never an unsigned one
        session.flush()  # record() reads the row afresh
        record(session, s, attempt, Answer(error=str(e)))
        return None
    return attempt


def headers(attempt: Attempt) -> dict[str, str]:
    stamp = int(attempt.at.timestamp())
    return {
        "webhook-id": attempt.delivery_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": signature_header(attempt.secrets, attempt.delivery_id, attempt.at, attempt.body),
    }


def send(s: Settings, attempt: Attempt) -> Answer:
    return post(
        attempt.url,
        attempt.body,
        headers(attempt),
        allow_private=s.webhook_allow_private_addresses,
        require_https=s.env == "production",
        connect_timeout=s.webhook_connect_timeout_seconds,
        total_timeout=s.webhook_timeout_seconds,
    )


def body_prefix(body: bytes) -> str:
    """At most ``RESPONSE_PREFIX_BYTES`` of UTF-8 (undecodable bytes replaced, the cut on a character)."""
    text = body[:RESPONSE_PREFIX_BYTES].decode("utf-8", errors="replace")
    return text.encode()[:RESPONSE_PREFIX_BYTES].decode("utf-8", errors="ignore")


def record(session: Session, s: Settings, attempt: Attempt, answer: Answer) -> str | None:
    """Write what the attempt got; the delivery's new status, or None when the attempt was no longer the
    delivery's (presumed dead and taken over by a later one)."""
    repo = WebhookRepository(session, attempt.tenant_id)
    d = repo.delivery(attempt.delivery_id, lock=True)
    if d is None or d.attempts != attempt.number or d.status not in ("sending", "pending"):
        return None
    now = utcnow()
    d.last_status_code = answer.status
    error = answer.error or (None if answer.ok else f"HTTP {answer.status}")
    d.last_error = error[:MAX_ERROR_CHARS] if error else None
    d.response_body = body_prefix(answer.body) if answer.status is not None else None
    d.lease_until = None
    if answer.ok:
        d.status, d.finished_at, d.next_attempt_at = "succeeded", now, None
    elif d.attempts >= s.webhook_max_attempts:
        d.status, d.finished_at, d.next_attempt_at = "failed", now, None
    else:
        d.status = "pending"
        d.next_attempt_at = now + timedelta(seconds=backoff_seconds(d.attempts, s))
    return d.status


def deliver(s: Settings, tenant_id: str, delivery_id: str) -> str:
    """The deliver task: claim, send, record. Returns the delivery's new status, or ``skipped``."""

    def take() -> Attempt | None:
        with session_scope(s.db_url) as session:
            return claim(session, s, tenant_id, delivery_id)

    attempt = retry_while_unavailable(take, seconds=s.database_retry_seconds, what=f"claim delivery {delivery_id}")
    if attempt is None:
        return "skipped"
    answer = send(s, attempt)

    def write() -> str | None:
        with session_scope(s.db_url) as session:
            return record(session, s, attempt, answer)

    status = retry_while_unavailable(write, seconds=s.database_retry_seconds, what=f"record delivery {delivery_id}")
    log.info(
        "delivery %s attempt %d: %s -> %s",
        delivery_id,
        attempt.number,
        answer.status if answer.status is not None else answer.error,
        status or "superseded",
    )
    return status or "superseded"


def publish_due(s: Settings, queue: DeliveryQueue, limit: int = 100) -> int:
    """The sweep's part: publish the deliveries that are due (first attempts whose publication was lost,
    retries whose wait is over, attempts that died in flight), each leased for
    ``webhook_redeliver_after_seconds`` so that no other sweep publishes it meanwhile. One whose message still
    waits in the broker (the webhook workers are behind or down) is only leased again. Returns how many were
    published."""
    try:  # first: while the broker is down nothing can be published, and nothing is leased
        waiting = queue.waiting()
    except Exception as e:
        log.warning("sweep cannot read the webhook queue (%s: %s)", e.__class__.__name__, e)
        return 0
    now = utcnow()
    lease = now + timedelta(seconds=s.webhook_redeliver_after_seconds)
    with session_scope(s.db_url) as session:
        due = SystemRepository(session).claim_due_deliveries(now, lease, limit)
    published = 0
    for tenant_id, delivery_id in due:  # the leases are committed: publish
        if waiting is not None and delivery_id in waiting:
            continue
        try:
            queue.publish(tenant_id, delivery_id)
        except Exception as e:
            log.warning("publishing delivery %s failed (%s: %s)", delivery_id, e.__class__.__name__, e)
            with session_scope(s.db_url) as session:
                WebhookRepository(session, tenant_id).release(delivery_id)
            continue
        published += 1
    return published
