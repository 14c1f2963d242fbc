"""One pruning run end to end: load → calibrate → (evaluate dense) → (structure) → prune block by block →
(evaluate) → export. The single entry point the CLI and the worker call."""

from __future__ import annotations

import logging
import math
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.pruning import (
    calibration,
    engine,
    evaluate,
    export,
    gradual,
    methods,
    models,
    preflight,
    recovery,
    tasks,
)
from core.pruning.checkpoints import ResumeSpec, open_run
from core.pruning.config import PruneConfig
from core.pruning.errors import Cancelled, EvaluationError
from core.pruning.export import FileEntry
from core.pruning.memory import reusing_freed_memory
from core.pruning.progress import Progress, ProgressFn, StopFn, never_stop, no_progress
from core.pruning.streaming import streamed_save

log = logging.getLogger(__name__)
TOKENS_PER_BATCH = (
    512  # windows run through a block together: fewer calls, but a forward pass's temporaries grow with it
)


@dataclass
class PruneResult:
    out_dir: Path
    metrics: dict[str, Any]
    files: list[FileEntry]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t, 4)


def prune(
    config: PruneConfig,
    out_dir: Path | str,
    on_progress: ProgressFn = no_progress,
    should_stop: StopFn = never_stop,
    resume: ResumeSpec | None = None,
) -> PruneResult:
    """resume: where finished blocks are checkpointed, and restored from when an earlier run left them (a run
    of one pruning pass: not a sweep, not gradual)."""
    if config.is_sweep:
        from core.pruning.sweep import sweep

        return sweep(config, out_dir, on_progress, should_stop)
    with reusing_freed_memory():
        prep = prepare(config, Path(out_dir), on_progress, should_stop)
        return prune_prepared(prep, config, Path(out_dir), on_progress, should_stop, resume)


@dataclass
class Prepared:
    """What every target of a run shares: the loaded model (dense), the calibration windows, the evaluation
    windows and the dense model's scores, and OWL's outlier ratios (a dense pre-pass)."""

    config: PruneConfig
    device: torch.device
    loaded: models.Loaded
    params_before: int
    cal: calibration.Calibration
    batch: int
    ev_tasks: tasks.TaskRun | None
    ppl: dict[str, Any] | None  # dense perplexity and the protocol
    ev_ids: torch.Tensor | None
    ev_seqlen: int
    task_scores: dict[str, Any]  # {"dense": ...} when tasks are scored
    owl: tuple[list[float], list[int]] | None  # outlier ratio and prunable weights of each block
    clock: _Clock
    started: float

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model


