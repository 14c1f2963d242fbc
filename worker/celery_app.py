"""The Celery app, configured for long GPU jobs delivered at least once.

- late ack + reject on worker lost: a task whose process dies is redelivered, never silently dropped;
- prefetch 1, concurrency 1, a fresh child per task: one job per GPU process, CUDA state never reused;
- visibility timeout above the hard time limit (broker and result transports, ``core.jobs.celery_queue``):
  no redelivery of a job that is still legitimately running;
- no ETA/countdown tasks (they sit unacked in the worker and break the visibility timeout).
The database is the source of truth; the task begins with an atomic claim (``core.jobs.execution``).
"""

from __future__ import annotations

from celery import Celery

from core.jobs.celery_queue import TASK_NAME, celery_client
from core.settings import Settings, get_settings

__all__ = ["TASK_NAME", "make_celery"]


def make_celery(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    app = celery_client(s)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=1,
        task_time_limit=s.task_time_limit,
        task_soft_time_limit=max(1, s.task_time_limit - 60) if s.task_time_limit > 120 else s.task_time_limit,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # keep running through a broker blip: a redelivered copy is dropped by the database claim
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app
