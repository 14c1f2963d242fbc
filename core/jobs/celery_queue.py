"""The job queue on Celery, as a publisher: the broker settings shared by the API and the workers, and
``CeleryQueue``. It sends the prune task by name, so publishing imports nothing from ``worker/``; the
worker's own settings (acks, prefetch, time limits) are in ``worker.celery_app``."""

from __future__ import annotations

from celery import Celery

from core.settings import Settings

TASK_NAME = "secateurs.prune"


def celery_client(s: Settings) -> Celery:
    """A Celery app with the broker, queue and message settings every side must agree on."""
    s.ensure_dirs()
    app = Celery("secateurs", broker=s.broker, backend=s.backend)
    # The visibility timeout matters for brokers that redeliver unacked messages on a timer (Redis, SQS).
    # kombu's SQLAlchemy transport has none (and hands such options to create_engine), so skip it there.
    redelivers = s.broker.startswith(("redis", "rediss", "sqs"))
    transport = {"visibility_timeout": s.visibility} if redelivers else {}
    app.conf.update(
        broker_transport_options=transport,
        result_backend_transport_options=transport if s.backend.startswith(("redis", "rediss")) else {},
        task_default_queue=s.queue,
        task_routes={TASK_NAME: {"queue": s.queue}},
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        timezone="UTC",
    )
    app.conf.secateurs_settings = s
    return app


class CeleryQueue:
    """``core.jobs.queue.JobQueue`` on a Celery broker."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def publish(self, tenant_id: str, job_id: str) -> None:
        self.app.send_task(TASK_NAME, args=[tenant_id, job_id], queue=self.app.conf.task_default_queue)

    def check(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=3)
