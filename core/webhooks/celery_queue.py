"""Where webhook deliveries are published: the ``secateurs.webhooks.deliver`` task, sent by name (publishing
imports nothing from ``worker/``) to the webhook queue (``webhook_queue``, default ``<queue>-webhooks``), which
only webhook workers (``secateurs service webhooks``) consume: a prune worker busy for hours never holds a
delivery back. A message is only a wake-up call; the delivery's row says what must be sent."""

from __future__ import annotations

from celery import Celery

from core.jobs.celery_queue import WEBHOOK_TASK_NAME, bounded_connection, waiting_ids


class CeleryDeliveryQueue:
    """``core.webhooks.outbox.DeliveryQueue`` on a Celery broker."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.queue: str = app.conf.secateurs_settings.webhooks_queue

    def publish(self, tenant_id: str, delivery_id: str) -> None:
        # bounded like a job's publication (core.jobs.celery_queue): a frozen broker never holds the caller
        with bounded_connection(self.app) as conn:
            self.app.send_task(
                WEBHOOK_TASK_NAME,
                args=[tenant_id, delivery_id],
                queue=self.queue,
                connection=conn,
                ignore_result=True,
                retry=True,
                retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0, "interval_max": 0},
            )

    def waiting(self) -> set[str] | None:
        return waiting_ids(self.app, self.queue, WEBHOOK_TASK_NAME)
