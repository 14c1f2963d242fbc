"""The linear algebra under SparseGPT, written for memory: a symmetric XᵀX accumulated as its upper
triangle only, and the upper Cholesky factor of the damped inverse Hessian computed in place, blocked.

A d×d float32 is 485 MB for a 7B model's down_proj: LAPACK's route (Cholesky, inverse, Cholesky of the inverse)
needs three of them, a dense XᵀX one more; here one d×d matrix is ever whole, and only while it is factored."""

from __future__ import annotations

import logging
from itertools import pairwise

import torch

from core.pruning.errors import NumericalError
from core.pruning.memory import release_freed_memory

log = logging.getLogger(__name__)
MAX_DAMP_RETRIES = 6  # damping ×10 each time: 0.01 → 1e4 · mean(diag H)
GRAM_STRIPES = 4  # XᵀX is symmetric: accumulate only the upper triangle, in this many row stripes
FACTOR_BLOCK = 256  # the in-place factorisation works in blocks this wide at least (10-25% faster than 128 to d=2048),
FACTOR_MAX_BLOCKS = 16  # and in at most this many (its Python-level steps grow with their square)


class UpperGram:
    """A d×d symmetric sum of XᵀX products, float32, held as the row stripes T[a:b, a:] of its upper triangle,
    each in its own tensor: 5/8 of a d×d matrix's multiply-adds and memory. The square matrix is assembled
    only when it is factored."""

    def __init__(self, d: int, device: torch.device):
        self.d = d
        edges = sorted({round(d * s / GRAM_STRIPES) for s in range(GRAM_STRIPES + 1)})
        self._rows = list(pairwise(edges))
        self._stripes: list[torch.Tensor | None] | None = [
            torch.zeros(a1 - a0, d - a0, dtype=torch.float32, device=device) for a0, a1 in self._rows
        ]

    def scale_add(self, x: torch.Tensor, scale: float, alpha: float) -> None:
        """T ← scale·T + alpha·XᵀX, x [tokens, d]."""
        assert self._stripes is not None, "statistics already consumed"
        for (a0, a1), S in zip(self._rows, self._stripes, strict=True):
            assert S is not None
            S.mul_(scale).addmm_(x[:, a0:a1].t(), x[:, a0:], alpha=alpha)

    @property
    def nbytes(self) -> int:
        return sum(S.nbytes for S in self._stripes or [] if S is not None)

    def full(self) -> torch.Tensor:
        """The whole symmetric matrix (a copy)."""
        T = self.assembled(consume=False)
        return T.triu() + T.triu(1).t()

    def assembled(self, consume: bool) -> torch.Tensor:
        """A d×d float32 whose upper triangle is the sum (the strict lower one is not written); with consume,
        each stripe is let go once copied, so the two forms are never both whole."""
        assert self._stripes is not None, "statistics already consumed"
        stripes = self._stripes
        first = stripes[0]
        assert first is not None
        T = torch.empty(self.d, self.d, dtype=torch.float32, device=first.device)
        for k, (a0, a1) in enumerate(self._rows):
            S = stripes[k]
            assert S is not None
            T[a0:a1, a0:].copy_(S)
            if consume:
                worth_a_trim = S.nbytes >= 1 << 20 and T.device.type == "cpu"  # a trim costs ~1 ms
                stripes[k] = None
                del S
                if worth_a_trim:
                    release_freed_memory()
        if consume:
            self._stripes = None
        return T


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """(U, dead, λ used, retries): U is the upper Cholesky factor of (H + λI)⁻¹, i.e. UᵀU = (H + λI)⁻¹, with
    λ = percdamp·mean(diag H), retried with 10× damping; dead inputs (H_jj = 0) get H_jj = 1. H is left as is."""
    return factor_in_place(H.triu(), percdamp)


def factor_in_place(
    T: torch.Tensor, percdamp: float, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """The same from T, whose upper triangle holds H (the rest is not read), with no second d×d matrix: U is
    written over T. A d×d float32 is 485 MB for a 7B model's down_proj; LAPACK's route (Cholesky, inverse,
    Cholesky of the inverse) needs three of them.

    (H + λI)⁻¹ = UᵀU with U = V⁻¹, where H + λI = VVᵀ and V is upper triangular (Cholesky taken from the
    bottom-right corner): one factorisation and one triangular inverse, both blocked and in place. The strict
    lower triangle keeps a copy of H meanwhile, so a failed attempt restarts with more damping."""
    d = T.shape[0]
    nb = block or max(FACTOR_BLOCK, -(-d // FACTOR_MAX_BLOCKS))
    edges = list(range(0, d, nb)) + [d]
    blocks = list(pairwise(edges))
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
