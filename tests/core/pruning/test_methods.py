"""The math of each method on random matrices, against the papers' definitions."""

import pytest
import torch

from core.pruning import patterns
from core.pruning.config import PruneConfig
from core.pruning.errors import NumericalError
from core.pruning.linalg import factor_in_place, inverse_hessian_cholesky
from core.pruning.methods import Target, get
from core.pruning.methods.sparsegpt import Hessian


def cfg(**kw):
    return PruneConfig(model="m", sparsity=0.5, **kw)


def correlated_inputs(tokens=2048, dim=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5
    x = torch.randn(tokens, dim, generator=g) @ mix + 0.1 * torch.randn(tokens, dim, generator=g)
    x[:, ::9] *= 10  # outlier features spread over the inputs, as LLM activations have
    return x


def run(name, w, x, target, **kw):
    m = get(name)(cfg(method=name, **kw))
    st = m.stats(w.shape[1], torch.device("cpu"))
    if st is not None:
        for chunk in x.split(256):
            st.add_batch(chunk.unsqueeze(0))  # batches of one sequence
    return m.prune(w.clone(), st, target)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        get("obs")


def test_wanda_equals_brute_force_definition():
    x = correlated_inputs(512, 24)
    w = torch.randn(10, 24)
    res = run("wanda", w, x, Target(0.5))
    norms = torch.sqrt((x**2).sum(0) / 2)  # ‖X_j‖₂ over 2 sequences of 256 tokens, reference scaling
    for r in range(10):
        score = [abs(w[r, j].item()) * norms[j].item() for j in range(24)]
        drop = sorted(range(24), key=lambda j: score[j])[:12]
        expect = torch.zeros(24, dtype=torch.bool)
        expect[drop] = True
        assert torch.equal(res.mask[r], expect), r


def test_wanda_is_exact_per_row_and_does_not_update_weights():
    x, w = correlated_inputs(), torch.randn(32, 128)
    res = run("wanda", w, x, Target(0.6))
    assert ((res.weight == 0).sum(1) == int(128 * 0.6)).all()
    kept = ~res.mask
    assert torch.equal(res.weight[kept], w[kept])


def test_wanda_alpha_variant_hits_target_within_tolerance():
    x, w = correlated_inputs(), torch.randn(32, 128)
    res = run("wanda", w, x, Target(0.5), wanda_alpha_search=True)
    assert abs(res.mask.float().mean().item() - 0.5) <= 0.002
    assert 0 < res.info["alpha"] < 0.8


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_nm_output_satisfies_the_pattern_exactly(name, nm):
    x, w = correlated_inputs(), torch.randn(32, 128)
    res = run(name, w, x, Target(1 - nm[0] / nm[1], nm))
    assert patterns.satisfies_nm(res.weight, *nm)
    assert (res.weight != 0).sum().item() == 32 * 128 * nm[0] // nm[1]


@pytest.mark.parametrize("name,kw", [("wanda", {}), ("magnitude", {"magnitude_scope": "row"})])
@pytest.mark.parametrize("target", [Target(0.5), Target(0.5, (2, 4)), Target(0.5, (4, 8))])
def test_row_selections_are_the_same_when_rows_are_scored_a_few_at_a_time(monkeypatch, name, kw, target):
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(45, 64, generator=g), correlated_inputs(dim=64)
    whole = run(name, w, x, target, **kw)
    monkeypatch.setattr(patterns, "ROW_CHUNK_ELEMENTS", 7 * 64)  # chunks of 7 rows, the last one short
    chunked = run(name, w, x, target, **kw)
    assert torch.equal(chunked.mask, whole.mask) and torch.equal(chunked.weight, whole.weight)


def test_wanda_prunes_a_bf16_weight_in_place_with_float32_scores():
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(32, 64, generator=g).bfloat16(), correlated_inputs(dim=64)
    layer_weight = w.clone()
    res = run("wanda", w, x, Target(0.5))  # run() passes a clone: compare with the float32 result instead
    ref = run("wanda", w.float(), x, Target(0.5))
    assert res.weight.dtype == torch.bfloat16 and torch.equal(res.mask, ref.mask)
    assert torch.equal(res.weight.float(), ref.weight)
    m = get("wanda")(cfg())
    st = m.stats(64, torch.device("cpu"))
    st.add_batch(x.unsqueeze(0))
    assert m.prune(layer_weight, st, Target(0.5)).weight.data_ptr() == layer_weight.data_ptr()
    assert (layer_weight == 0).float().mean().item() == 0.5


def test_magnitude_layer_scope_is_one_threshold_row_scope_is_per_row():
    w = torch.randn(16, 64) * torch.linspace(0.1, 3, 16).unsqueeze(1)  # rows of very different scale
    layer = run("magnitude", w, None, Target(0.5))
    row = run("magnitude", w, None, Target(0.5), magnitude_scope="row")
    assert w.abs()[layer.mask].max() <= w.abs()[~layer.mask].min()
    assert ((row.weight == 0).sum(1) == 32).all()
    assert not torch.equal(layer.mask, row.mask)


@pytest.mark.parametrize("target", [Target(0.5), Target(0.5, (2, 4))])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconstruction_error_sparsegpt_lt_wanda_lt_magnitude(target, seed):
    x, w = correlated_inputs(seed=seed), torch.randn(64, 128, generator=torch.Generator().manual_seed(seed))
    err = {
        n: ((x @ w.t() - x @ run(n, w, x, target).weight.t()).norm() / (x @ w.t()).norm()).item()
        for n in ("magnitude", "wanda", "sparsegpt")
    }
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err


def test_sparsegpt_unstructured_hits_target_and_zeroes_dead_inputs():
    x, w = correlated_inputs(), torch.randn(32, 128)
    x[:, 5] = 0  # an input that is never active
    res = run("sparsegpt", w, x, Target(0.5))
    assert (res.weight[:, 5] == 0).all()
    assert abs((res.weight == 0).float().mean().item() - 0.5) < 0.02
    assert res.info["damping"] == pytest.approx(0.01) and res.info["damping_retries"] == 0


def test_hessian_matches_definition():
    x = torch.randn(3, 10, 6)  # 3 sequences
    h = Hessian(6, torch.device("cpu"))
    h.add_batch(x[:2])
    h.add_batch(x[2:])
    flat = x.reshape(-1, 6)
    assert torch.allclose(h.matrix, 2 / 3 * flat.t() @ flat, atol=1e-5)


def test_hessian_keeps_only_its_upper_triangle_and_factors_as_the_full_matrix():
    d = 300
    x = torch.randn(2, 64, d)
    h = Hessian(d, torch.device("cpu"))
    h.add_batch(x)
    assert h.nbytes <= 0.65 * d * d * 4  # the stripes of the upper triangle, not a d×d matrix
    expected = inverse_hessian_cholesky(h.matrix, 0.01)
    got = h.factor(0.01)
    assert all(torch.equal(a, b) for a, b in zip(got[:2], expected[:2], strict=True)) and got[2:] == expected[2:]
    with pytest.raises(AssertionError, match="consumed"):
        h.add_batch(x)


def test_cholesky_retries_with_more_damping_and_reports_it():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    eig = torch.ones(16)
    eig[0] = -0.05  # indefinite: 1% damping is not enough, 10% is
    H = q @ torch.diag(eig) @ q.t()
    U, _, damp, retries = inverse_hessian_cholesky(H, 0.01)
    assert retries >= 1 and damp > 0.01
    assert torch.isfinite(U).all()


def damped(H, percdamp):
    H = H.clone()
    H.diagonal()[H.diagonal() == 0] = 1
    return H + percdamp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)


