"""SparseGPT (Frantar & Alistarh, 2023): prune column by column with OBS updates through the Cholesky
factor of the damped inverse Hessian, in blocks of `blocksize` columns."""
from __future__ import annotations

import logging

import torch

from core.pruning.errors import NumericalError
from core.pruning.methods.base import Method, Pruned, Stats, Target, tokens_first

log = logging.getLogger(__name__)
MAX_DAMP_RETRIES = 6  # damping ×10 each time: 0.01 → 1e4 · mean(diag H)


class Hessian(Stats):
    """H ← H·n/(n+b) + (2/(n+b))·XᵀX, X = tokens × in_features, accumulated in float32. Layers that read the
    same input (q/k/v, gate/up) share one Hessian and one factorisation."""

    def __init__(self, in_features: int, device: torch.device):
        self.H: torch.Tensor | None = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0
        self._factor: tuple[torch.Tensor, torch.Tensor, float, int] | None = None

    def add_batch(self, x: torch.Tensor) -> None:
        assert self.H is not None, "statistics already consumed"
        b = x.shape[0] if x.dim() > 2 else 1
        x = tokens_first(x)
        self.H.mul_(self.n / (self.n + b))
        self.n += b
        self.H.addmm_(x.t(), x, alpha=2 / self.n)

    def factor(self, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        """(U, dead inputs, damping used, retries), computed once; H is consumed to save memory."""
        if self._factor is None:
            H, self.H = self.H, None
            dead = torch.diag(H) == 0  # inputs never active: H_jj = 1 (and W_:j = 0 in prune)
            H[dead, dead] = 1
            self._factor = inverse_hessian_cholesky(H, percdamp, dead)
        return self._factor


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float,
                             dead: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """U = upper Cholesky factor of (H + λI)⁻¹, λ = percdamp·mean(diag H); retry with 10× damping.
    H is modified in place."""
    idx = torch.arange(H.shape[0], device=H.device)
    mean = torch.mean(torch.diag(H)).item()
    added = 0.0
    dead = torch.zeros(H.shape[0], dtype=torch.bool, device=H.device) if dead is None else dead
    for attempt in range(MAX_DAMP_RETRIES + 1):
        damp = percdamp * 10**attempt
        H[idx, idx] += damp * mean - added
        added = damp * mean
        L, info = torch.linalg.cholesky_ex(H)
        if info == 0:
            # (H + λI)⁻¹ from its Cholesky factor; cholesky_inverse is slow on CPU, a triangular solve is not
            eye = None if L.is_cuda else torch.eye(H.shape[0], device=H.device)
            Hinv = torch.cholesky_inverse(L) if eye is None else torch.cholesky_solve(eye, L)
            del L, eye
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info == 0 and torch.isfinite(U).all():
                if attempt:
                    log.warning("SparseGPT: Cholesky failed at damping %.3g; succeeded with %.3g", percdamp, damp)
                return U, dead, damp, attempt
    raise NumericalError(f"Cholesky of the damped Hessian failed even at damping {damp:g}·mean(diag H)")


class SparseGPT(Method):
    name = "sparsegpt"

    def stats(self, in_features: int, device: torch.device) -> Stats:
        return Hessian(in_features, device)

    def prune(self, w: torch.Tensor, stats: Stats | None, target: Target) -> Pruned:
        assert isinstance(stats, Hessian)
        U, dead, damp, retries = stats.factor(self.config.percdamp)
        W = w.clone()
        rows, cols = W.shape
        W[:, dead] = 0

        nm = target.nm
        bs = self.config.blocksize
        if nm is not None:  # N:M groups must not straddle a block boundary
            bs = max(nm[1], bs - bs % nm[1])
        mask = torch.zeros_like(W, dtype=torch.bool)
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            U1 = U[i1:i2, i1:i2]
            d = torch.diag(U1)
            M1 = torch.zeros_like(W1, dtype=torch.bool)
            if nm is None:  # adaptive mask: the lowest W²/[U]_jj² over the whole block (all rows)
                score = W1.pow(2) / d.pow(2).unsqueeze(0)
                k = int(score.numel() * target.sparsity)
                if k:  # a k-th value threshold, as the reference; cheaper than a top-k of half the block
                    M1 = score <= score.flatten().kthvalue(k).values
            for i in range(i2 - i1):
                if nm is not None and i % nm[1] == 0:  # choose this group with the already-updated weights
                    g = W1[:, i : i + nm[1]].pow(2) / d[i : i + nm[1]].pow(2).unsqueeze(0)
                    drop = g.shape[1] - nm[0]
                    if drop > 0:
                        M1.scatter_(1, i + torch.topk(g, drop, dim=1, largest=False).indices, True)
                w_col = W1[:, i]
                q = w_col.masked_fill(M1[:, i], 0)
                Q1[:, i] = q
                err = (w_col - q) / d[i]  # OBS: δ = −(w_p / [H⁻¹]_pp)·[H⁻¹]_p,:
                W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
                Err1[:, i] = err
            W[:, i1:i2] = Q1
            mask[:, i1:i2] = M1
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of all later columns
        mask |= dead.unsqueeze(0) & (w != 0)
        W.masked_fill_(mask, 0)
        return Pruned(W, mask, {"damping": damp, "damping_retries": retries})
