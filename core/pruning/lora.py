"""LoRA recovery through peft: adapters on the pruned linear layers (GPT-2's Conv1D included), trained while the
base weights stay frozen, then merged into the weights and re-masked so the sparsity (and any N:M pattern)
holds exactly. What the merge changed is measured before the mask is applied again."""

from __future__ import annotations

import re
from typing import Any, cast

import torch
from torch import nn

from core.pruning.config import LoraConfig
from core.pruning.held_masks import HeldMasks


def target_modules(held: HeldMasks, cfg: LoraConfig) -> list[str]:
    """Full module names of the pruned layers that get adapters (all of them unless `targets` narrows)."""
    names = [n.removesuffix(".weight") for n in held.names]
    if cfg.targets:
        pats = [re.compile(p) for p in cfg.targets]
        names = [n for n in names if any(p.search(n) for p in pats)]
    return names


def wrap(model: nn.Module, held: HeldMasks, cfg: LoraConfig, seed: int) -> nn.Module:
    """The peft model: LoRA adapters on the target layers, every other parameter frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = target_modules(held, cfg)
    if not targets:
        raise ValueError("recovery.lora.targets matches none of the pruned layers")
    modules = dict(model.named_modules())
    conv1d = any(isinstance(modules[t], Conv1D) for t in targets)
    torch.manual_seed(seed)  # LoRA's A is random; B starts at 0, so the wrapped model equals the pruned one
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft declares int; a float scale works
        lora_dropout=cfg.dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,  # Conv1D stores [in, out]
        bias="none",
    )
    return cast(nn.Module, get_peft_model(cast(Any, model), peft_cfg))


@torch.no_grad()
def merge(peft_model: nn.Module, held: HeldMasks) -> tuple[nn.Module, dict[str, Any]]:
    """Merge the adapters into the base weights (peft), re-apply the masks, and report what the merge did:
    the largest change of a kept weight, and the largest adapter value the masks removed again."""
    from peft.tuners.lora import LoraLayer

    kept_change, removed_change = 0.0, 0.0
    masks = {id(p): m for p, m in held.items}
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            base = module.get_base_layer()
            delta = cast(Any, module).get_delta_weight("default").float()  # in the weight's storage layout
            m = masks.get(id(base.weight))
            if m is None:
                kept_change = max(kept_change, float(delta.abs().max()))
                continue
            m = m.to(delta.device)
            if (~m).any():
                kept_change = max(kept_change, float(delta[~m].abs().max()))
            if m.any():
                removed_change = max(removed_change, float(delta[m].abs().max()))
    merged = cast(nn.Module, cast(Any, peft_model).merge_and_unload())
    held.apply()
    return merged, {"merge_max_kept_weight_change": kept_change, "merge_max_removed_delta": removed_change}


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
