"""Layer-wise sparsity schedules: the mean over prunable weights is the target; OWL follows its formula."""

from __future__ import annotations

import pytest
import torch

from core.pruning.config import PruneConfig, ScheduleConfig
from core.pruning.schedules import (
    ScheduleError,
    _mean,
    block_sparsities,
    block_weights,
    for_model,
    owl_outlier_ratio,
    owl_scores,
)


def test_uniform_and_prune_config_accepted():
    assert block_sparsities(ScheduleConfig(), 0.5, 3) == [0.5] * 3
    cfg = PruneConfig(model="m", sparsity=0.6, schedule=ScheduleConfig(kind="explicit", values=[0.5, 0.7]))
    assert block_sparsities(cfg, 0.6, 2) == [0.5, 0.7]


def test_explicit_checks_length_and_weighted_mean():
    sc = ScheduleConfig(kind="explicit", values=[0.4, 0.8])
    with pytest.raises(ScheduleError, match="3 blocks"):
        block_sparsities(sc, 0.6, 3)
    with pytest.raises(ScheduleError, match="mean sparsity"):
        block_sparsities(sc, 0.6, 2, block_params=[1, 3])  # weighted mean 0.7
    assert block_sparsities(sc, 0.7, 2, block_params=[1, 3]) == [0.4, 0.8]


def test_linear_ramp_keeps_slope_and_mean():
    sc = ScheduleConfig(kind="linear", first=0.6, last=0.8)
    assert block_sparsities(sc, 0.7, 5) == pytest.approx([0.6, 0.65, 0.7, 0.75, 0.8])
    s = block_sparsities(sc, 0.5, 5, block_params=[5, 1, 1, 1, 1])
    assert s[1] - s[0] == pytest.approx(0.05) and s[4] - s[0] == pytest.approx(0.2)
    assert _mean(s, [5, 1, 1, 1, 1]) == pytest.approx(0.5, abs=1e-9)
    assert block_sparsities(sc, 0.7, 1) == pytest.approx([0.7])
    with pytest.raises(ScheduleError, match="outside"):
        block_sparsities(ScheduleConfig(kind="linear", first=0.0, last=0.9), 0.05, 4)


def test_owl_formula():
    sc = ScheduleConfig(kind="owl", owl_lambda=0.08)
    r = [0.01, 0.03, 0.02, 0.05]
    s = block_sparsities(sc, 0.7, 4, owl_scores=r)
    scaled = [(x - 0.01) / 0.04 * 0.16 for x in r]  # into [0, 2λ]
    m = sum(scaled) / 4
    assert s == pytest.approx([1 - (x - m + 0.3) for x in scaled])
    assert sum(s) / 4 == pytest.approx(0.7, abs=1e-9)
    assert s.index(min(s)) == 3 and s.index(max(s)) == 0  # most outliers → pruned least
    assert max(s) - min(s) == pytest.approx(0.16)
    assert block_sparsities(sc, 0.7, 3, owl_scores=[0.2] * 3) == [0.7] * 3
    with pytest.raises(ScheduleError):
        block_sparsities(sc, 0.7, 4)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7, 0.95])
def test_owl_weighted_mean_hits_target(target):
    g = torch.Generator().manual_seed(0)
    r = torch.rand(12, generator=g).tolist()
    params = (torch.randint(1, 100, (12,), generator=g) * 1000).tolist()
    s = block_sparsities(ScheduleConfig(kind="owl", owl_lambda=0.1), target, 12, owl_scores=r, block_params=params)
    assert abs(_mean(s, params) - target) < 1e-3 and all(0 <= x <= 0.99 for x in s)
    assert len({round(x, 9) for x in s}) > 1


def test_outlier_ratio_over_the_whole_block():
    w1, s1 = torch.ones(4, 10), torch.ones(10)
    w2, s2 = torch.ones(2, 10), torch.ones(10)
    w2[0, 0] = 1000.0  # A's mean over both layers: (40 + 19 + 1000)/60 ≈ 17.65; one entry above 5× that
    assert owl_outlier_ratio([w1, w2], [s1, s2], m=5) == pytest.approx(1 / 60)
    s1[3] = 1e6  # input norms count: sqrt(1e6) = 1000, mean (36 + 4000 + 19 + 1000)/60 ≈ 84: 4 + 1 outliers
    assert owl_outlier_ratio([w1, w2], [s1, s2], m=5) == pytest.approx(5 / 60)
    assert owl_outlier_ratio([w1], [torch.ones(10)], m=5) == 0.0


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    ).eval()


def test_for_model_weights_and_exclude():
    model = _tiny_llama()
    per_block = 2 * 32 * 32 + 2 * 16 * 32 + 3 * 32 * 48  # q,o 32x32; k,v 16x32; gate,up,down 48x32
    assert block_weights(model) == [per_block] * 3
    assert block_weights(model, [r"layers\.0\.mlp"]) == [per_block - 3 * 32 * 48, per_block, per_block]
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    ratios, sizes = owl_scores(model, tokens, exclude=[r"layers\.0\.mlp"])
    assert sizes == block_weights(model, [r"layers\.0\.mlp"]) and all(0 <= r < 1 for r in ratios)
    cfg = PruneConfig(model="m", sparsity=0.6, schedule=ScheduleConfig(kind="owl"), exclude=[r"layers\.0\.mlp"])
    s = for_model(cfg, model, tokens)
    assert abs(_mean(s, sizes) - 0.6) < 1e-3
    cfg = PruneConfig(model="m", sparsity=0.6, schedule=ScheduleConfig(kind="linear", first=0.5, last=0.7))
    assert for_model(cfg, model, tokens) == pytest.approx([0.5, 0.6, 0.7])


@pytest.mark.slow
def test_owl_beats_uniform_wanda_at_70_on_stories260k(stories260k, text_dir):
    """OWL's claim at high sparsity, on a real trained model: lower perplexity than uniform Wanda."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.pruning import engine
    from core.pruning.evaluate import perplexity
    from core.pruning.methods import get

    tok = AutoTokenizer.from_pretrained(stories260k)
    ids = tok(text_dir.joinpath("tinystories-valid.txt").read_text()[:120_000], return_tensors="pt").input_ids[0]
    calib, evalw = ids[: 32 * 128].view(32, 128), ids[32 * 128 :]
    ppl, achieved = {}, {}
    for kind in ("uniform", "owl"):
        cfg = PruneConfig(model=str(stories260k), method="wanda", sparsity=0.7, schedule=ScheduleConfig(kind=kind))
        model = AutoModelForCausalLM.from_pretrained(stories260k).eval()
        sched = for_model(cfg, model, calib)
        engine.prune_blocks(
            model,
            calib,
            get("wanda")(cfg),
            device=torch.device("cpu"),
            block_sparsity=sched,
            nm=None,
            exclude=[],
            overrides={},
            batch_size=8,
        )
        ppl[kind] = perplexity(model, evalw, 128, max_windows=40)["perplexity"]
        ws = [l.weight for n, l in model.named_modules() if ".layers." in n and isinstance(l, torch.nn.Linear)]
        achieved[kind] = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
    print(
        f"stories260k, Wanda 70%: uniform ppl {ppl['uniform']:.3f} (sparsity {achieved['uniform']:.4f}), "
        f"OWL ppl {ppl['owl']:.3f} (sparsity {achieved['owl']:.4f})"
    )
    assert achieved["owl"] > achieved["uniform"] - 1e-3  # OWL gets no bigger budget (int(in·p) rounding aside)
    assert achieved["owl"] > 0.68
    assert ppl["owl"] < ppl["uniform"]
