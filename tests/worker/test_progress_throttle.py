"""At most one progress event per interval is written, while every report updates the job's progress; no
event is lost at stage changes or at the end; the held one is written once the interval has passed."""

from __future__ import annotations

from typing import Any

from worker.progress_throttle import ProgressThrottle


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


FIELD: list[tuple[str, int]] = []  # the job's progress field after each write


def make(interval: float = 1.0) -> tuple[ProgressThrottle, list[tuple[str, int]], Clock]:
    """The throttle, the events it wrote, its clock."""
    written: list[tuple[str, int]] = []
    clock = Clock()
    FIELD.clear()

    def write(progress: dict[str, Any], event: dict[str, Any] | None) -> None:
        FIELD.append((progress["stage"], progress["block"]))
        if event is not None:
            assert progress["block"] == event["block"]
            written.append((progress["stage"], progress["block"]))

    return ProgressThrottle(write, interval, clock), written, clock


def offer(t: ProgressThrottle, stage: str, block: int) -> None:
    t.offer({"stage": stage, "block": block}, {"stage": stage, "block": block})


def test_a_burst_is_written_once_per_interval_and_its_last_report_is_not_lost():
    t, written, clock = make()
    for i in range(100):  # 100 reports in 0.99 s
        clock.t = i * 0.01
        offer(t, "prune", i)
    assert written == [("prune", 0)]
    assert FIELD[-1] == ("prune", 99) and len(FIELD) == 100  # the job's progress is always the newest
    t.flush_due()
    assert written == [("prune", 0)]  # the interval has not passed
    clock.t = 1.0
    t.flush_due()
    assert written == [("prune", 0), ("prune", 99)]  # the newest held report, once the interval passed
    t.flush_due()
    assert len(written) == 2


def test_a_new_stage_writes_the_last_held_report_then_its_first_at_once():
    t, written, clock = make()
    offer(t, "prune", 0)
    clock.t = 0.5
    offer(t, "prune", 1)
    clock.t = 0.6
    offer(t, "export", 0)
    assert written == [("prune", 0), ("prune", 1), ("export", 0)]


def test_reports_slower_than_the_interval_are_all_written():
    t, written, clock = make(interval=1.0)
    for i in range(5):
        clock.t = i * 1.5
        offer(t, "prune", i)
    assert written == [("prune", i) for i in range(5)]


def test_flush_writes_what_is_held_at_the_end():
    t, written, clock = make()
    offer(t, "prune", 0)
    offer(t, "prune", 1)
    t.flush()
    t.flush()
    assert written == [("prune", 0), ("prune", 1)]


def test_interval_zero_writes_every_report():
    t, written, _ = make(interval=0)
    for i in range(10):
        offer(t, "prune", i)
    assert len(written) == 10
