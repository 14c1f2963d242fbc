"""Celery worker: the app (``worker.celery_app``) and the prune task (``worker.tasks``)."""
