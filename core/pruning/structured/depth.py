"""Depth pruning: remove whole blocks ranked by ShortGPT block influence (lowest first)."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from core.pruning import models
from core.pruning.structured.arch import PER_LAYER_KEYS
from core.pruning.structured.scores import lowest


def least_influential(influence: list[float], n_remove: int) -> list[int]:
    """Blocks whose output is most like their input (BI = 1 − mean cos) contribute least."""
    return lowest(torch.tensor(influence, dtype=torch.float64), n_remove)


def drop_blocks(model: nn.Module, remove: list[int]) -> None:
    """Delete blocks in place, renumber layer_idx (KV cache slots) and the per-layer config entries."""
    prefix, blocks = models.find_blocks(model)
    keep = [i for i in range(len(blocks)) if i not in set(remove)]
    parent = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
    new = nn.ModuleList([blocks[i] for i in keep])
    setattr(parent, prefix.rsplit(".", 1)[-1], new)
    for j, block in enumerate(new):
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                cast(Any, m).layer_idx = j
    cfg: Any = model.config
    n_old = cfg.num_hidden_layers
    cfg.num_hidden_layers = len(keep)
    for key in PER_LAYER_KEYS:
        v = getattr(cfg, key, None)
        if isinstance(v, (list, tuple)) and len(v) == n_old:
            setattr(cfg, key, type(v)(v[i] for i in keep))
