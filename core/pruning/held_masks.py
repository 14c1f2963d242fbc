"""Pruning masks held exactly while a model trains: after every optimizer step each pruned weight is exactly
+0.0, at the same positions as before training. Gradients at pruned positions are zeroed before the step (so
neither the update nor the optimizer's moments ever see them) and the mask is applied again after it (so that
no optimizer rule, weight decay included, can revive one)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from core.pruning.masks import unpack_mask


class HeldMasks:
    """Removal masks (True = pruned) by parameter, in each weight's storage layout (GPT-2's Conv1D: [in, out]).
    Parameters are held by object, not by name, so they survive wrapping (peft renames the modules)."""

    def __init__(self, model: nn.Module, removed: Mapping[str, torch.Tensor]):
        params = dict(model.named_parameters())
        self.names = list(removed)
        self.items: list[tuple[nn.Parameter, torch.Tensor]] = []
        for name, m in removed.items():
            p = params[name]
            if tuple(p.shape) != tuple(m.shape):
                raise ValueError(f"mask of {name} is {tuple(m.shape)}, the weight {tuple(p.shape)}")
            self.items.append((p, m.to(torch.bool)))

    @classmethod
    def from_packed(
        cls, model: nn.Module, packed: Mapping[str, torch.Tensor], shapes: Mapping[str, list[int]]
    ) -> HeldMasks:
        """From the engine's packed keep-bits (masks.safetensors' layout)."""
        return cls(model, {n: ~unpack_mask(packed[n], shapes[n]) for n in packed})

    def to(self, device: torch.device) -> None:
        """Keep each mask on its weight's device (call after moving the model)."""
        self.items = [(p, m.to(p.device)) for p, m in self.items]

    @torch.no_grad()
    def apply(self) -> None:
        for p, m in self.items:
            p.masked_fill_(m.to(p.device), 0)

    @torch.no_grad()
    def zero_grads(self) -> None:
        for p, m in self.items:
            if p.grad is not None:
                p.grad.masked_fill_(m.to(p.device), 0)

    def removed(self) -> dict[str, torch.Tensor]:
        return {n: m for n, (_, m) in zip(self.names, self.items, strict=True)}

    def violations(self) -> int:
        """Pruned positions whose weight is not bit-exactly +0.0 (0 when the masks hold)."""
        bad = 0
        for p, m in self.items:
            bits = p.detach()[m.to(p.device)].cpu()
            bad += int((bits.view(_int_of(bits.dtype)) != 0).sum())
        return bad

    def sparsity(self) -> float:
        total = sum(m.numel() for _, m in self.items)
        return sum(int(m.sum()) for _, m in self.items) / total if total else 0.0

    def numel(self) -> int:
        return sum(m.numel() for _, m in self.items)


def _int_of(dtype: torch.dtype) -> torch.dtype:
    return {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}.get(
        dtype, torch.int64 if dtype == torch.float64 else torch.int32
    )
