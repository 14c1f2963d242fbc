"""Width pruning of one block: drop MLP intermediate channels, or whole key/value groups with their query heads."""

from __future__ import annotations

import torch
from torch import nn

from core.pruning import models
from core.pruning.structured import arch
from core.pruning.structured.scores import ChannelStats, group_scores, lowest


def _complement(n: int, removed: list[int]) -> torch.Tensor:
    gone = set(removed)
    return torch.tensor([i for i in range(n) if i not in gone], dtype=torch.long)


def _compensate(out: nn.Module, channels: torch.Tensor, stats: ChannelStats | None) -> None:
    """FLAP bias compensation: b ← b + W[:, R] · E[x_R], so the removed channels' mean still reaches the output."""
    if stats is None:
        raise ValueError("bias compensation needs the calibration channel statistics")
    w = models.get_weight(out).double()
    arch.add_to_bias(out, (w[:, channels] @ stats.mean[channels].to(w.device)).float())


def prune_mlp(
    block: nn.Module, spec: arch.Mlp, stats: ChannelStats | None, n_remove: int, kind: str, compensate: bool
) -> list[int]:
    """Remove the n_remove lowest-scoring intermediate channels; returns their indices."""
    out = block.get_submodule(spec.out)
    ins = [block.get_submodule(n) for n in spec.ins]
    n = models.in_features(out)
    groups = torch.arange(n).view(n, 1)
    removed = lowest(group_scores(out, ins, groups, stats, kind, compensate), n_remove)
    keep = _complement(n, removed)
    if compensate and removed:
        _compensate(out, torch.tensor(removed), stats)
    for layer in ins:
        arch.keep_outputs(layer, keep)  # rows of up/gate (fc1, c_fc, dense_h_to_4h)
    arch.keep_inputs(out, keep)  # columns of down (fc2, c_proj, dense_4h_to_h)
    return removed


def prune_heads(
    block: nn.Module,
    spec: arch.Attn,
    stats: ChannelStats | None,
    n_remove: int,
    layout: tuple[int, int, int],
    kind: str,
    compensate: bool,
) -> list[int]:
    """Remove n_remove key/value groups (each with the h/kv query heads that read it); returns the group indices.
    Query head i reads key/value head i // (h/kv), so group g is query heads [g·r, (g+1)·r) with r = h/kv."""
    h, kv, hd = layout
    r = h // kv
    q, k, v, o = (block.get_submodule(n) for n in (spec.q, spec.k, spec.v, spec.o))
    groups = torch.arange(h * hd).view(kv, r * hd)  # o's input channels of each group
    removed = lowest(group_scores(o, [v], groups, stats, kind, compensate), n_remove)
    kept = [g for g in range(kv) if g not in set(removed)]
    q_rows = groups[kept].reshape(-1)
    kv_rows = torch.arange(kv * hd).view(kv, hd)[kept].reshape(-1)
    if compensate and removed:
        _compensate(o, groups[removed].reshape(-1), stats)
    arch.keep_outputs(q, q_rows)
    arch.keep_outputs(k, kv_rows)
    arch.keep_outputs(v, kv_rows)
    arch.keep_inputs(o, q_rows)
    return removed
