"""Recovery fine-tuning of a pruned model with its masks held exactly (core/pruning/held_masks.py).

mode `full`: every parameter trains (the pruned weights' gradients are zeroed before each AdamW step and the
masks applied again after it); mode `lora`: peft LoRA adapters on the pruned layers, merged and re-masked at
the end (core/pruning/lora.py). `distill`: the loss is the KL divergence from the dense model's next-token
distribution (the teacher, a dense copy kept in the same process: one more model's weights in memory, plus a
batch of its logits, batch_size × seqlen × vocabulary floats). bf16 autocast on CUDA only; gradient
checkpointing on request. Structured-pruned models have no masks and train as ordinary smaller models."""

from __future__ import annotations

import copy
import math
import resource
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import psutil
import torch
from torch import nn

from core.pruning import gradual, models, recovery_data
from core.pruning import lora as lora_mod
from core.pruning.config import PruneConfig, RecoveryConfig
from core.pruning.engine import EngineResult
from core.pruning.errors import Cancelled, NumericalError, RecoveryError
from core.pruning.held_masks import HeldMasks
from core.pruning.masks import unpack_mask
from core.pruning.progress import Progress, ProgressFn, StopFn, never_stop, no_progress
from core.pruning.recovery_data import RecoveryData

CURVE_POINTS = 100  # the loss curve in metrics.json has about this many points


