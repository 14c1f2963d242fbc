"""Wanda (Sun et al., 2023): S_ij = |W_ij| · ‖X_j‖₂, compared within each output row; no weight update."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from core.pruning import patterns
from core.pruning.config_schema import NM_GIVEN, PATTERNS_GIVEN
from core.pruning.methods.base import Method, MethodOptions, Pruned, Stats, Target, tokens_first
from core.schema_rules import given

if TYPE_CHECKING:
    from core.pruning.config import PruneConfig


class InputNorms(Stats):
    """s_j ← s_j·n/(n+b) + ‖X_{:,j}‖₂²/(n+b), n counting samples (sequences), as the reference keeps it."""

    def __init__(self, in_features: int, device: torch.device):
        self.sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add_batch(self, x: torch.Tensor) -> None:
        b = x.shape[0] if x.dim() > 2 else 1
        xf = tokens_first(x)
        squares = xf.square() if xf.data_ptr() == x.data_ptr() else xf.square_()  # in place when a copy
        self.sq.mul_(self.n / (self.n + b))
        self.n += b
        self.sq.add_(squares.sum(0).div_(self.n))


class Wanda(Method):
    name = "wanda"
    masks_only = True

    class Options(MethodOptions):
        wanda_alpha_search: bool = Field(False, description="Wanda's cumulative-score variant with α bisection")

        def conflicts(self, config: PruneConfig) -> list[tuple[str, str]]:
            if self.wanda_alpha_search and (config.pattern is not None or config.patterns):
                return [("wanda_alpha_search", "the α search chooses unstructured masks; an N:M pattern has none")]
            return []

        @classmethod
        def config_rules(cls) -> list[dict[str, Any]]:
            alpha_search = {"properties": {"wanda_alpha_search": {"const": True}}, "required": ["wanda_alpha_search"]}
            nm = {"anyOf": [NM_GIVEN, PATTERNS_GIVEN]}
            return [{"not": {"allOf": [given("method_options", alpha_search), nm]}}]

    options: Options

    def stats(self, in_features: int, device: torch.device) -> Stats:
        return InputNorms(in_features, device)

    def prune(self, w: torch.Tensor, stats: Stats | None, target: Target) -> Pruned:
        assert isinstance(stats, InputNorms)
        norms = stats.sq.sqrt()

        def score(rows: slice) -> torch.Tensor:  # S = |W| · ‖X_j‖, in float32
            return w[rows].to(torch.float32, copy=True).abs_().mul_(norms)

        info = {}
        if target.nm is None and self.options.wanda_alpha_search:  # α is bisected over the whole layer
            mask, info["alpha"] = cumulative_mask(score(slice(None)), target.sparsity)
        else:
            mask = patterns.per_row_mask(score, w.shape, w.device, target.sparsity, target.nm)
        return Pruned(w.masked_fill_(mask, 0), mask, info)


def cumulative_mask(score: torch.Tensor, sparsity: float, tol: float = 1e-3) -> tuple[torch.Tensor, float]:
    """Variant: per row remove entries whose cumulative sorted score ≤ α·row sum; bisect α in [0, 0.8]."""
    srt, idx = torch.sort(score, dim=1, stable=True)
    cum = torch.cumsum(srt, dim=1)
    total = score.sum(dim=1, keepdim=True)

    def mask_for(alpha: float) -> torch.Tensor:
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, cum <= alpha * total)

    lo, hi, alpha = 0.0, 0.8, 0.4
    mask = mask_for(alpha)
    while abs(mask.float().mean().item() - sparsity) > tol and hi - lo >= tol:
        if mask.float().mean().item() > sparsity:
            hi = alpha
        else:
            lo = alpha
        alpha = (lo + hi) / 2
        mask = mask_for(alpha)
    return mask, alpha
