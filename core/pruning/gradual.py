"""Gradual (iterative) pruning: s1 < ... < sk = target, each stage recalibrated on the current (pruned and
recovered) model, with recovery between stages. Masks only grow: a weight removed at stage i stays removed.

Every method scores weights that are already exactly zero lowest (magnitude and Wanda: |W|·… = 0; SparseGPT is
told to take the zeros it was given first, see methods/sparsegpt.py), so a stage chooses its new removals among
the weights still kept; the union with the earlier masks is taken anyway and held exactly. N:M patterns are
refused (PruneConfig): a pattern has no increasing ratios on the way to it."""

from __future__ import annotations

from typing import Any

import torch

from core.pruning import models, patterns
from core.pruning.config import PruneConfig
from core.pruning.engine import EngineResult
from core.pruning.masks import pack_mask, unpack_mask
from core.pruning.progress import Progress, ProgressFn


def stage_targets(target: float, stages: int, schedule: str) -> list[float]:
    """s_i for i = 1..k; cubic (Zhu & Gupta 2017, from s0 = 0): s_i = s·(1 − (1 − i/k)³); linear: s·i/k."""
    if schedule == "linear":
        return [target * i / stages for i in range(1, stages + 1)]
    return [target * (1 - (1 - i / stages) ** 3) for i in range(1, stages + 1)]


def fractions(config: PruneConfig) -> list[float]:
    """Each stage's share of the final per-layer target (one stage, 1.0, without `gradual`)."""
    g = config.gradual
    if g is None or not config.target_sparsity:
        return [1.0]
    t = config.target_sparsity
    return [s / t for s in stage_targets(t, g.stages, g.schedule)]


def scaled(config: PruneConfig, block_sparsity: list[float], frac: float) -> tuple[list[float], dict[str, float]]:
    """A stage's block sparsities and layer overrides: the final ones times `frac`."""
    return [s * frac for s in block_sparsity], {r: s * frac for r, s in config.overrides.items()}


def hold(model: torch.nn.Module, earlier: dict[str, torch.Tensor] | None, res: EngineResult) -> dict[str, torch.Tensor]:
    """The removal masks after this stage: the union with the earlier stages' (whose weights are zeroed again,
    should a method have moved one), written back into `res` (packed masks and layer reports). Returns them."""
    removed = {n: ~unpack_mask(res.masks[n], res.mask_shapes[n]) for n in res.masks}
    if earlier:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, m in earlier.items():
                if n in removed:
                    removed[n] |= m
                else:
                    removed[n] = m.clone()
                    res.mask_shapes[n] = list(m.shape)
                params[n].masked_fill_(removed[n], 0)
                res.masks[n] = pack_mask(~removed[n])
        for r in res.layers:
            r.sparsity = patterns.sparsity(models.get_weight(model.get_submodule(r.name)))
    return removed


def monotone(earlier: dict[str, torch.Tensor], later: dict[str, torch.Tensor]) -> bool:
    """Every weight removed earlier is removed later."""
    return all(bool((~later[n] & m).sum() == 0) for n, m in earlier.items())


def stage_progress(on_progress: ProgressFn, k: int, stages: int, part: float = 0.0, span: float = 1.0) -> ProgressFn:
    """Reports of stage k of `stages`, counted inside the run's `prune` share: stage k covers [k/K, (k+1)/K)
    of it, pruning its first `span` part and recovery the rest."""

    def report(p: Progress) -> None:
        inner = p.fraction or 0.0
        frac = (k + part + span * inner) / stages
        data: dict[str, Any] = {**p.data, "gradual_stage": k + 1, "gradual_stages": stages, "counts_as": "prune"}
        data["stage_fraction"] = frac
        msg = f"stage {k + 1}/{stages}: {p.message}"
        on_progress(Progress(p.stage, msg, p.block, p.total_blocks, data))

    return report