def teacher_bytes(model: nn.Module, batch_size: int, seqlen: int) -> int:
    """What keeping a dense teacher costs: its weights, plus one batch of its float32 logits."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    return weights + batch_size * seqlen * vocab * 4


def make_teacher(model: nn.Module, cfg: RecoveryConfig, seqlen: int, device: torch.device) -> nn.Module:
    """A frozen dense copy of `model` (call before pruning), or RecoveryError when it will not fit."""
    need = teacher_bytes(model, cfg.batch_size, seqlen)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # on the GPU, the teacher sits beside the student, its optimizer state (2 copies) and its gradients
        student = sum(p.numel() * p.element_size() for p in model.parameters()) * 4
        if need + student > free:
            raise RecoveryError(
                f"recovery.distill: the dense teacher needs {need / 2**30:.2f} GiB on {device} beside the student's "
                f"{student / 2**30:.2f} GiB, and only {free / 2**30:.2f} GiB are free; turn distill off or use "
                "a larger device"
            )
    else:
        free = psutil.virtual_memory().available
        if need > 0.8 * free:
            raise RecoveryError(
                f"recovery.distill: the dense teacher needs {need / 2**30:.2f} GiB of host memory and only "
                f"{free / 2**30:.2f} GiB are available; turn distill off"
            )
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def split_steps(total: int, stages: int) -> list[int]:
    """Recovery steps after each of `stages` gradual stages: total spread evenly, the remainder last."""
    base = total // stages
    return [base] * (stages - 1) + [total - base * (stages - 1)]


def recover(
    model: nn.Module,
    held: HeldMasks,
    data: RecoveryData,
    cfg: RecoveryConfig,
    *,
    steps: int | None = None,
    device: torch.device,
    teacher: nn.Module | None = None,
    on_progress: ProgressFn = no_progress,
    should_stop: StopFn = never_stop,
    label: str = "recover",
    progress_data: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train `model` for `steps` (default cfg.steps) optimizer steps; returns the model (in lora mode the merged
    one, a different object) and what happened. Raises Cancelled between steps when should_stop() says so."""
    steps = cfg.steps if steps is None else steps
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        models.move(model, device)
        if teacher is not None:
            teacher.to(device)
    held.to(device)
    held.apply()
    torch.manual_seed(cfg.seed)
    train_model = model
    if cfg.mode == "lora":
        train_model = lora_mod.wrap(model, held, cfg.lora, cfg.seed)
    else:
        model.requires_grad_(True)
    params = [p for p in train_model.parameters() if p.requires_grad]
    hf: Any = model  # a transformers PreTrainedModel
    checkpointing = cfg.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False)
    if checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.mode == "lora":
            hf.enable_input_require_grads()
    from transformers import get_scheduler

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_scheduler("cosine", opt, num_warmup_steps=min(cfg.warmup_steps, steps), num_training_steps=steps)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    every = max(1, steps // CURVE_POINTS)
    curve: list[dict[str, float]] = []
    tokens = 0
    running: float | None = None
    train_model.train()
    try:
        for step in range(1, steps + 1):
            if should_stop():
                raise Cancelled(f"stopped during recovery, before step {step}/{steps}")
            total = 0.0
            for _ in range(cfg.grad_accum):
                ids = data.batch().to(device)
                with autocast:
                    loss = _loss(train_model, ids, teacher)
                (loss / cfg.grad_accum).backward()
                total += float(loss.detach()) / cfg.grad_accum
                tokens += ids.numel()
            if not math.isfinite(total):
                raise NumericalError(f"recovery loss is {total} at step {step}: lower recovery.lr")
            held.zero_grads()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            held.apply()
            running = total if running is None else 0.9 * running + 0.1 * total
            if step % every == 0 or step == steps:
                curve.append({"step": step, "loss": round(total, 5), "lr": lr, "tokens": tokens})
            on_progress(
                Progress(
                    label,
                    f"step {step}/{steps} loss {running:.4f}",
                    block=step - 1,
                    total_blocks=steps,
                    data={"step": step, "steps": steps, "loss": running, "lr": lr, **(progress_data or {})},
                )
            )
    finally:
        train_model.eval()
        if checkpointing:
            hf.gradient_checkpointing_disable()
        del opt, sched
    report: dict[str, Any] = {
        "mode": cfg.mode,
        "steps": steps,
        "tokens_seen": tokens,
        "loss": "kl_to_dense" if teacher is not None else "cross_entropy",
        "loss_first": curve[0]["loss"] if curve else None,
        "loss_last": curve[-1]["loss"] if curve else None,
        "loss_curve_every": every,
        "loss_curve": curve,
        "autocast": "bfloat16" if device.type == "cuda" else None,
        "gradient_checkpointing": cfg.gradient_checkpointing,
    }
    if cfg.mode == "lora":
        model, merge_info = lora_mod.merge(train_model, held)
        report["lora"] = {**cfg.lora.model_dump(), **merge_info}
    model.requires_grad_(False)
    held.apply()
    report["mask_violations"] = held.violations()
    report["seconds"] = round(time.perf_counter() - t0, 4)
    report["seconds_per_step"] = round(report["seconds"] / max(1, steps), 5)
    if device.type == "cuda":
        report["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        model.to("cpu")
        if teacher is not None:
            teacher.to("cpu")
        held.to(torch.device("cpu"))
        torch.cuda.empty_cache()
    return model, report


def _loss(model: nn.Module, ids: torch.Tensor, teacher: nn.Module | None) -> torch.Tensor:
    if teacher is None:
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    with torch.no_grad():
        target = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
    s = torch.log_softmax(logits, -1).flatten(0, 1)
    t = torch.log_softmax(target, -1).flatten(0, 1)
    return nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")


class Plan:
    """What a run does about recovery, set up before pruning (so that bad recovery data or a teacher that will
    not fit fail before any pruning): the windows, the dense teacher, the steps per gradual stage; then the
    recoveries themselves and their report. Without `recovery` every call is a no-op."""

    def __init__(
        self,
        config: PruneConfig,
        model: nn.Module,
        tokenizer: Any,
        device: torch.device,
        stage: Callable[[str], AbstractContextManager[None]],
        *,
        eval_scored: tuple[str | None, torch.Tensor, int] | None = None,
        perplexity: Callable[[nn.Module], float] | None = None,
    ):
        self.config, self.cfg, self.device, self.stage, self.perplexity = (
            config,
            config.recovery,
            device,
            stage,
            perplexity,
        )
        self.gradual_stages: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []
        self.removed: dict[str, torch.Tensor] = {}
        self.teacher: nn.Module | None = None
        self.data: RecoveryData | None = None
        stages = config.gradual.stages if config.gradual is not None else 1
        self.steps = split_steps(self.cfg.steps, stages) if self.cfg is not None else [0] * stages
        if self.cfg is None:
            return
        scored = None
        if eval_scored is not None and eval_scored[0] is not None:
            scored = (eval_scored[0], eval_scored[1], eval_scored[2])
        with stage("calibrate"):
            self.data = recovery_data.build(config, tokenizer, models.max_positions(model), scored)
        if self.cfg.distill:
            self.teacher = make_teacher(model, self.cfg, self.data.seqlen, device)

    def masks(self, model: nn.Module, packed: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> None:
        """The final masks, held by the last recovery."""
        if self.cfg is not None:
            self.removed = {n: ~unpack_mask(packed[n], shapes[n]) for n in packed}

    def _recover(
        self, model: nn.Module, steps: int, on_progress: ProgressFn, should_stop: StopFn, extra: dict[str, Any]
    ) -> nn.Module:
        assert self.cfg is not None and self.data is not None
        held = HeldMasks(model, self.removed)
        with self.stage("recover"):
            model, rep = recover(
                model,
                held,
                self.data,
                self.cfg,
                steps=steps,
                device=self.device,
                teacher=self.teacher,
                on_progress=on_progress,
                should_stop=should_stop,
                progress_data=extra,
            )
        rep["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rep["sparsity_held"] = held.sparsity()
        self.runs.append({**extra, **rep})
        return model

    def gradual_stage(
        self,
        model: nn.Module,
        res: EngineResult,
        k: int,
        target: float,
        started: float,
        on_progress: ProgressFn,
        should_stop: StopFn,
    ) -> nn.Module:
        """After gradual stage k's pruning: measure it, and recover before the next stage (not after the last:
        that recovery is `final`, after the pruned model's evaluation)."""
        stages = len(self.steps)
        numel = sum(math.prod(r.shape) for r in res.layers)
        entry: dict[str, Any] = {
            "stage": k + 1,
            "target": target,
            "achieved_sparsity": sum(r.sparsity * math.prod(r.shape) for r in res.layers) / numel if numel else 0.0,
            "prune_seconds": round(time.perf_counter() - started, 4),
        }
        if self.perplexity is not None and k < stages - 1:
            entry["perplexity_pruned"] = self.perplexity(model)
        if self.cfg is not None and k < stages - 1:
            self.masks(model, res.masks, res.mask_shapes)
            t = time.perf_counter()
            report = gradual.stage_progress(on_progress, k, stages, 0.5, 0.5)
            model = self._recover(model, self.steps[k], report, should_stop, {"gradual_stage": k + 1})
            entry["recover_seconds"] = round(time.perf_counter() - t, 4)
            entry["recover_steps"] = self.steps[k]
            if self.perplexity is not None:
                entry["perplexity_recovered"] = self.perplexity(model)
        self.gradual_stages.append(entry)
        return model

    def final(self, model: nn.Module, on_progress: ProgressFn, should_stop: StopFn) -> nn.Module:
        if self.cfg is None:
            return model
        extra = {"gradual_stage": len(self.steps)} if self.config.gradual is not None else {}
        return self._recover(model, self.steps[-1], on_progress, should_stop, extra)

    def report(self) -> dict[str, Any] | None:
        if self.cfg is None or self.data is None:
            return None
        last = self.runs[-1] if self.runs else {}
        return {
            "config": self.cfg.model_dump(mode="json"),
            "data": self.data.protocol,
            "teacher_bytes": None
            if self.teacher is None
            else teacher_bytes(self.teacher, self.cfg.batch_size, self.data.seqlen),
            "steps": sum(r["steps"] for r in self.runs),
            "tokens_seen": sum(r["tokens_seen"] for r in self.runs),
            "loss_curve": last.get("loss_curve", []),
            "runs": self.runs,
            "mask_violations": sum(r["mask_violations"] for r in self.runs),
            "seconds": round(sum(r["seconds"] for r in self.runs), 4),
            "peak_rss_bytes": last.get("peak_rss_bytes"),
            "cuda_peak_bytes": max((r.get("cuda_peak_bytes", 0) for r in self.runs), default=None) or None,
            **({"lora": last["lora"]} if "lora" in last else {}),
        }

    def gradual_report(self) -> dict[str, Any] | None:
        g = self.config.gradual
        if g is None:
            return None
        return {
            "stages": g.stages,
            "schedule": g.schedule,
            "targets": gradual.stage_targets(self.config.target_sparsity, g.stages, g.schedule),
            "recovery_steps": self.steps if self.cfg is not None else None,
            "per_stage": self.gradual_stages,
        }
