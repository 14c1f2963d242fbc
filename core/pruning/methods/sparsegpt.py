"""SparseGPT (Frantar & Alistarh, 2023): prune column by column with OBS updates through the Cholesky
factor of the damped inverse Hessian, in blocks of `blocksize` columns."""
from __future__ import annotations

import logging

import torch
from pydantic import Field

from core.pruning import patterns
from core.pruning.errors import NumericalError
from core.pruning.exact_products import exact_fp32_products
from core.pruning.memory import release_freed_memory
from core.pruning.methods.base import Method, MethodOptions, Pruned, Stats, Target, tokens_first

log = logging.getLogger(__name__)
MAX_DAMP_RETRIES = 6  # damping ×10 each time: 0.01 → 1e4 · mean(diag H)
HESSIAN_STRIPES = 4  # XᵀX is symmetric: accumulate only the upper triangle, in this many row stripes
FACTOR_BLOCK = 256  # the in-place factorisation works in blocks this wide at least (10-25% faster than 128 to d=2048),
FACTOR_MAX_BLOCKS = 16  # and in at most this many (its Python-level steps grow with their square)


class Hessian(Stats):
    """H ← H·n/(n+b) + (2/(n+b))·XᵀX, X = tokens × in_features, accumulated in float32. Layers that read the
    same input (q/k/v, gate/up) share one Hessian and one factorisation.

    XᵀX is symmetric, so only its upper triangle is accumulated, as row stripes H[a:b, a:] each held in its own
    tensor: 5/8 of a d×d matrix's multiply-adds and memory (a block's Hessians are all live while the
    statistics pass runs its forward, the pass that sets a bf16 run's peak). The d×d matrix is assembled
    only when it is factored, one Hessian at a time."""

    def __init__(self, in_features: int, device: torch.device):
        d = self.d = in_features
        edges = sorted({round(d * s / HESSIAN_STRIPES) for s in range(HESSIAN_STRIPES + 1)})
        self._rows = list(zip(edges, edges[1:]))
        self._stripes: list[torch.Tensor | None] | None = [
            torch.zeros(a1 - a0, d - a0, dtype=torch.float32, device=device) for a0, a1 in self._rows]
        self.n = 0
        self._factor: tuple[torch.Tensor, torch.Tensor, float, int] | None = None

    def add_batch(self, x: torch.Tensor) -> None:
        assert self._stripes is not None, "statistics already consumed"
        b = x.shape[0] if x.dim() > 2 else 1
        source = x.dtype
        x = tokens_first(x)
        scale = self.n / (self.n + b)
        self.n += b
        # bf16 activations (a bf16 model) are multiplied on bf16 units, exactly, with float32 sums
        with exact_fp32_products(source, x.device):
            for (a0, a1), S in zip(self._rows, self._stripes):
                S.mul_(scale).addmm_(x[:, a0:a1].t(), x[:, a0:], alpha=2 / self.n)

    @property
    def nbytes(self) -> int:
        """Memory the accumulated statistic holds."""
        return sum(S.nbytes for S in self._stripes or [] if S is not None)

    @property
    def matrix(self) -> torch.Tensor:
        """The full symmetric H (a copy); for inspection."""
        T = self._assembled(consume=False)
        return T.triu() + T.triu(1).t()

    def _assembled(self, consume: bool) -> torch.Tensor:
        """A d×d float32 whose upper triangle is H (the strict lower one is not written); with consume, each
        stripe is let go once copied, so the two forms are never both whole."""
        assert self._stripes is not None, "statistics already consumed"
        stripes = self._stripes
        T = torch.empty(self.d, self.d, dtype=torch.float32, device=stripes[0].device)
        for k, (a0, a1) in enumerate(self._rows):
            T[a0:a1, a0:].copy_(stripes[k])
            if consume:
                worth_a_trim = stripes[k].nbytes >= 1 << 20 and T.device.type == "cpu"  # a trim costs ~1 ms
                stripes[k] = None
                if worth_a_trim:
                    release_freed_memory()
        if consume:
            self._stripes = None
        return T

    def factor(self, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        """(U, dead inputs, damping used, retries), computed once, in the assembled H's own memory."""
        if self._factor is None:
            self._factor = factor_in_place(self._assembled(consume=True), percdamp)
            release_freed_memory()  # the factorisation's panel-sized temporaries
        return self._factor


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """(U, dead, λ used, retries): U is the upper Cholesky factor of (H + λI)⁻¹, i.e. UᵀU = (H + λI)⁻¹, with
    λ = percdamp·mean(diag H), retried with 10× damping; dead inputs (H_jj = 0) get H_jj = 1. H is left as is."""
    return factor_in_place(H.triu(), percdamp)


def factor_in_place(T: torch.Tensor, percdamp: float,
                    block: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """The same from T, whose upper triangle holds H (the rest is not read), with no second d×d matrix: U is
    written over T. A d×d float32 is 485 MB for a 7B model's down_proj; LAPACK's route (Cholesky, inverse,
    Cholesky of the inverse) needs three of them.

    (H + λI)⁻¹ = UᵀU with U = V⁻¹, where H + λI = VVᵀ and V is upper triangular (Cholesky taken from the
    bottom-right corner): one factorisation and one triangular inverse, both blocked and in place. The strict
    lower triangle keeps a copy of H meanwhile, so a failed attempt restarts with more damping."""
    d = T.shape[0]
    nb = block or max(FACTOR_BLOCK, -(-d // FACTOR_MAX_BLOCKS))
    edges = list(range(0, d, nb)) + [d]
    blocks = list(zip(edges, edges[1:]))
    diag = T.diagonal()
    dead = diag == 0  # inputs never active: H_jj = 1 (and W_:j = 0 in prune)
    diag[dead] = 1
    h_diag = diag.clone()
    mean = h_diag.mean().item()
    _mirror_upper(T, blocks, to_lower=True)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        damp = percdamp * 10**attempt
        if attempt:
            _mirror_upper(T, blocks, to_lower=False)
        diag.copy_(h_diag).add_(damp * mean)
        if _upper_cholesky(T, blocks) and _invert_upper(T, blocks):
            if attempt:
                log.warning("SparseGPT: Cholesky failed at damping %.3g; succeeded with %.3g", percdamp, damp)
            return T.triu_(), dead, damp, attempt
    raise NumericalError(f"Cholesky of the damped Hessian failed even at damping {damp:g}·mean(diag H)")


def _mirror_upper(T: torch.Tensor, blocks: list[tuple[int, int]], to_lower: bool) -> None:
    """Copy the strict upper triangle into the strict lower one (to_lower) or back."""
    for r0, r1 in blocks:
        D = T[r0:r1, r0:r1]
        if to_lower:
            T[r1:, r0:r1].copy_(T[r0:r1, r1:].mT)
            D.copy_(D.triu() + D.triu(1).mT)
        else:
            T[r0:r1, r1:].copy_(T[r1:, r0:r1].mT)
            D.copy_(D.tril() + D.tril(-1).mT)


def _upper_cholesky(T: torch.Tensor, blocks: list[tuple[int, int]]) -> bool:
    """T's upper triangle: A → V with A = VVᵀ, V upper, block by block from the bottom-right corner:
    [[A₁₁, A₁₂], [·, A₂₂]] = [[V₁, V₁₂], [0, V₂]]·[[V₁, V₁₂], [0, V₂]]ᵀ gives A₂₂ = V₂V₂ᵀ, V₁₂ = A₁₂V₂⁻ᵀ and
    V₁V₁ᵀ = A₁₁ − V₁₂V₁₂ᵀ. False where A is not positive definite."""
    for j in range(len(blocks) - 1, -1, -1):
        s, e = blocks[j]
        D = T[s:e, s:e]
        R, info = torch.linalg.cholesky_ex((D.triu() + D.triu(1).mT).flip(0, 1))
        if info != 0:
            return False
        V2 = R.flip(0, 1)  # J·chol(J A₂₂ J)·J is upper with V₂V₂ᵀ = A₂₂
        D.copy_(V2 + D.tril(-1))
        if s == 0:
            break
        V12 = T[:s, s:e]
        V12.copy_(torch.linalg.solve_triangular(V2.mT, V12, upper=False, left=False))  # V₁₂V₂ᵀ = A₁₂
        for r0, r1 in blocks[:j]:  # A₁₁ −= V₁₂V₁₂ᵀ, its upper triangle only
            T[r0:r1, r0:r1].sub_((V12[r0:r1] @ V12[r0:r1].mT).triu_())
            if r1 < s:
                T[r0:r1, r1:s].addmm_(V12[r0:r1], V12[r1:].mT, alpha=-1)
    return True


def _invert_upper(T: torch.Tensor, blocks: list[tuple[int, int]]) -> bool:
    """T's upper triangle: V → V⁻¹, block column by block column from the left, with
    [[V₁, V₁₂], [0, V₂]]⁻¹ = [[V₁⁻¹, −V₁⁻¹V₁₂V₂⁻¹], [0, V₂⁻¹]] and V₁⁻¹ already in place. False where an inf
    or nan came out (a pivot too small to invert): the sum is cheaper than a full test, and the strict lower
    triangle, H's copy, is finite when H is."""
    for j, (s, e) in enumerate(blocks):
        V2 = T[s:e, s:e].triu()
        if s:
            X = T[:s, s:e]
            for r0, r1 in blocks[:j]:  # X ← V₁⁻¹X, row blocks top-down: each reads only rows not yet rewritten
                Y = T[r0:r1, r0:r1].triu() @ X[r0:r1]
                if r1 < s:
                    Y.addmm_(T[r0:r1, r1:s], X[r1:])
                X[r0:r1] = Y
            X.copy_(torch.linalg.solve_triangular(V2, X, upper=True, left=False)).neg_()  # X ← −XV₂⁻¹
        I = torch.eye(e - s, dtype=T.dtype, device=T.device)
        D = T[s:e, s:e]
        D.copy_(torch.linalg.solve_triangular(V2, I, upper=True) + D.tril(-1))
    return bool(torch.isfinite(T.sum()))


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
        taken per layer), with a third of the column steps for q/k/v."""
        assert isinstance(stats, Hessian)
        U, dead, damp, retries = stats.factor(self.options.percdamp)
        rows = [w.shape[0] for w in ws]
        # work on float32 Wᵀ [in, out], the layers' rows side by side: column i of W is the contiguous row i here
        Wt = torch.empty(ws[0].shape[1], sum(rows), dtype=torch.float32, device=U.device)
        r0 = 0
        for w in ws:
            Wt[:, r0 : r0 + w.shape[0]].copy_(w.t())
            r0 += w.shape[0]
        was_nonzero_dead = (Wt[dead] != 0) if dead.any() else None
        Wt[dead] = 0
        mask = sweep(Wt, U, target, self.options.blocksize, rows)
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
                if k > 0:  # the k lowest per row of W; a tie with the k-th (zeros, in practice) goes as well
                    torch.le(g, patterns.kth_smallest_of_columns(g, k), out=drop[i : i + nm[1]])
            err = torch.mul(W1[i], drop[i], out=Err1[i]).div_(d[i])  # OBS: δ = −(w_p / [H⁻¹]_pp)·[H⁻¹]_p,:
            W1[i:].addr_(U1[i, i:], err, alpha=-1)
        mask[i1:i2] = drop != 0
        Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)  # lazy batch update of all later columns
    return mask
