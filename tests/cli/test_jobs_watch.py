"""`secateurs jobs watch`'s progress line, fed the events a recovery job sends: the block counter while pruning,
then the training step and its running loss, and the run's fraction throughout."""

from __future__ import annotations

from typing import Any

from cli.jobs import _Watch
from client import Event, Job


def _job() -> Job:
    return Job.model_validate(
        {
            "id": "job_1",
            "status": "running",
            "model": "m",
            "method": "wanda",
            "attempt": 1,
            "max_attempts": 3,
            "cancel_requested": False,
            "timestamps": {"created_at": "2026-12-06T00:00:00Z"},
            "metadata": {},
            "request": {},
            "urls": {},
        }
    )


def _progress(seq: int, **data: Any) -> Event:
    return Event.model_validate({"id": seq, "type": "progress", "created_at": "2026-12-06T00:00:01Z", "data": data})


def test_the_line_shows_blocks_then_the_training_step_and_its_loss() -> None:
    w = _Watch(_job(), quiet=True)
    task = w.bar.tasks[0]
    w.on_event(_progress(1, stage="prune", block=2, total_blocks=5, fraction=0.4, eta_seconds=30))
    assert (task.fields["blocks"], task.completed, w.stage) == ("block 3/5", 0.4, "prune")
    w.on_event(_progress(2, stage="recover", message="step 3/6 loss 2.104", fraction=0.7, step=3, steps=6))
    assert (task.fields["blocks"], task.completed, w.stage) == ("step 3/6 loss 2.104", 0.7, "recover")
    assert task.description == "running · recover"
    w.on_event(_progress(3, stage="evaluate", message="perplexity of the recovered model", fraction=0.9))
    assert (task.fields["blocks"], task.completed) == ("", 0.9)
