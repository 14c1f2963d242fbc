"""The job queue on Celery, as a publisher: the broker settings shared by the API and the workers, and
``CeleryQueue``. It sends the prune task by name, so publishing imports nothing from ``worker/``; the
worker's own settings (acks, prefetch, time limits) are in ``worker.celery_app``. Webhook deliveries go by the
same broker to a queue of their own (``core.webhooks.celery_queue``)."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from celery import Celery

from core.settings import Settings

log = logging.getLogger("secateurs.jobs")

TASK_NAME = "secateurs.prune"
WEBHOOK_TASK_NAME = "secateurs.webhooks.deliver"


def celery_client(s: Settings) -> Celery:
    """A Celery app with the broker, queue and message settings every side must agree on."""
    s.ensure_dirs()
    app = Celery("secateurs", broker=s.broker, backend=s.backend)
    # The visibility timeout matters for brokers that redeliver unacked messages on a timer (Redis, SQS).
    # kombu's SQLAlchemy transport has none (and hands such options to create_engine), so skip it there.
    redelivers = s.broker.startswith(("redis", "rediss", "sqs"))
    transport: dict[str, Any] = {"visibility_timeout": s.visibility} if redelivers else {}
    if s.broker.startswith(("redis", "rediss")):
        # connecting to a broker that is down must fail within the enqueue timeout, not the OS's minutes
        transport["socket_connect_timeout"] = s.enqueue_timeout_seconds / 2
    app.conf.update(
        broker_transport_options=transport,
        result_backend_transport_options=transport if s.backend.startswith(("redis", "rediss")) else {},
        task_default_queue=s.queue,
        task_routes={TASK_NAME: {"queue": s.queue}, WEBHOOK_TASK_NAME: {"queue": s.webhooks_queue}},
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        timezone="UTC",
    )
    app.conf.secateurs_settings = s
    return app


def bounded_connection(app: Celery, for_write: bool = True) -> Any:
    """A connection of its own whose every socket operation is bounded by the enqueue timeout (a broker that is
    down, or frozen and never answering, must not hold a request). The workers' consuming connections keep the
    transport's defaults: a socket timeout would cut their blocking reads."""
    s = app.conf.secateurs_settings
    bounded = {"socket_timeout": s.enqueue_timeout_seconds / 2} if s.broker.startswith(("redis", "rediss")) else {}
    make = app.connection_for_write if for_write else app.connection_for_read
    return make(transport_options=bounded)


class CeleryQueue:
    """``core.jobs.queue.JobQueue`` on a Celery broker."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def publish(self, tenant_id: str, job_id: str) -> None:
        # One quick retry (a connection the broker closed is re-opened once); each connect and each socket
        # operation is bounded, so a broker that is down costs the caller about the enqueue timeout.
        # ignore_result: no result-backend subscription, which would retry for many seconds when Redis is down.
        with bounded_connection(self.app) as conn:
            self.app.send_task(
                TASK_NAME,
                args=[tenant_id, job_id],
                queue=self.app.conf.task_default_queue,
                connection=conn,
                ignore_result=True,
                retry=True,
                retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0, "interval_max": 0},
            )

    def waiting(self) -> set[str] | None:
        """Ids of the jobs whose messages wait in the queue, not yet delivered to a worker; None when this
        broker cannot say. A message a worker received but has not acknowledged is not waiting."""
        return waiting_ids(self.app, self.app.conf.task_default_queue, TASK_NAME)

    def check(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=3)


def waiting_ids(app: Celery, queue: str, task: str) -> set[str] | None:
    """The second argument (the job's or the delivery's id) of each ``task`` message waiting in ``queue``, not
    yet delivered to a worker; None when this broker cannot say. A message a worker received but has not
    acknowledged is not waiting."""
    with bounded_connection(app, for_write=False) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=3)
        chan: Any = conn.default_channel
        if hasattr(chan, "priority_steps") and hasattr(chan, "client"):  # redis
            keys = {chan._q_for_pri(queue, p) for p in chan.priority_steps}
            payloads = [m for k in keys for m in chan.client.lrange(k, 0, -1)]
        elif hasattr(chan, "message_cls") and hasattr(chan, "_query_all"):  # sqlalchemy
            msgs = chan._query_all(queue).filter(chan.message_cls.visible.is_(True))
            payloads = [m.payload for m in msgs]
        else:
            return None
    return {i for p in payloads if (i := _id_of(p, task)) is not None}


def _id_of(payload: str | bytes, task: str) -> str | None:
    """The id a broker message of ``task`` carries as its second argument (protocol 2: body = [args, kwargs,
    embed])."""
    try:
        msg = json.loads(payload)
        if msg.get("headers", {}).get("task") != task:
            return None
        body = msg["body"]
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[1])
    except (ValueError, KeyError, IndexError, TypeError):
        log.warning("unreadable message in the queue: %.200r", payload)
        return None
