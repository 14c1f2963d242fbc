"""SparseGPT (Frantar & Alistarh, 2023): prune column by column with OBS updates through the Cholesky
factor of the damped inverse Hessian, in blocks of `blocksize` columns. The factorisation, computed in place
for memory, is in core/pruning/linalg.py."""

from __future__ import annotations

import torch
from pydantic import Field

from core.pruning import patterns
from core.pruning.exact_products import exact_fp32_products
from core.pruning.linalg import UpperGram, factor_in_place
from core.pruning.memory import release_freed_memory
from core.pruning.methods.base import Method, MethodOptions, Pruned, Stats, Target, tokens_first


class Hessian(Stats):
    """H ← H·n/(n+b) + (2/(n+b))·XᵀX, X = tokens × in_features, accumulated in float32. Layers that read the
    same input (q/k/v, gate/up) share one Hessian and one factorisation.

    Only H's upper triangle is held, in stripes (a block's Hessians are all live while the statistics pass runs
    its forward, the pass that sets a bf16 run's peak); the d×d matrix is assembled only when it is factored,
    one Hessian at a time."""

    def __init__(self, in_features: int, device: torch.device):
        self.d = in_features
        self.H = UpperGram(in_features, device)
        self.n = 0
        self._factor: tuple[torch.Tensor, torch.Tensor, float, int] | None = None

    def add_batch(self, x: torch.Tensor) -> None:
        b = x.shape[0] if x.dim() > 2 else 1
        source = x.dtype
        x = tokens_first(x)
        scale = self.n / (self.n + b)
        self.n += b
        # bf16 activations (a bf16 model) are multiplied on bf16 units, exactly, with float32 sums
        with exact_fp32_products(source, x.device):
            self.H.scale_add(x, scale, alpha=2 / self.n)  # H ← H·n/(n+b) + (2/(n+b))·XᵀX

    @property
    def nbytes(self) -> int:
        """Memory the accumulated statistic holds."""
        return self.H.nbytes

    @property
    def matrix(self) -> torch.Tensor:
        """The full symmetric H (a copy); for inspection."""
        return self.H.full()

    def factor(self, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        """(U, dead inputs, damping used, retries), computed once, in the assembled H's own memory."""
        if self._factor is None:
            self._factor = factor_in_place(self.H.assembled(consume=True), percdamp)
            release_freed_memory()  # the factorisation's panel-sized temporaries
        return self._factor


class SparseGPT(Method):
    name = "sparsegpt"
    copies_weights = True

    class Options(MethodOptions):
        blocksize: int = Field(128, ge=1, description="SparseGPT column block")
        percdamp: float = Field(0.01, gt=0, le=10, description="SparseGPT damping, fraction of mean(diag H)")

    options: Options

    def stats(self, in_features: int, device: torch.device) -> Stats:
        return Hessian(in_features, device)

    def prune(self, w: torch.Tensor, stats: Stats | None, target: Target) -> Pruned:
        return self.prune_many([w], stats, target)[0]

    def prune_many(self, ws: list[torch.Tensor], stats: Stats | None, target: Target) -> list[Pruned]:
        """Layers sharing one Hessian are swept together, their rows stacked: every row's OBS update depends
        only on that row and H⁻¹, so this equals pruning them one by one (the unstructured threshold is still
        taken per layer), with a third of the column steps for q/k/v.
        U is the upper Cholesky factor of the damped inverse Hessian: UᵀU = (H + λI)⁻¹, λ = percdamp·mean(diag H)."""
        assert isinstance(stats, Hessian)
        U, dead, damp, retries = stats.factor(self.options.percdamp)
        rows = [w.shape[0] for w in ws]
        # work on float32 Wᵀ [in, out], the layers' rows side by side: column i of W is the contiguous row i here
        Wt = torch.empty(ws[0].shape[1], sum(rows), dtype=torch.float32, device=U.device)
        r0 = 0
        for w in ws:
            Wt[:, r0 : r0 + w.shape[0]].copy_(w.t())
            r0 += w.shape[0]
        # gradual pruning: the weights an earlier stage removed (exactly 0 now) are the first to go again
        held = (Wt == 0) if self.config.gradual is not None else None
        was_nonzero_dead = (Wt[dead] != 0) if dead.any() else None
        Wt[dead] = 0  # inputs never active (H_jj = 0): W_:j = 0
        mask = sweep(Wt, U, target, self.options.blocksize, rows, held)
        if held is not None:
            mask |= held
        if was_nonzero_dead is not None:
            mask[dead] |= was_nonzero_dead
        Wt.masked_fill_(mask, 0)
        info = {"damping": damp, "damping_retries": retries}
        out, r0 = [], 0
        for r in rows:
            out.append(Pruned(Wt[:, r0 : r0 + r].t(), mask[:, r0 : r0 + r].t(), dict(info)))
            r0 += r
        return out


def sweep(
    Wt: torch.Tensor,
    U: torch.Tensor,
    target: Target,
    blocksize: int,
    segments: list[int],
    held: torch.Tensor | None = None,
) -> torch.Tensor:
    """The SparseGPT sweep over Wᵀ [in, out] in place; returns the removal mask in the same layout. `segments`
    are the row counts (of W) of the layers stacked in Wt: each gets its own unstructured threshold. `held`
    (unstructured only): entries removed already, scored lowest so that they are chosen first."""
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
        if nm is None:  # adaptive mask: the lowest w²/U_jj² over the block's rows of each layer
            score = W1.pow(2).div_(d2)
            if held is not None:
                score.masked_fill_(held[i1:i2], -1.0)
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
                if k > 0:  # the k lowest per row of W; a tie with the k-th (zeros, in practice) goes as well
                    torch.le(g, patterns.kth_smallest_of_columns(g, k), out=drop[i : i + nm[1]])
            err = torch.mul(W1[i], drop[i], out=Err1[i]).div_(d[i])  # err = (w − q)/U_ii
            W1[i:].addr_(U1[i, i:], err, alpha=-1)  # W[:, i:] −= err ⊗ U[i, i:] (OBS update of the block's rest)
        mask[i1:i2] = drop != 0
        Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)  # W[:, i2:] −= Err·U[i1:i2, i2:], all later columns at once
    return mask
