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
    """H ← H·n/(n+b) + (2/(n+b))·XᵀX, X = tokens × in_features, accumulated in float32."""

    def __init__(self, in_features: int, device: torch.device):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add_batch(self, x: torch.Tensor) -> None:
        b = x.shape[0] if x.dim() > 2 else 1
        x = tokens_first(x)
        self.H.mul_(self.n / (self.n + b))
        self.n += b
        x = x * (2 / self.n) ** 0.5  # not in place: x may be a view of the layer's real input
        self.H.addmm_(x.t(), x)


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float, int]:
    """U = upper Cholesky factor of (H + λI)⁻¹, λ = percdamp·mean(diag H); retry with 10× damping."""
    diag = torch.arange(H.shape[0], device=H.device)
    mean = torch.mean(torch.diag(H)).item()
    for attempt in range(MAX_DAMP_RETRIES + 1):
        damp = percdamp * 10**attempt
        Hd = H.clone()
        Hd[diag, diag] += damp * mean
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0 and torch.isfinite(U).all():
                if attempt:
                    log.warning("SparseGPT: Cholesky failed at damping %.3g; succeeded with %.3g", percdamp, damp)
                return U, damp, attempt
    raise NumericalError(f"Cholesky of the damped Hessian failed even at damping {damp:g}·mean(diag H)")


class SparseGPT(Method):
    name = "sparsegpt"

    def stats(self, in_features: int, device: torch.device) -> Stats:
        return Hessian(in_features, device)

    def prune(self, w: torch.Tensor, stats: Stats | None, target: Target) -> Pruned:
        assert isinstance(stats, Hessian)
        H = stats.H
        W = w.clone()
        rows, cols = W.shape
        dead = torch.diag(H) == 0  # inputs never active: H_jj = 1, W_:j = 0
        H = H.clone()
        H[dead, dead] = 1
        W[:, dead] = 0
        U, damp, retries = inverse_hessian_cholesky(H, self.config.percdamp)

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
                if k:
                    M1.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = True
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
                W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i1:i2] = Q1
            mask[:, i1:i2] = M1
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of all later columns
        mask |= dead.unsqueeze(0) & (w != 0)
        W.masked_fill_(mask, 0)
        return Pruned(W, mask, {"damping": damp, "damping_retries": retries})
