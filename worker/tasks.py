"""The prune task. It holds no logic of its own: see ``worker.runner.run_job``."""

from __future__ import annotations

import os
import socket

from celery import shared_task
from celery.exceptions import Reject

from core.jobs.celery_queue import TASK_NAME
from core.settings import get_settings


@shared_task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def prune_job(self, tenant_id: str, job_id: str) -> str:  # noqa: ANN001
    from worker.runner import ClaimUnavailable, run_job

    settings = getattr(self.app.conf, "secateurs_settings", None) or get_settings()
    worker_id = f"{self.request.hostname or socket.gethostname()}:{os.getpid()}"
    try:
        return run_job(settings, tenant_id, job_id, worker_id)
    except ClaimUnavailable as e:
        # not acknowledged: the message goes back to the queue for the next delivery
        raise Reject(str(e), requeue=True) from e
