"""Sparsity patterns as boolean masks over a score matrix S [out, in]; True marks a weight to remove."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import numpy as np
import torch

ROW_CHUNK_ELEMENTS = 1 << 18  # per-row selections score this many weights at a time (1 MB of float32)


def row_chunks(rows: int, cols: int) -> Iterator[slice]:
    """Slices of whole rows, ~ROW_CHUNK_ELEMENTS each: a per-row selection never needs a float32 score of the
    whole layer (180 MB for a 7B model's down_proj), only of a few rows at a time."""
    step = max(1, ROW_CHUNK_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        yield slice(r0, min(r0 + step, rows))


def per_row_mask(
    score_rows: Callable[[slice], torch.Tensor],
    shape: torch.Size,
    device: torch.device,
    sparsity: float,
    nm: tuple[int, int] | None,
) -> torch.Tensor:
    """The removal mask of a selection in which rows compete only within themselves (N:M, or the lowest
    int(in·p) of each row), from scores made a few rows at a time by score_rows(rows)."""
    mask = torch.empty(shape, dtype=torch.bool, device=device)
    for rows in row_chunks(*shape):
        s = score_rows(rows)
        mask[rows] = nm_mask(s, *nm) if nm is not None else lowest_per_row(s, sparsity)
    return mask


def lowest_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the int(in·p) lowest scores of every output row (Wanda's comparison group)."""
    return _lowest_k(score, int(score.shape[1] * sparsity))


def lowest_overall(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the int(numel·p) lowest scores of the whole matrix (one threshold per layer)."""
    return _lowest_k(score.reshape(1, -1), int(score.numel() * sparsity)).view_as(score)


def kth_smallest(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (k ≥ 1) of each row, as a column [rows, 1]. On the CPU numpy's introselect,
    which returns no indices, is ~4× faster than torch.kthvalue (measured on 768-2048-wide rows)."""
    if score.device.type == "cpu" and score.dtype in (torch.float32, torch.float64):
        a = score.detach().contiguous().numpy()
        return torch.from_numpy(np.partition(a, k - 1, axis=1)[:, k - 1 : k].copy())
    return score.kthvalue(k, dim=1, keepdim=True).values


NETWORK_MAX_M = 8  # up to this many rows a sorting network of elementwise min/max is the faster selection


def kth_smallest_of_columns(g: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value of every column of a short matrix g [m, cols], as [1, cols]. A top-k or
    k-th value along dim 0 pays per column; for m ≤ NETWORK_MAX_M, Batcher's network pays per comparator,
    over whole rows: 5× faster for SparseGPT's 2:4 groups of 4096 rows."""
    m = g.shape[0]
    if m > NETWORK_MAX_M:
        return g.kthvalue(k, dim=0, keepdim=True).values
    v = list(g.unbind(0))
    for i, j in _sorting_network(m):
        v[i], v[j] = torch.minimum(v[i], v[j]), torch.maximum(v[i], v[j])
    return v[k - 1].unsqueeze(0)


@functools.cache
def _sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd–even merge sort as compare-exchange pairs (i < j: the smaller value goes to i). Built for
    the next power of two; pairs that reach past n would only compare with +inf, so they are left out."""
    pairs, p = [], 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


def _lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k lowest entries of each row; among equal scores the lowest indices go first, as a stable
    sort orders them. A k-th value threshold costs far less than a top-k of half the row."""
    if not k:
        return torch.zeros_like(score, dtype=torch.bool)
    kth = kth_smallest(score, k)
    mask = score <= kth  # k entries, or more where scores tie at the threshold
    over = (_count_per_row(mask) > k).nonzero().squeeze(1)
    if over.numel():  # more ties than needed: dead inputs give runs of zero scores, bf16 weights equal values
        s, t = score[over], kth[over]
        below = s < t
        need = k - _count_per_row(below)  # ties to remove in each row, the first ones in index order
        row, col = (s == t).nonzero().unbind(1)  # row-major: within a row, ascending columns
        per_row = torch.bincount(row, minlength=len(over))
        first = per_row.cumsum(0) - per_row  # where each row's ties start in (row, col)
        take = torch.arange(len(row), device=row.device) - first[row] < need[row]  # rank of a tie in its row
        below[row[take], col[take]] = True
        mask[over] = below
    return mask


def _count_per_row(mask: torch.Tensor) -> torch.Tensor:
    """True entries per row. A bool sum along a dim goes through int64 (8 bytes an entry: 360 MB for a 7B
    model's whole down_proj as one row); a whole-tensor count_nonzero makes no copy."""
    return torch.count_nonzero(mask).view(1) if mask.shape[0] == 1 else mask.sum(1)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive inputs of a row; a trailing partial group keeps at most n.
    Among equal scores the lower index is removed first."""
    rows, cols = score.shape
    full = cols - cols % m
    mask = torch.zeros_like(score, dtype=torch.bool)
    if full:
        g = score[:, :full].reshape(rows, full // m, m)
        mask[:, :full] = _group_lowest(g, m - n).reshape(rows, full)
    tail = cols - full
    if tail > n:
        mask[:, full:] = _lowest_k(score[:, full:], tail - n)
    return mask


RANK_MAX_M = 8  # up to this group size, ranking by pairwise comparisons beats sorting tiny groups (2.5× at 2:4)


def _group_lowest(g: torch.Tensor, k: int) -> torch.Tensor:
    """The k lowest of every group g[..., :] (ties: lower index first). Entry i's rank counts the entries
    that sort before it; each of the m(m−1)/2 pairs is compared once, on whole columns, with no sorting."""
    m = g.shape[-1]
    if m > RANK_MAX_M:
        drop = torch.sort(g, dim=-1, stable=True).indices[..., :k]
        return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, drop, True)
    cols = [g[..., i].contiguous() for i in range(m)]
    rank = [torch.zeros(g.shape[:-1], dtype=torch.uint8, device=g.device) for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            j_first = cols[j] < cols[i]  # on a tie i (the lower index) comes first
            rank[i] += j_first
            rank[j] += ~j_first
    return torch.stack(rank, dim=-1) < k


def satisfies_nm(w: torch.Tensor, n: int, m: int) -> bool:
    """At most n non-zeros in every group of m consecutive inputs of each row (tail group included)."""
    nz = w != 0
    rows, cols = nz.shape
    full = cols - cols % m
    ok = bool((nz[:, :full].reshape(rows, -1, m).sum(2) <= n).all()) if full else True
    return ok and bool((nz[:, full:].sum(1) <= n).all())


def sparsity(w: torch.Tensor) -> float:
    # count_nonzero of a bool is ~5× faster than of floats; a bool .sum() would go through int64
    return int(torch.count_nonzero(w == 0)) / w.numel()
