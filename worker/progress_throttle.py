"""Progress without floods: at most one progress event per job per interval.

Long stages (fine-tuning steps, many blocks) may report progress many times a second; each progress event is
a row, a notification and a message on every follower's stream. Every report updates the job's ``progress``
field (one small UPDATE: the field is always current), but a report arriving within ``interval`` of the last
event keeps its event back; the newest one held is written when the interval has passed (by the next report
or by ``flush_due``, which the heartbeat calls). The first report of a stage is an event at once, after the
held last one of the stage before it; status changes do not pass through here and are never held.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

Report = tuple[dict[str, Any], dict[str, Any]]  # (the job's progress field, the progress event's data)
# write(progress, event): set the job's progress field, and append the progress event unless it is None
Write = Callable[[dict[str, Any], dict[str, Any] | None], None]


class ProgressThrottle:
    def __init__(
        self,
        write: Write,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.write, self.interval, self.clock = write, interval, clock
        self._lock = threading.Lock()
        self._held: Report | None = None
        self._last_at = float("-inf")
        self._stage: str | None = None

    def offer(self, progress: dict[str, Any], event: dict[str, Any]) -> None:
        with self._lock:
            new_stage = progress.get("stage") != self._stage
            self._stage = progress.get("stage")
            if new_stage:
                self._write_held()
            if new_stage or self.clock() - self._last_at >= self.interval:
                self._held = None
                self._write((progress, event))
            else:
                self._held = (progress, event)
                self.write(progress, None)

    def flush_due(self) -> None:
        """Write the held report if the interval has passed since the last write."""
        with self._lock:
            if self._held is not None and self.clock() - self._last_at >= self.interval:
                self._write_held()

    def flush(self) -> None:
        """Write the held report now (the run is ending)."""
        with self._lock:
            self._write_held()

    def _write_held(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._write(held)

    def _write(self, report: Report) -> None:
        self._last_at = self.clock()
        self.write(*report)
