"""Worker entry point: ``celery -A worker.main worker`` (or ``secateurs service worker``).

Besides the prune task, the worker's main process runs the sweep (``worker.sweep``) in a thread: it hands on
jobs whose worker died, publishes jobs whose message never reached or left the broker, publishes webhook
deliveries that are due, and removes the scratch of dead attempts. A job's terminal transition (in the task's
child process) publishes its webhook deliveries right after its commit, through this process's outbox.
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_init, worker_ready, worker_shutting_down

from core.jobs.celery_queue import CeleryQueue
from core.settings import get_settings
from core.webhooks import outbox
from core.webhooks.celery_queue import CeleryDeliveryQueue
from worker import tasks  # noqa: F401  (registers the task)
from worker.celery_app import make_celery
from worker.sweep import Sweeper

log = logging.getLogger("secateurs.worker")

app = make_celery(get_settings())
outbox.configure(outbox.Outbox.of(app.conf.secateurs_settings, CeleryDeliveryQueue(app)))
_stop = threading.Event()


def _sweeper() -> None:
    s = app.conf.secateurs_settings
    sweeper = Sweeper(s, CeleryQueue(app), CeleryDeliveryQueue(app))
    while not _stop.is_set():
        try:
            sweeper.tick()
        except Exception:  # keep sweeping; the broker or storage may be briefly unavailable
            log.exception("sweep failed")
        _stop.wait(s.reaper_interval_seconds)


@worker_init.connect
def _preload(**_: object) -> None:
    """Import torch/transformers once in the parent so each fresh child starts fast. CUDA stays untouched
    here (it is initialised only inside the task, in the child)."""
    try:
        import transformers

        import core.pruning.run  # noqa: F401

        # the lazy modules of the most common architectures, so a job's model load does not pay for them
        _auto = transformers.AutoModelForCausalLM  # resolves transformers' lazy auto classes
        for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma", "opt", "gpt2"):
            try:
                __import__(f"transformers.models.{arch}.modeling_{arch}")
            except Exception:  # noqa: BLE001  (an architecture missing from this transformers)
                pass
    except Exception:  # the task reports import problems as job failures
        log.exception("preloading the pruning engine failed")


@worker_ready.connect
def _start_sweeper(**_: object) -> None:
    threading.Thread(target=_sweeper, name="secateurs-sweeper", daemon=True).start()


@worker_shutting_down.connect
def _stop_sweeper(**_: object) -> None:
    _stop.set()
