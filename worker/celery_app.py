"""The Celery app, configured for long GPU jobs delivered at least once (NOTES §5).

- late ack + reject on worker lost: a task whose process dies is redelivered, never silently dropped;
- prefetch 1, concurrency 1, a fresh child per task: one job per GPU process, CUDA state never reused;
- visibility timeout above the hard time limit (broker and result transports): no redelivery of a job
  that is still legitimately running;
- no ETA/countdown tasks (they sit unacked in the worker and break the visibility timeout).
The database is the source of truth; the task begins with an atomic claim (``core.jobs.execution``).
"""
from __future__ import annotations

from celery import Celery

from core.settings import Settings, get_settings

TASK_NAME = "secateurs.prune"


def make_celery(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    s.ensure_dirs()
    app = Celery("secateurs", broker=s.broker, backend=s.backend)
    # The visibility timeout matters for brokers that redeliver unacked messages on a timer (Redis, SQS).
    # kombu's SQLAlchemy transport has none (and hands such options to create_engine), so skip it there.
    redelivers = s.broker.startswith(("redis", "rediss", "sqs"))
    transport = {"visibility_timeout": s.visibility} if redelivers else {}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=1,
        task_time_limit=s.task_time_limit,
        task_soft_time_limit=max(1, s.task_time_limit - 60) if s.task_time_limit > 120 else s.task_time_limit,
        broker_transport_options=transport,
        result_backend_transport_options=transport if s.backend.startswith(("redis", "rediss")) else {},
        task_default_queue=s.queue,
        task_routes={TASK_NAME: {"queue": s.queue}},
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # keep running through a broker blip: a redelivered copy is dropped by the database claim
        worker_cancel_long_running_tasks_on_connection_loss=False,
        timezone="UTC",
    )
    app.conf.secateurs_settings = s
    return app


def enqueue(app: Celery, tenant_id: str, job_id: str) -> None:
    """Publish one prune message (call only after the job row is committed)."""
    app.send_task(TASK_NAME, args=[tenant_id, job_id], queue=app.conf.task_default_queue)
