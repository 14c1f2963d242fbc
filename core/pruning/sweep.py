"""A sparsity sweep: several targets (unstructured ratios, N:M patterns) in one run.

Shared by all targets, done once (`run.prepare`): loading the model, tokenising the calibration windows and the
evaluation text, the dense model's perplexity and task scores, and OWL's outlier ratios (a dense pre-pass).
Done again for each target (`run.prune_prepared`), exactly as a single run of that target would: the block walk
from block 0 (calibration inputs recaptured from the dense embeddings, then propagated through that target's
own pruned blocks), the pruned model's evaluation, and its output directory. Between targets the dense weights
of the prunable layers are put back from a copy kept in host memory, so each target starts from the very model a
single run loads.

Output: `<out>/sparsity-0.50/`, `<out>/nm-2-4/`, ... one directory per target (metrics.json always; the model
and masks only for targets marked in `export_sparsities` / `export_patterns`), `<out>/sweep.svg` (perplexity
against sparsity) and `<out>/metrics.json` with the shared parts and a `sweep` summary.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core.pruning import export, models, run, svgplot
from core.pruning.config import PruneConfig
from core.pruning.errors import Cancelled
from core.pruning.memory import reusing_freed_memory
from core.pruning.progress import Progress, ProgressFn, StopFn, never_stop, no_progress

PLOT = "sweep.svg"


def target_label(config: PruneConfig) -> str:
    return config.pattern if config.pattern is not None else f"{config.sparsity:g}"


def target_dir(config: PruneConfig) -> str:
    """`sparsity-0.50` (two decimals, more when the ratio needs them) or `nm-2-4`."""
    if config.nm is not None:
        n, m = config.nm
        return f"nm-{n}-{m}"
    x = float(config.sparsity or 0.0)
    text = f"{x:.2f}" if float(f"{x:.2f}") == x else repr(x)  # distinct ratios, distinct directories
    return f"sparsity-{text}"


class DenseWeights:
    """A host-memory copy of the weights a pruning pass changes (the prunable linears of the blocks), put back
    before each target after the first. Embeddings, norms and the head are never changed, so never copied."""

    def __init__(self, model: torch.nn.Module):
        _, blocks = models.find_blocks(model)
        self.params = [
            l.weight for b in blocks for l in models.prunable_layers(b).values() if isinstance(l.weight, torch.Tensor)
        ]
        self.copies = [p.detach().to("cpu", copy=True) for p in self.params]
        self.bytes = sum(c.numel() * c.element_size() for c in self.copies)

    @torch.no_grad()
    def restore(self) -> None:
        for p, c in zip(self.params, self.copies, strict=True):
            p.data.copy_(c)


def _target_progress(on_progress: ProgressFn, label: str, k: int, n: int) -> ProgressFn:
    """Blocks pruned for target k of n count as blocks k*B.. of the sweep's one `prune` stage (so the run's
    fraction moves forward through all targets); the target's other steps are sub-stages such as
    `evaluate 0.5 (3/5)`, outside the plan, which keep the figure."""
    where = f"{label} ({k + 1}/{n})"

    def report(p: Progress) -> None:
        data = {**p.data, "target": label, "target_index": k, "targets": n}
        if p.stage == "prune" and p.block is not None and p.total_blocks:
            on_progress(
                Progress(
                    "prune",
                    f"prune {where}: {p.message}" if p.message else f"prune {where}",
                    block=k * p.total_blocks + p.block,
                    total_blocks=n * p.total_blocks,
                    data=data,
                )
            )
        else:
            on_progress(Progress(f"{p.stage} {where}", p.message, p.block, p.total_blocks, data))

    return report


def sweep(
    config: PruneConfig,
    out_dir: Path | str,
    on_progress: ProgressFn = no_progress,
    should_stop: StopFn = never_stop,
) -> run.PruneResult:
    out_dir = Path(out_dir)
    targets = config.sweep_targets()
    with reusing_freed_memory():
        prep = run.prepare(config, out_dir, on_progress, should_stop)
        dense = DenseWeights(prep.model)
        points: list[dict[str, Any]] = []
        with run._scratch_beside(out_dir) as staging:
            for k, target in enumerate(targets):
                if should_stop():
                    raise Cancelled(f"stopped before target {target_label(target)}")
                if k:
                    dense.restore()
                label, name = target_label(target), target_dir(target)
                started = time.perf_counter()
                res = run.prune_prepared(
                    prep, target, staging / name, _target_progress(on_progress, label, k, len(targets)), should_stop
                )
                points.append(_point(target, label, name, res.metrics, time.perf_counter() - started))
            if should_stop():
                raise Cancelled("stopped before export")
            metrics = _metrics(config, prep, points, dense.bytes)
            svg = svgplot.perplexity_plot(
                [
                    svgplot.Point(
                        p["achieved_sparsity"],
                        p["perplexity"] if p["perplexity"] is not None else math.nan,
                        str(p["target"]),
                        joined=p["pattern"] is None,
                        marked=p["exported"],
                    )
                    for p in points
                ],
                None if prep.ppl is None else prep.ppl["dense"],
                title=f"{config.method}: perplexity against sparsity",
            )
            on_progress(Progress("export", f"writing {out_dir}"))
            files = export.write_output(
                out_dir,
                model=None,
                tokenizer=None,
                masks={},
                mask_shapes={},
                metrics=run._finite(metrics),
                extra=_move_targets(staging, [p["dir"] for p in points], svg),
            )
    metrics["timings"]["total"] = round(time.perf_counter() - prep.started, 4)
    return run.PruneResult(out_dir, run._finite(metrics), files)


def _move_targets(staging: Path, names: list[str], svg: str) -> Callable[[Path], None]:
    def extra(tmp: Path) -> None:
        for name in names:
            shutil.move(str(staging / name), str(tmp / name))
        (tmp / PLOT).write_text(svg)

    return extra


def _point(target: PruneConfig, label: str, name: str, m: dict[str, Any], wall: float) -> dict[str, Any]:
    ppl = m.get("perplexity") or {}
    tasks = m.get("tasks") or {}
    return {
        "target": label if target.pattern is not None else target.sparsity,
        "sparsity": target.target_sparsity,
        "pattern": target.pattern,
        "achieved_sparsity": m["achieved_sparsity"],
        "perplexity": ppl.get("pruned"),
        "tasks": tasks.get("pruned"),
        "exported": target.export.save_model or target.export.masks,  # marked (unmarked targets write neither)
        "dir": name,
        "wall_s": round(wall, 4),
        "block_sparsity": m.get("block_sparsity"),
    }


def _metrics(config: PruneConfig, prep: run.Prepared, points: list[dict[str, Any]], copy_bytes: int) -> dict[str, Any]:
    model = prep.model
    _, blocks = models.find_blocks(model)
    ppl = None if prep.ppl is None else {"dense": prep.ppl["dense"], "protocol": prep.ppl["protocol"]}
    tasks = None
    if prep.ev_tasks is not None:
        tasks = {**prep.ev_tasks.protocol(), "dense": prep.task_scores.get("dense")}
    shared = dict(prep.clock.seconds)
    return {
        "format": "secateurs.metrics/1",
        "method": config.method,
        "config": config.model_dump(mode="json"),
        "model": {
            "source": prep.loaded.source,
            "class": type(model).__name__,
            "blocks": len(blocks),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "params_before": prep.params_before,
        },
        "calibration": prep.cal.protocol | {"batch_windows": prep.batch},
        "device": str(prep.device),
        "perplexity": ppl,
        "tasks": tasks,
        "sweep": {
            "dense_perplexity": None if ppl is None else ppl["dense"],
            "dense_tasks": None if tasks is None else tasks["dense"],
            "points": points,
            "plot": PLOT,
        },
        "timings": {
            "shared": shared,
            "targets": round(sum(p["wall_s"] for p in points), 4),
            "total": round(time.perf_counter() - prep.started, 4),
        },
        "memory": {**run._memory(prep.device), "dense_copy_bytes": copy_bytes},
        "versions": run._versions(),
    }


def load_points(out_dir: Path | str) -> list[dict[str, Any]]:
    """The `sweep` points of a written sweep directory."""
    return list(json.loads((Path(out_dir) / export.METRICS).read_text())["sweep"]["points"])
