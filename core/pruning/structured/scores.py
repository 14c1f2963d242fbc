"""Calibration statistics and importance scores for channel groups, and ShortGPT block influence.

A group g of input channels of an output projection W ([out, in]) is removed together (one MLP channel, or all
channels of the query heads that share one key/value head). Its score is the expected squared error that
removing it adds to the block output, treating channels as uncorrelated:
    activation, no compensation:   S_g = Σ_{j∈g} ‖W[:, j]‖² · E[x_j²]       (Wanda-like: |W|·‖x‖, squared)
    activation, bias compensation: S_g = Σ_{j∈g} ‖W[:, j]‖² · Var[x_j]      (FLAP's fluctuation metric; the
                                   mean part E[x_j]·W[:, j] is moved into the bias, so only the variance is lost)
    weight:                        S_g = ‖W[:, g]‖_F · Π_k ‖W_in_k[g, :]‖_F  (weights alone; W_in_k are the
                                   layers producing the channels: gate/up for MLPs, v for heads)
"""

from __future__ import annotations

import torch
from torch import nn

from core.pruning import models


class ChannelStats:
    """Per-channel count, sum and sum of squares of a layer's input, accumulated in float64."""

    def __init__(self, n: int):
        self.count = 0
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.sumsq = torch.zeros(n, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.count += x.shape[0]
        self.sum += x.sum(0).double().cpu()
        self.sumsq += x.pow(2).sum(0).double().cpu()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def second_moment(self) -> torch.Tensor:  # E[x²]
        return self.sumsq / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:  # unbiased sample variance, as FLAP
        n = max(self.count, 2)
        return ((self.sumsq - self.sum.pow(2) / max(self.count, 1)) / (n - 1)).clamp_min(0)


class Influence:
    """ShortGPT block influence: BI = 1 − mean over tokens of cos(block input, block output)."""

    def __init__(self) -> None:
        self.cos_sum, self.count = 0.0, 0

    def add(self, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        c = nn.functional.cosine_similarity(
            h_in.float().reshape(-1, h_in.shape[-1]), h_out.float().reshape(-1, h_out.shape[-1]), dim=-1
        )
        self.cos_sum += float(c.double().sum())
        self.count += c.numel()

    @property
    def value(self) -> float:
        return 1.0 - self.cos_sum / max(self.count, 1)


def group_scores(
    out_layer: nn.Module,
    in_layers: list[nn.Module],
    groups: torch.Tensor,
    stats: ChannelStats | None,
    kind: str,
    compensate: bool,
) -> torch.Tensor:
    """Score of each group; `groups` is [n_groups, channels per group] of input-channel indices of out_layer.
    For the weight score the rows of every in_layer split into equal consecutive runs, one per group in order
    (MLP: row i is channel i; heads: the v rows of key/value head i)."""
    w = models.get_weight(out_layer).float()
    col = w.pow(2).sum(0).double().cpu()  # ‖W[:, j]‖²
    if kind == "activation":
        if stats is None:
            raise ValueError("activation scores need calibration statistics")
        x = stats.variance if compensate else stats.second_moment
        return (col * x)[groups].sum(1)
    s = col[groups].sum(1).sqrt()
    for layer in in_layers:  # rows of the producing layers: groups scaled to their row count
        wi = models.get_weight(layer).float()
        rows = wi.pow(2).sum(1).double().cpu()
        per = rows.numel() // groups.shape[0]
        s = s * rows.view(groups.shape[0], per).sum(1).sqrt()
    return s


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k lowest scores, ascending by index; ties broken by index (deterministic)."""
    if k <= 0:
        return []
    order = sorted(range(scores.numel()), key=lambda i: (float(scores[i]), i))
    return sorted(order[:k])
