"""Worker entry point: ``celery -A worker.main worker`` (or ``secateurs service worker``).

Besides the prune task, the worker's main process runs the lost-job sweep (``worker.sweep``) in a thread:
it re-enqueues jobs whose worker died (lease expired) and jobs whose enqueue never happened.
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_init, worker_ready, worker_shutting_down

from core.settings import get_settings
from worker import tasks  # noqa: F401  (registers the task)
from worker.celery_app import make_celery
from worker.sweep import sweep

log = logging.getLogger("secateurs.worker")

app = make_celery(get_settings())
_stop = threading.Event()


def _sweeper() -> None:
    s = app.conf.secateurs_settings
    while not _stop.is_set():
        try:
            sweep(s, app)
        except Exception:  # keep sweeping; the database may be briefly unavailable
            log.exception("lost-job sweep failed")
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
