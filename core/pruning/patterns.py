"""Sparsity patterns as boolean masks over a score matrix S [out, in]; True marks a weight to remove."""
from __future__ import annotations

import torch


def lowest_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the int(in·p) lowest scores of every output row (Wanda's comparison group)."""
    k = int(score.shape[1] * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    return mask


def lowest_overall(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the int(numel·p) lowest scores of the whole matrix (one threshold per layer)."""
    k = int(score.numel() * sparsity)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        mask[torch.topk(score.flatten(), k, largest=False).indices] = True
    return mask.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive inputs of a row; a trailing partial group keeps at most n."""
    rows, cols = score.shape
    full = cols - cols % m
    mask = torch.zeros_like(score, dtype=torch.bool)
    if full:
        g = score[:, :full].reshape(rows, full // m, m)
        drop = torch.topk(g, m - n, dim=2, largest=False).indices
        mask[:, :full] = torch.zeros_like(g, dtype=torch.bool).scatter_(2, drop, True).reshape(rows, full)
    tail = cols - full
    if tail > n:
        drop = torch.topk(score[:, full:], tail - n, dim=1, largest=False).indices
        mask[:, full:].scatter_(1, drop, True)
    return mask


def satisfies_nm(w: torch.Tensor, n: int, m: int) -> bool:
    """At most n non-zeros in every group of m consecutive inputs of each row (tail group included)."""
    nz = w != 0
    rows, cols = nz.shape
    full = cols - cols % m
    ok = bool((nz[:, :full].reshape(rows, -1, m).sum(2) <= n).all()) if full else True
    return ok and bool((nz[:, full:].sum(1) <= n).all())


def sparsity(w: torch.Tensor) -> float:
    return float((w == 0).sum()) / w.numel()