@pytest.mark.parametrize("block", [1, 5, 32, 96])
def test_blocked_factor_is_written_over_the_hessian_and_inverts_it(block):
    x = correlated_inputs(1024, 96).double()
    x[:, 7] = 0
    H = x.t() @ x
    T = H.triu()
    T += torch.full_like(T, float("nan")).tril(-1)  # the strict lower triangle is never read
    U, dead, damp, retries = factor_in_place(T, 0.01, block)
    assert U.data_ptr() == T.data_ptr() and torch.equal(U, U.triu())
    assert dead.nonzero().flatten().tolist() == [7] and retries == 0
    assert torch.allclose(U.t() @ U @ damped(H, 0.01), torch.eye(96, dtype=H.dtype), atol=1e-8)


def test_blocked_factor_restarts_from_the_hessian_after_a_failed_attempt():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    eig = torch.ones(16, dtype=torch.float64)
    eig[0] = -0.05  # 1% damping fails part-way through the blocks, after some are overwritten
    H = q @ torch.diag(eig) @ q.t()
    U, _, damp, retries = factor_in_place(H.triu(), 0.01, block=4)
    assert retries >= 1 and damp == pytest.approx(0.01 * 10**retries)
    assert torch.allclose(U.t() @ U @ damped(H, damp), torch.eye(16, dtype=H.dtype), atol=1e-8)


