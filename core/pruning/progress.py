"""Progress reports from a run to whoever drives it (CLI progress bar, worker events)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Progress:
    stage: str  # load | calibrate | evaluate_dense | prune | structure | evaluate | export
    message: str = ""
    block: int | None = None  # 0-based index of the block just finished
    total_blocks: int | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        if self.block is None or not self.total_blocks:
            return None
        return (self.block + 1) / self.total_blocks


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]


def no_progress(_: Progress) -> None:
    return None


def never_stop() -> bool:
    return False
