"""The whole-run fraction a job reports: every stage has one, it stays in [0, 1] and never goes back."""

from __future__ import annotations

from core.pruning.config import PruneConfig
from core.pruning.progress import Progress, RunFraction, planned_stages


def config(**kw) -> PruneConfig:  # noqa: ANN003
    return PruneConfig(model="org/m", calibration={"texts": ["a b c"]}, **kw)


def test_the_plan_follows_the_config():
    assert planned_stages(config(sparsity=0.5)) == ["load", "calibrate", "prune", "export"]
    evaluated = planned_stages(config(sparsity=0.5, evaluation={"source": "wikitext2"}))
    assert evaluated == ["load", "calibrate", "evaluate_dense", "prune", "evaluate", "export"]
    assert planned_stages(config(structure={"mlp_channels": 0.25})) == ["load", "calibrate", "structure", "export"]


def test_fraction_covers_every_stage_and_never_goes_back():
    fraction = RunFraction(planned_stages(config(sparsity=0.5, evaluation={"source": "wikitext2"})))
    reports = [
        Progress("load"),
        Progress("calibrate"),
        Progress("evaluate_dense"),
        *(Progress("prune", block=i, total_blocks=4) for i in range(4)),
        Progress("schedule"),  # not a planned stage: keeps the last figure
        Progress("evaluate"),
        Progress("prune", block=0, total_blocks=4),  # out of order: never lowers it
        Progress("export"),
    ]
    seen = [fraction(p) for p in reports]
    assert seen[0] == 0.0 and all(0 <= f < 1 for f in seen)
    assert seen == sorted(seen) and len(set(seen[2:7])) == 5  # each prune block moves it
    assert seen[7] == seen[6] and seen[-3] == seen[-2]
    assert seen[-1] > 0.9  # export is the last, small share
