"""The webhook worker: ``secateurs service webhooks``, or ``celery -A worker.webhooks worker --pool=threads
-Q <queue>-webhooks``. It consumes only the webhook queue, with a few threads (each delivery mostly waits on
the network), so deliveries never wait behind prune jobs that hold their worker for hours.

The task holds no logic of its own (``core.webhooks.delivery.deliver``). Its message is acknowledged when the
task starts: the delivery's row, not the message, says what must be sent, and a delivery whose worker died is
published again by the sweep once its lease is over.
"""

from __future__ import annotations

from celery import Celery, shared_task

from core.jobs.celery_queue import WEBHOOK_TASK_NAME, celery_client
from core.settings import Settings, get_settings
from core.webhooks import delivery


def make_webhook_celery(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    app = celery_client(s)
    app.conf.update(
        task_default_queue=s.webhooks_queue,
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


@shared_task(name=WEBHOOK_TASK_NAME, bind=True, acks_late=False, ignore_result=True)
def deliver_webhook(self, tenant_id: str, delivery_id: str) -> str:  # noqa: ANN001
    settings = getattr(self.app.conf, "secateurs_settings", None) or get_settings()
    return delivery.deliver(settings, tenant_id, delivery_id)


app = make_webhook_celery()