def prepare(config: PruneConfig, out_dir: Path, on_progress: ProgressFn, should_stop: StopFn) -> Prepared:
    """Load, calibrate, evaluate the dense model (and OWL's pre-pass): everything before the first block is
    pruned, which does not depend on the target."""
    preflight.raise_on_problems(config, out_dir)
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock, started = _Clock(), time.perf_counter()

    on_progress(Progress("load", f"loading {config.model}"))
    with clock.stage("load"):
        loaded = models.load(config.model, config.dtype, config.trust_remote_code, config.revision)
    model, tok = loaded.model, loaded.tokenizer
    params_before = models.count_params(model)

    on_progress(Progress("calibrate", "building calibration windows"))
    with clock.stage("calibrate"):
        cal = calibration.build(config.calibration, tok, models.max_positions(model))
    seqlen = cal.tokens.shape[1]
    batch = max(1, TOKENS_PER_BATCH // seqlen)

    ev_tasks = tasks.TaskRun(config.evaluation) if config.evaluation is not None and config.evaluation.tasks else None
    if ev_tasks is not None and not loaded.causal:
        raise EvaluationError(f"lm-eval tasks need a causal language model, not a {type(model).__name__}")
    ppl: dict[str, Any] | None = None
    ev_ids, ev_seqlen = None, 0
    if config.evaluation is not None and config.evaluation.source is not None and loaded.causal:
        with clock.stage("evaluate_dense"):
            ev_ids, ev_protocol = evaluate.eval_tokens(config.evaluation, tok)
            ev_seqlen = min(config.evaluation.seqlen or seqlen, models.max_positions(model) or 1 << 30)
            on_progress(Progress("evaluate_dense", "perplexity of the dense model"))
            dense = _perplexity(model, ev_ids, ev_seqlen, config, device)
        ppl = {
            "dense": dense["perplexity"],
            "protocol": {**ev_protocol, **{k: dense[k] for k in ("windows", "seqlen", "tokens_scored")}},
        }
    task_scores: dict[str, Any] = {}
    if ev_tasks is not None:
        with clock.stage("evaluate_dense"):
            task_scores["dense"] = _task_scores(
                ev_tasks, model, tok, "evaluate_dense", device, on_progress, should_stop
            )

    owl = None
    if config.schedule.kind == "owl" and config.structure is None:  # after structure: on the structured model
        from core.pruning import schedules

        with clock.stage("schedule"):
            owl = schedules.owl_scores(
                model,
                cal.tokens,
                m=config.schedule.owl_m,
                device=device,
                batch_size=batch,
                exclude=config.exclude,
                should_stop=should_stop,
            )
    return Prepared(
        config=config,
        device=device,
        loaded=loaded,
        params_before=params_before,
        cal=cal,
        batch=batch,
        ev_tasks=ev_tasks,
        ppl=ppl,
        ev_ids=ev_ids,
        ev_seqlen=ev_seqlen,
        task_scores=task_scores,
        owl=owl,
        clock=clock,
        started=started,
    )


def prune_prepared(
    prep: Prepared,
    config: PruneConfig,
    out_dir: Path,
    on_progress: ProgressFn,
    should_stop: StopFn,
    resume: ResumeSpec | None = None,
) -> PruneResult:
    """Prune the prepared (dense) model to `config`'s one target, evaluate it and write `out_dir`. The model is
    left pruned: a caller pruning another target restores the dense weights first."""
    device, loaded, cal, batch = prep.device, prep.loaded, prep.cal, prep.batch
    model, tok = loaded.model, loaded.tokenizer
    ev_tasks, ev_ids, ev_seqlen = prep.ev_tasks, prep.ev_ids, prep.ev_seqlen
    ppl = None if prep.ppl is None else dict(prep.ppl)
    task_scores = dict(prep.task_scores)
    clock, started = _Clock(), prep.started
    clock.seconds.update(prep.clock.seconds)
    method = methods.get(config.method)(config)
    _, blocks = models.find_blocks(model)

    scored_ids = ev_ids if ppl is not None and config.evaluation is not None else None
    rec = recovery.Plan(
        config,
        model,
        tok,
        device,
        clock.stage,
        eval_scored=None
        if scored_ids is None or config.evaluation is None or ppl is None
        else (config.evaluation.source, scored_ids, ppl["protocol"]["windows"] * ev_seqlen),
        perplexity=None
        if scored_ids is None
        else lambda m: _perplexity(m, scored_ids, ev_seqlen, config, device)["perplexity"],
    )

    structure_metrics = None
    if config.structure is not None:
        from core.pruning.structured import apply_structure

        with clock.stage("structure"):
            structure_metrics = apply_structure(
                model,
                cal.tokens,
                config.structure,
                device=device,
                batch_size=batch,
                on_progress=on_progress,
                should_stop=should_stop,
                measure_speed=True,
            )
        _, blocks = models.find_blocks(model)

    layers: list[engine.LayerReport] = []
    masks, shapes, block_sparsity, skipped = {}, {}, None, []
    if config.sparsity is not None or config.nm is not None:
        with clock.stage("schedule"):
            block_sparsity = _block_sparsity(config, model, cal.tokens, device, batch, should_stop, prep.owl)
        fracs = gradual.fractions(config)  # [1.0] unless gradual: a loop of one stage
        removed: dict[str, torch.Tensor] | None = None
        for k, frac in enumerate(fracs):
            stage_sparsity, stage_overrides = gradual.scaled(config, block_sparsity, frac)
            report = on_progress if len(fracs) == 1 else gradual.stage_progress(on_progress, k, len(fracs), 0, 0.5)
            t_stage = time.perf_counter()
            with clock.stage("prune"), _scratch_beside(out_dir) as spill:
                commit = getattr(model.config, "_commit_hash", None)
                stage_resume = resume if len(fracs) == 1 else None  # gradual stages are not checkpointed
                stream, ckpt, finished = open_run(
                    stage_resume, config, cal.tokens, loaded.source, commit, device, len(blocks), spill
                )
                res = engine.prune_blocks(
                    model,
                    cal.tokens,  # each stage's statistics come from the current (pruned, recovered) model
                    method,
                    device=device,
                    block_sparsity=stage_sparsity,
                    nm=config.nm,
                    exclude=config.exclude,
                    overrides=stage_overrides,
                    true_sequential=config.true_sequential,
                    propagate=config.propagate,
                    batch_size=batch,
                    on_progress=report,
                    should_stop=should_stop,
                    stream=stream,
                    checkpoints=ckpt,
                    finished=finished,
                )
            removed = gradual.hold(model, removed, res) if len(fracs) > 1 else None
            if len(fracs) > 1:
                model = rec.gradual_stage(
                    model, res, k, frac * config.target_sparsity, t_stage, on_progress, should_stop
                )
        layers, masks, shapes, skipped = res.layers, res.masks, res.mask_shapes, res.skipped
        rec.masks(model, masks, shapes)

    ev_pruned = "evaluate" if config.recovery is None else "evaluate_pruned"
    if ppl is not None:
        assert ev_ids is not None
        with clock.stage(ev_pruned):
            on_progress(Progress(ev_pruned, "perplexity of the pruned model"))
            ppl["pruned"] = _perplexity(model, ev_ids, ev_seqlen, config, device)["perplexity"]
    if ev_tasks is not None:
        with clock.stage(ev_pruned):
            task_scores["pruned"] = _task_scores(ev_tasks, model, tok, ev_pruned, device, on_progress, should_stop)
    if config.recovery is not None:
        model = rec.final(model, on_progress, should_stop)
        if ppl is not None:
            assert ev_ids is not None
            with clock.stage("evaluate"):
                on_progress(Progress("evaluate", "perplexity of the recovered model"))
                ppl["recovered"] = _perplexity(model, ev_ids, ev_seqlen, config, device)["perplexity"]
        if ev_tasks is not None:
            with clock.stage("evaluate"):
                task_scores["recovered"] = _task_scores(
                    ev_tasks, model, tok, "evaluate", device, on_progress, should_stop
                )

    pruned_numel = sum(math.prod(r.shape) for r in layers)
    zeros = sum(r.sparsity * math.prod(r.shape) for r in layers)
    block_params = sum(p.numel() for p in blocks.parameters())
    if layers and pruned_numel < 0.5 * block_params:  # e.g. MoE experts stored as fused 3-D parameters
        log.warning(
            "only %.0f%% of the blocks' parameters are in prunable linear layers", 100 * pruned_numel / block_params
        )
    metrics: dict[str, Any] = {
        "format": "secateurs.metrics/1",
        "method": config.method,
        "config": config.model_dump(mode="json"),
        "model": {
            "source": loaded.source,
            "class": type(model).__name__,
            "blocks": len(blocks),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "params_before": prep.params_before,
            "params_after": models.count_params(model),
        },
        "calibration": cal.protocol | {"batch_windows": batch},
        "device": str(device),
        "achieved_sparsity": zeros / pruned_numel if pruned_numel else 0.0,
        "pruned_weights": pruned_numel,
        "prunable_share_of_block_params": pruned_numel / block_params if block_params else 0.0,
        "skipped_layers": skipped,
        "block_sparsity": block_sparsity,
        "layers": [
            {
                "name": r.name,
                "shape": list(r.shape),
                "target": r.target,
                "pattern": r.pattern,
                "sparsity": r.sparsity,
                **r.info,
            }
            for r in layers
        ],
        "damping_retries": sum(r.info.get("damping_retries", 0) for r in layers),
        "perplexity": ppl,
        "tasks": None if ev_tasks is None else {**ev_tasks.protocol(), **task_scores},
        "structure": structure_metrics,
        "recovery": rec.report(),
        "gradual": rec.gradual_report(),
        "versions": _versions(),
    }
    if should_stop():
        raise Cancelled("stopped before export")
    on_progress(Progress("export", f"writing {out_dir}"))
    with clock.stage("export"), streamed_save():
        metrics["timings"] = clock.seconds | {"total": round(time.perf_counter() - started, 4)}
        metrics["memory"] = _memory(device)
        extra = _write_compact if config.export.compact else None
        files = export.write_output(
            out_dir,
            model=model if config.export.save_model else None,
            tokenizer=tok,
            masks=masks if config.export.masks else {},
            mask_shapes=shapes,
            metrics=_finite(metrics),
            max_shard_size=config.export.max_shard_size,
            extra=extra,
        )
    metrics["timings"] = clock.seconds | {"total": round(time.perf_counter() - started, 4)}
    metrics["model"]["file_bytes_after"] = sum(f.size for f in files if f.kind == "model")
    return PruneResult(out_dir, _finite(metrics), files)


@contextmanager
def _scratch_beside(out_dir: Path) -> Iterator[Path]:
    """A scratch directory on the output's filesystem (in the nearest existing ancestor of out_dir, so that
    nothing is created where a failed run must leave nothing), removed on exit. What the engine spilled there
    stays readable through its mappings after the files are unlinked (POSIX)."""
    base = out_dir.absolute().parent
    while not base.exists():
        base = base.parent
    path = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.scratch-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _perplexity(
    model: torch.nn.Module, ids: torch.Tensor, seqlen: int, config: PruneConfig, device: torch.device
) -> dict[str, Any]:
    ev = config.evaluation
    assert ev is not None
    if device.type != "cpu":
        models.move(model, device)
    try:
        return evaluate.perplexity(model, ids, seqlen, ev.batch_size, ev.max_windows, device)
    finally:
        if device.type != "cpu":
            model.to("cpu")
            torch.cuda.empty_cache()


def _task_scores(
    run: tasks.TaskRun,
    model: torch.nn.Module,
    tokenizer: Any,
    stage: str,
    device: torch.device,
    on_progress: ProgressFn,
    should_stop: StopFn,
) -> dict[str, Any]:
    if device.type != "cpu":
        models.move(model, device)
    try:
        return run.score(model, tokenizer, stage, on_progress, should_stop)
    finally:
        if device.type != "cpu":
            model.to("cpu")
            torch.cuda.empty_cache()


def _block_sparsity(
    config: PruneConfig,
    model: torch.nn.Module,
    tokens: torch.Tensor,
    device: torch.device,
    batch: int,
    should_stop: StopFn,
    owl: tuple[list[float], list[int]] | None = None,
) -> list[float]:
    _, blocks = models.find_blocks(model)
    if config.schedule.kind == "uniform" or config.nm is not None:
        return [config.target_sparsity] * len(blocks)
    from core.pruning import schedules

    if config.schedule.kind == "owl" and owl is not None:  # the dense pre-pass was run once, by `prepare`
        ratios, sizes = owl
        return schedules.block_sparsities(config, config.target_sparsity, len(sizes), ratios, sizes)
    return schedules.for_model(config, model, tokens, device=device, batch_size=batch, should_stop=should_stop)


def _write_compact(tmp: Path) -> None:
    from core.pruning import compact

    compact.pack_checkpoint(tmp, tmp / "compact")


def _memory(device: torch.device) -> dict[str, Any]:
    mem: dict[str, Any] = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        mem["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return mem


def _versions() -> dict[str, str]:
    import transformers

    import core

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "secateurs": getattr(core, "__version__", "0.1.0"),
        "platform": sys.platform,
    }


def _finite(o: Any) -> Any:
    """JSON has no NaN/Infinity: such values become null."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite(v) for v in o]
    return o
