"""Magnitude pruning: score |W|, one threshold per matrix (reference) or per output row."""
from __future__ import annotations

import torch

from core.pruning import patterns
from core.pruning.methods.base import Method, Pruned, Stats, Target


class Magnitude(Method):
    name = "magnitude"
    needs_inputs = False

    def prune(self, w: torch.Tensor, stats: Stats | None, target: Target) -> Pruned:
        score = w.abs()
        if target.nm is not None:
            mask = patterns.nm_mask(score, *target.nm)
        elif self.config.magnitude_scope == "row":
            mask = patterns.lowest_per_row(score, target.sparsity)
        else:
            mask = patterns.lowest_overall(score, target.sparsity)
        return Pruned(w.masked_fill_(mask, 0), mask)
