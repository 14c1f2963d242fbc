"""SparseGPT (Frantar & Alistarh, 2023): prune column by column with OBS updates through the Cholesky
factor of the damped inverse Hessian, in blocks of `blocksize` columns."""
from __future__ import annotations

import logging

import torch

from core.pruning import patterns
from core.pruning.errors import NumericalError
from core.pruning.exact_products import exact_fp32_products
from core.pruning.memory import release_freed_memory
from core.pruning.methods.base import Method, Pruned, Stats, Target, tokens_first

log = logging.getLogger(__name__)
MAX_DAMP_RETRIES = 6  # damping ×10 each time: 0.01 → 1e4 · mean(diag H)
HESSIAN_STRIPES = 4  # XᵀX is symmetric: accumulate only the upper triangle, in this many row stripes


class Hessian(Stats):
    """H ← H·n/(n+b) + (2/(n+b))·XᵀX, X = tokens × in_features, accumulated in float32. Layers that read the
    same input (q/k/v, gate/up) share one Hessian and one factorisation."""

    def __init__(self, in_features: int, device: torch.device):
        self.H: torch.Tensor | None = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0
        d = in_features
        self._edges = sorted({round(d * s / HESSIAN_STRIPES) for s in range(HESSIAN_STRIPES + 1)})
        self._factor: tuple[torch.Tensor, torch.Tensor, float, int] | None = None

    def add_batch(self, x: torch.Tensor) -> None:
        assert self.H is not None, "statistics already consumed"
        b = x.shape[0] if x.dim() > 2 else 1
        source = x.dtype
        x = tokens_first(x)
        self.H.mul_(self.n / (self.n + b))
        self.n += b
        # the stripes H[a:b, a:] cover the upper triangle with ~5/8 of a full XᵀX's multiply-adds;
        # bf16 activations (a bf16 model) are multiplied on bf16 units, exactly, with float32 sums
        with exact_fp32_products(source, x.device):
            for a0, a1 in zip(self._edges, self._edges[1:]):
                self.H[a0:a1, a0:].addmm_(x[:, a0:a1].t(), x[:, a0:], alpha=2 / self.n)

    @property
    def matrix(self) -> torch.Tensor:
        """The full symmetric H (a copy); for inspection."""
        assert self.H is not None, "statistics already consumed"
        return self.H.triu() + self.H.triu(1).t()

    def factor(self, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        """(U, dead inputs, damping used, retries), computed once; H is consumed to save memory."""
        if self._factor is None:
            Hr = self.H.flip(0, 1).tril_()  # J H J: its lower triangle is H's upper one, all that was summed
            self.H = None
            self._factor = _factor_reversed(Hr, percdamp)
            release_freed_memory()  # H and the Cholesky factor: two d×d matrices that the sweep never needs
        return self._factor


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """(U, dead, λ used, retries): U is the upper Cholesky factor of (H + λI)⁻¹, i.e. UᵀU = (H + λI)⁻¹, with
    λ = percdamp·mean(diag H), retried with 10× damping; dead inputs (H_jj = 0) get H_jj = 1. H is left as is."""
    return _factor_reversed(H.flip(0, 1), percdamp)


def _factor_reversed(Hr: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """The same from Hr = J H J (J reverses the order), whose lower triangle is read and whose memory is reused.

    If J(H + λI)J = RRᵀ (R lower), then (H + λI)⁻¹ = (JR⁻¹J)ᵀ(JR⁻¹J) and JR⁻¹J is upper triangular: one
    Cholesky and one triangular inverse, where inverting H and factoring the inverse would take two Cholesky
    factorisations and a full solve, and two more matrices in memory."""
    dead = Hr.diagonal() == 0  # inputs never active: H_jj = 1 (and W_:j = 0 in prune)
    Hr.diagonal()[dead] = 1
    mean = Hr.diagonal().mean().item()
    added = 0.0
    for attempt in range(MAX_DAMP_RETRIES + 1):
        damp = percdamp * 10**attempt
        Hr.diagonal().add_(damp * mean - added)
        added = damp * mean
        R, info = torch.linalg.cholesky_ex(Hr)
        if info == 0:
            Hr.zero_().diagonal().fill_(1)
            Rinv = torch.linalg.solve_triangular(R, Hr, upper=False, out=Hr)  # in place of the identity
            if torch.isfinite(Rinv.sum()):  # any inf or nan makes the sum so; cheaper than a full test
                del R
                if attempt:
                    log.warning("SparseGPT: Cholesky failed at damping %.3g; succeeded with %.3g", percdamp, damp)
                return Rinv.flip(0, 1), dead.flip(0), damp, attempt
            Hr = R @ R.mT  # rare: rebuild the damped matrix, to retry with more damping
    raise NumericalError(f"Cholesky of the damped Hessian failed even at damping {damp:g}·mean(diag H)")


class SparseGPT(Method):
    name = "sparsegpt"
    copies_weights = True

    def stats(self, in_features: int, device: torch.device) -> Stats:
        return Hessian(in_features, device)

    def prune(self, w: torch.Tensor, stats: Stats | None, target: Target) -> Pruned:
        return self.prune_many([w], stats, target)[0]

    def prune_many(self, ws: list[torch.Tensor], stats: Stats | None, target: Target) -> list[Pruned]:
        """Layers sharing one Hessian are swept together, their rows stacked: every row's OBS update depends
        only on that row and H⁻¹, so this equals pruning them one by one (the unstructured threshold is still
        taken per layer), with a third of the column steps for q/k/v."""
        assert isinstance(stats, Hessian)
        U, dead, damp, retries = stats.factor(self.config.percdamp)
        rows = [w.shape[0] for w in ws]
        # work on float32 Wᵀ [in, out], the layers' rows side by side: column i of W is the contiguous row i here
        Wt = torch.empty(ws[0].shape[1], sum(rows), dtype=torch.float32, device=U.device)
        r0 = 0
        for w in ws:
            Wt[:, r0 : r0 + w.shape[0]].copy_(w.t())
            r0 += w.shape[0]
        was_nonzero_dead = (Wt[dead] != 0) if dead.any() else None
        Wt[dead] = 0
        mask = sweep(Wt, U, target, self.config.blocksize, rows)
        if was_nonzero_dead is not None:
            mask[dead] |= was_nonzero_dead
        Wt.masked_fill_(mask, 0)
        info = {"damping": damp, "damping_retries": retries}
        out, r0 = [], 0
        for r in rows:
            out.append(Pruned(Wt[:, r0 : r0 + r].t(), mask[:, r0 : r0 + r].t(), dict(info)))
            r0 += r
        return out


def sweep(Wt: torch.Tensor, U: torch.Tensor, target: Target, blocksize: int, segments: list[int]) -> torch.Tensor:
    """The SparseGPT sweep over Wᵀ [in, out] in place; returns the removal mask in the same layout. `segments`
    are the row counts (of W) of the layers stacked in Wt: each gets its own unstructured threshold."""
    cols, _ = Wt.shape
    nm = target.nm
    bs = blocksize if nm is None else max(nm[1], blocksize - blocksize % nm[1])  # N:M groups never straddle
    mask = torch.zeros_like(Wt, dtype=torch.bool)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1, U1 = Wt[i1:i2], U[i1:i2, i1:i2]  # views: updated in place
        d = torch.diag(U1)
        d2 = d.pow(2).unsqueeze(1)
        drop = torch.zeros_like(W1)  # 1.0 where removed, so that err = w·drop/d is (w − q)/d exactly
        if nm is None:  # adaptive mask: the lowest w²/[U]_jj² over the block's rows of each layer
            score = W1.pow(2).div_(d2)
            r0 = 0
            for r in segments:
                s = score[:, r0 : r0 + r]
                k = int(s.numel() * target.sparsity)
                if k:  # a k-th value threshold, as the reference; cheaper than a top-k of half the block
                    drop[:, r0 : r0 + r].masked_fill_(s <= patterns.kth_smallest(s.reshape(1, -1), k), 1.0)
                r0 += r
            del score
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:  # choose this group with the already-updated weights
                g = W1[i : i + nm[1]].pow(2).div_(d2[i : i + nm[1]])
                k = g.shape[0] - nm[0]
                if k > 0:
                    drop[i : i + nm[1]].scatter_(0, torch.topk(g, k, dim=0, largest=False).indices, 1.0)
            err = torch.mul(W1[i], drop[i], out=Err1[i]).div_(d[i])  # OBS: δ = −(w_p / [H⁻¹]_pp)·[H⁻¹]_p,:
            W1[i:].addr_(U1[i, i:], err, alpha=-1)
        mask[i1:i2] = drop != 0
        Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)  # lazy batch update of all later columns
    return mask
