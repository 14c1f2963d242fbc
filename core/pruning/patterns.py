"""Sparsity patterns as boolean masks over a score matrix S [out, in]; True marks a weight to remove."""
from __future__ import annotations

import torch


def lowest_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the int(in·p) lowest scores of every output row (Wanda's comparison group)."""
    return _lowest_k(score, int(score.shape[1] * sparsity))


def lowest_overall(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the int(numel·p) lowest scores of the whole matrix (one threshold per layer)."""
    return _lowest_k(score.reshape(1, -1), int(score.numel() * sparsity)).view_as(score)


def _lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k lowest entries of each row; among equal scores the lowest indices go first, as a stable
    sort orders them. A k-th value threshold costs about half a top-k of half the row."""
    if not k:
        return torch.zeros_like(score, dtype=torch.bool)
    kth = score.kthvalue(k, dim=1, keepdim=True).values
    mask = score < kth
    ties = score == kth
    short = k - mask.sum(1, keepdim=True)  # how many of the ties each row still removes (≥ 1)
    split = (ties.sum(1, keepdim=True) > short).squeeze(1)
    if split.any():  # rare: more ties than needed (dead inputs give whole runs of zero scores)
        t = ties[split]
        ties[split] = t & (t.cumsum(1) <= short[split])
    return mask | ties


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
