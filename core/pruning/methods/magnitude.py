"""Magnitude pruning: score |W|, one threshold per matrix (reference) or per output row."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from core.pruning import patterns
from core.pruning.methods.base import Method, MethodOptions, Pruned, Stats, Target


class Magnitude(Method):
    name = "magnitude"
    needs_inputs = False
    masks_only = True

    class Options(MethodOptions):
        magnitude_scope: Literal["layer", "row"] = Field(
            "layer", description="one threshold per matrix (layer, the reference) or per output row"
        )

    options: Options

    def prune(self, w: torch.Tensor, stats: Stats | None, target: Target) -> Pruned:
        if target.nm is None and self.options.magnitude_scope != "row":  # one threshold for the whole matrix
            mask = patterns.lowest_overall(w.to(torch.float32, copy=True).abs_(), target.sparsity)
        else:
            mask = patterns.per_row_mask(
                lambda rows: w[rows].to(torch.float32, copy=True).abs_(), w.shape, w.device, target.sparsity, target.nm
            )
        return Pruned(w.masked_fill_(mask, 0), mask)
