"""Layer-wise sparsity: how an unstructured target is spread over blocks (uniform, explicit, linear, OWL).

Every schedule keeps the mean sparsity over prunable weights equal to the target: blocks are weighted by their
prunable parameter count when it is given, and a schedule whose mean is off by more than 0.1 percentage point
is refused rather than silently changed.

OWL (Yin et al., 2024): per block, A = |W|·‖x‖ over all its linears (the Wanda score); the outlier ratio r is the
share of A above M·mean(A). r is rescaled to [0, 2λ] and block sparsity = 1 − (r − mean(r) + (1 − target)):
blocks with more outliers are pruned less, and the mean stays the target.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from core.pruning import models
from core.pruning.config import PruneConfig, ScheduleConfig
from core.pruning.errors import PruningError
from core.pruning.progress import StopFn, never_stop
from core.pruning.walk import BlockInputs, hooked, walk_blocks

TOL = 1e-3  # 0.1 percentage point
HI = 0.99  # no block is pruned beyond this


class ScheduleError(PruningError):
    code = "invalid_schedule"


def _mean(s: Sequence[float], w: Sequence[float]) -> float:
    return sum(a * b for a, b in zip(s, w, strict=True)) / sum(w)


def _fit_mean(s: list[float], w: list[float], target: float, lo: float = 0.0, hi: float = HI) -> list[float]:
    """Shift s so its weighted mean is the target, clipping to [lo, hi] and re-shifting the unclipped blocks."""
    s = [min(hi, max(lo, x)) for x in s]
    for _ in range(len(s) + 1):
        d = target - _mean(s, w)
        if abs(d) < 1e-12:
            break
        free = [i for i, x in enumerate(s) if (x < hi if d > 0 else x > lo)]
        if not free:
            break
        step = d * sum(w) / sum(w[i] for i in free)
        for i in free:
            s[i] = min(hi, max(lo, s[i] + step))
    return s


def block_sparsities(
    cfg: PruneConfig | ScheduleConfig,
    target: float,
    n_blocks: int,
    owl_scores: Sequence[float] | None = None,
    block_params: Sequence[float] | None = None,
) -> list[float]:
    """Sparsity of each block. owl_scores: outlier ratio of each block (`owl_outlier_ratio`), needed for OWL.
    block_params: prunable weights in each block (default: equal), the weights of the mean."""
    sc = cfg.schedule if isinstance(cfg, PruneConfig) else cfg
    w = [float(x) for x in block_params] if block_params is not None else [1.0] * n_blocks
    if not sum(w):
        w = [1.0] * len(w)
    if len(w) != n_blocks or n_blocks < 1:
        raise ScheduleError(f"{len(w)} block sizes given for {n_blocks} blocks")
    if sc.kind == "uniform":
        s = [target] * n_blocks
    elif sc.kind == "explicit":
        s = [float(x) for x in sc.values or []]
        if len(s) != n_blocks:
            raise ScheduleError(f"explicit schedule has {len(s)} values, the model has {n_blocks} blocks")
    elif sc.kind == "linear":
        assert sc.first is not None and sc.last is not None
        ramp = [sc.first + (sc.last - sc.first) * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        s = [x + target - _mean(ramp, w) for x in ramp]  # first/last set the slope; the mean is the target
    elif sc.kind == "owl":
        if owl_scores is None or len(owl_scores) != n_blocks:
            raise ScheduleError(
                f"OWL needs one outlier ratio per block ({n_blocks}), got "
                f"{None if owl_scores is None else len(owl_scores)}"
            )
        r = [float(x) for x in owl_scores]
        span = max(r) - min(r)
        r = [(x - min(r)) / span * 2 * sc.owl_lambda if span > 0 else 0.0 for x in r]  # into [0, 2λ]
        mr = _mean(r, w)
        s = _fit_mean([1 - (x - mr + (1 - target)) for x in r], w, target)  # clipped only if out of range
    else:  # pragma: no cover - the config validates kind
        raise ScheduleError(f"unknown schedule {sc.kind!r}")
    bad = [x for x in s if not 0 <= x <= HI]
    if bad:
        raise ScheduleError(f"{sc.kind} schedule gives block sparsity {bad[0]:.4f}, outside [0, {HI}]")
    got = _mean(s, w)
    if abs(got - target) > TOL:
        raise ScheduleError(
            f"{sc.kind} schedule has mean sparsity {got:.4f}, target is {target:.4f} (allowed difference {TOL})"
        )
    return s


def owl_outlier_ratio(weights: Iterable[torch.Tensor], input_sq: Iterable[torch.Tensor], m: float = 5.0) -> float:
    """Share of A = |W_ij|·sqrt(s_j) above m·mean(A), over all linears of one block taken together.
    weights: [out, in] each; input_sq: the Wanda statistic s_j (mean squared input norm, [in]) of each linear
    (any statistic works whose scale is the same for all linears of the block)."""
    pairs = [(w, s) for w, s in zip(weights, input_sq, strict=True)]
    if not pairs:
        raise ScheduleError("OWL: a block without prunable linears")

    def score(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return w.float().abs() * s.float().to(w.device).clamp_min(0).sqrt().unsqueeze(0)  # A = |W|·‖x‖

    total = sum(float(score(w, s).double().sum()) for w, s in pairs)
    n = sum(w.numel() for w, _ in pairs)
    cut = m * total / n
    return sum(int((score(w, s) > cut).sum()) for w, s in pairs) / n


def owl_scores(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    m: float = 5.0,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    exclude: Sequence[str] = (),
    should_stop: StopFn = never_stop,
) -> tuple[list[float], list[int]]:
    """Dense pre-pass, one block at a time with the engine's walker: (outlier ratio, prunable weights) of each
    block, over its prunable linears not matched by `exclude` (regexes of full layer names)."""
    from core.pruning.methods.wanda import InputNorms

    device = torch.device(device)
    prefix, _ = models.find_blocks(model)
    ratios, sizes = [], []

    def score_block(i: int, block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
        layers = {
            n: l
            for n, l in models.prunable_layers(block).items()
            if models.select([f"{prefix}.{i}.{n}"], list(exclude))
        }
        stats = {n: InputNorms(models.in_features(l), device) for n, l in layers.items()}
        with hooked(layers, lambda n, x: stats[n].add_batch(x)):
            outs = inputs.run(block)
        ws = [models.get_weight(l) for l in layers.values()]
        ratios.append(owl_outlier_ratio(ws, [stats[n].sq for n in layers], m) if ws else 0.0)
        sizes.append(sum(w.numel() for w in ws))
        return outs

    walk_blocks(model, tokens, score_block, device=device, batch_size=batch_size, should_stop=should_stop)
    return ratios, sizes


def block_weights(model: nn.Module, exclude: Sequence[str] = ()) -> list[int]:
    """Prunable weights in each block (the weights of the mean sparsity)."""
    prefix, blocks = models.find_blocks(model)
    return [
        sum(
            models.get_weight(l).numel()
            for n, l in models.prunable_layers(b).items()
            if models.select([f"{prefix}.{i}.{n}"], list(exclude))
        )
        for i, b in enumerate(blocks)
    ]


def for_model(
    config: PruneConfig,
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    should_stop: StopFn = never_stop,
) -> list[float]:
    """The schedule of `config` for this model (runs the OWL pre-pass when needed)."""
    target = config.target_sparsity
    if config.schedule.kind == "owl":
        ratios, sizes = owl_scores(
            model,
            tokens,
            m=config.schedule.owl_m,
            device=device,
            batch_size=batch_size,
            exclude=config.exclude,
            should_stop=should_stop,
        )
        return block_sparsities(config, target, len(sizes), ratios, sizes)
    sizes = block_weights(model, config.exclude)
    return block_sparsities(config, target, len(sizes), None, sizes)