def test_cholesky_that_never_succeeds_raises_instead_of_falling_back():
    with pytest.raises(NumericalError, match="Cholesky"):
        inverse_hessian_cholesky(-torch.eye(8), 0.01)


def sparsegpt_by_the_paper(w, H, sparsity, nm=None, blocksize=128, percdamp=0.01):
    """Algorithm 1 of the paper, written plainly: H⁻¹ by inversion, its upper Cholesky factor, then one column
    at a time with full OBS updates of the block and lazy updates of later columns."""
    W = w.clone()
    rows, cols = W.shape
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        if nm is None:
            score = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            k = int(score.numel() * sparsity)
            M1 = score <= torch.sort(score.flatten())[0][k - 1]
        else:
            M1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                g = W1[:, i : i + nm[1]] ** 2 / torch.diag(Hinv1)[i : i + nm[1]].reshape(1, -1) ** 2
                M1.scatter_(1, i + torch.topk(g, nm[1] - nm[0], dim=1, largest=False)[1], True)
            q = W1[:, i].clone()
            q[M1[:, i]] = 0
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = M1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_sparsegpt_equals_a_plain_transcription_of_the_paper(nm):
    x = correlated_inputs(2048, 320, seed=3).double()
    x[:, 7] = 0  # a dead input
    w = torch.randn(48, 320, generator=torch.Generator().manual_seed(3)).double()
    H = 2 * x.t() @ x / 8  # 8 sequences of 256 tokens
    expect = sparsegpt_by_the_paper(w, H, 0.5, nm)
    res = run("sparsegpt", w.float(), x.float(), Target(0.5, nm))
    assert torch.equal(res.weight == 0, expect == 0)
    assert torch.allclose(res.weight.double(), expect, rtol=0, atol=1e-5)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_stacks_layers_sharing_a_hessian_without_changing_the_result(nm):
    x = correlated_inputs()
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(r, 128, generator=g) * s for r, s in ((16, 1.0), (32, 0.1), (8, 3.0))]
    m = get("sparsegpt")(cfg())

    def hessian():
        st = m.stats(128, torch.device("cpu"))
        for chunk in x.split(256):
            st.add_batch(chunk.unsqueeze(0))
        return st

    target = Target(0.5, nm)
    together = m.prune_many([w.clone() for w in ws], hessian(), target)
    for w, res in zip(ws, together, strict=True):
        alone = m.prune(w.clone(), hessian(), target)
        assert torch.equal(res.mask, alone.mask)
        assert torch.allclose(res.weight, alone.weight, atol=1e-6)
        if nm is None:  # the threshold is per layer: each layer hits the target, whatever its scale
            assert abs(res.mask.float().mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsegpt_reads_the_layers_own_weights_and_leaves_them_unchanged(dtype):
    # the engine hands SparseGPT the layers' own weights (copies_weights): it must make its float32
    # working copy itself and change nothing in the model until the engine writes the result back
    x = correlated_inputs()
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(r, 128, generator=g).to(dtype) for r in (24, 40)]
    before = [w.clone() for w in ws]
    m = get("sparsegpt")(cfg())

    def hessian():
        st = m.stats(128, torch.device("cpu"))
        st.add_batch(x.unsqueeze(0))
        return st

    got = m.prune_many(list(ws), hessian(), Target(0.5))
    assert all(torch.equal(w, b) for w, b in zip(ws, before, strict=True))
    refs = m.prune_many([w.float() for w in ws], hessian(), Target(0.5))
    for w, res, ref in zip(ws, got, refs, strict=True):
        assert res.weight.dtype == torch.float32 and res.weight.shape == w.shape
        assert torch.equal(res.mask, ref.mask)
        assert torch.equal(res.weight, ref.weight)


def test_inverse_hessian_factor_is_upper_and_inverts_the_damped_hessian():
    x = correlated_inputs(1024, 96).double()
    H = x.t() @ x
    U, _, damp, _ = inverse_hessian_cholesky(H.clone(), 0.01)
    damped = H + 0.01 * torch.diag(H).mean() * torch.eye(96, dtype=H.dtype)
    assert torch.equal(U, U.triu())
    assert torch.allclose(U.t() @ U @ damped, torch.eye(96, dtype=H.dtype), atol=1e-8)
