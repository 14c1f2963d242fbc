"""Progress reports from a run to whoever drives it (CLI progress bar, worker events)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.pruning.config import PruneConfig


@dataclass(frozen=True)
class Progress:
    stage: str  # load | calibrate | evaluate_dense | structure | prune | evaluate_pruned | recover | evaluate | export
    message: str = ""
    block: int | None = None  # 0-based index of the block just finished
    total_blocks: int | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        if self.block is None or not self.total_blocks:
            return None
        return (self.block + 1) / self.total_blocks


# A rough share of a run's time per stage (pruning dominates; each perplexity pass is a forward over the eval
# windows). Only the stages a run plans count, renormalised to sum to 1.
STAGE_WEIGHTS = {
    "load": 1,
    "calibrate": 1,
    "evaluate_dense": 2,
    "structure": 4,
    "prune": 10,
    "evaluate_pruned": 2,
    "recover": 10,  # a recovery of a few hundred steps costs about what pruning does on small models
    "evaluate": 2,
    "export": 1,
}


def planned_stages(config: PruneConfig) -> list[str]:
    """The stages `run.prune` goes through for this config, in order."""
    evaluates = config.evaluation is not None
    stages = ["load", "calibrate", *(["evaluate_dense"] if evaluates else [])]
    stages += ["structure"] if config.structure is not None else []
    if config.is_sweep:  # each target's evaluation is a sub-stage of the sweep's one prune stage
        return [*stages, "prune", "export"]
    stages += ["prune"] if config.sparsity is not None or config.nm is not None else []
    if config.recovery is not None:
        stages += [*(["evaluate_pruned"] if evaluates else []), "recover"]
    return [*stages, *(["evaluate"] if evaluates else []), "export"]


class RunFraction:
    """The whole run's fraction done, in [0, 1] and never going back: the stages before this one, plus this one's
    share times its own fraction (its blocks done; 0 when a stage reports only that it started)."""

    def __init__(self, stages: list[str]):
        total = sum(STAGE_WEIGHTS[s] for s in stages)
        self.start: dict[str, float] = {}
        self.share: dict[str, float] = {}
        done = 0.0
        for s in stages:
            self.start[s], self.share[s] = done / total, STAGE_WEIGHTS[s] / total
            done += STAGE_WEIGHTS[s]
        self.last = 0.0

    def __call__(self, p: Progress) -> float:
        # gradual pruning's stages (their pruning and the recoveries between them) count inside `prune`'s share
        stage = p.data.get("counts_as", p.stage)
        fraction = p.data.get("stage_fraction", p.fraction)
        if stage in self.start:  # a stage outside the plan (a sub-step) keeps the last figure
            now = self.start[stage] + self.share[stage] * (fraction or 0.0)
            self.last = max(self.last, min(1.0, now))
        return self.last


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]


def no_progress(_: Progress) -> None:
    return None


def never_stop() -> bool:
    return False
