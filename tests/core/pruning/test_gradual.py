"""Gradual pruning: the cubic and linear schedules, masks that only grow (each method chooses its new removals
among the weights still kept), recovery between stages, and the stages in metrics and progress."""

from __future__ import annotations

import pytest
import torch

from core.pruning import gradual
from core.pruning.config import PruneConfig
from core.pruning.masks import unpack_mask
from core.pruning.progress import RunFraction, planned_stages
from core.pruning.run import prune


def test_stage_targets():
    cubic = gradual.stage_targets(0.7, 3, "cubic")
    assert cubic == pytest.approx([0.7 * (1 - (2 / 3) ** 3), 0.7 * (1 - (1 / 3) ** 3), 0.7])
    assert gradual.stage_targets(0.6, 3, "linear") == pytest.approx([0.2, 0.4, 0.6])
    assert cubic[0] > 0.7 / 3  # cubic prunes most early, while there is the most redundancy


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_masks_only_grow_and_methods_choose_among_kept_weights(tmp_path, tiny_model, monkeypatch, method):
    d = tiny_model("llama")
    raw, held = [], []
    real_hold = gradual.hold

    def spy(model, earlier, res):
        raw.append({n: ~unpack_mask(res.masks[n], res.mask_shapes[n]) for n in res.masks})
        out = real_hold(model, earlier, res)
        held.append({n: m.clone() for n, m in out.items()})
        return out

    monkeypatch.setattr(gradual, "hold", spy)
    cfg = PruneConfig(
        model=str(d),
        method=method,
        sparsity=0.6,
        device="cpu",
        calibration={"source": str(d / "calibration.txt"), "nsamples": 4, "seqlen": 16},
        gradual={"stages": 3, "schedule": "cubic"},
        recovery={"steps": 6, "lr": 1e-2, "batch_size": 2, "seqlen": 16},
    )
    res = prune(cfg, tmp_path / "out")
    assert len(held) == 3
    for a, b in zip(held, held[1:], strict=False):
        assert gradual.monotone(a, b)
    for earlier, chosen in zip(held, raw[1:], strict=False):  # the method itself re-chose every earlier removal
        assert gradual.monotone(earlier, chosen)
    fractions = [sum(int(m.sum()) for m in h.values()) / sum(m.numel() for m in h.values()) for h in held]
    assert fractions[0] < fractions[1] < fractions[2] == pytest.approx(0.6, abs=0.01)
    g = res.metrics["gradual"]
    assert g["recovery_steps"] == [2, 2, 2] and [s["stage"] for s in g["per_stage"]] == [1, 2, 3]
    assert [r.get("gradual_stage") for r in res.metrics["recovery"]["runs"]] == [1, 2, 3]
    assert res.metrics["recovery"]["mask_violations"] == 0
    assert res.metrics["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)


def test_gradual_progress_stays_inside_prune_and_never_goes_back(tmp_path, tiny_model):
    d = tiny_model("opt")
    cfg = PruneConfig(
        model=str(d),
        sparsity=0.5,
        device="cpu",
        calibration={"source": str(d / "calibration.txt"), "nsamples": 4, "seqlen": 16},
        gradual={"stages": 2, "schedule": "linear"},
        recovery={"steps": 4, "batch_size": 2, "seqlen": 16},
    )
    frac = RunFraction(planned_stages(cfg))
    seen = []
    prune(cfg, tmp_path / "out", on_progress=lambda p: seen.append((p.stage, p.message, frac(p))))
    values = [f for _, _, f in seen]
    assert values == sorted(values)
    assert any(s == "recover" and m.startswith("stage 1/2") for s, m, _ in seen)
    assert any(s == "prune" and m.startswith("stage 2/2") for s, m, _ in seen)


def test_gradual_without_recovery_still_prunes_in_stages(tmp_path, tiny_model):
    d = tiny_model("gpt2")
    cfg = PruneConfig(
        model=str(d),
        method="magnitude",
        sparsity=0.5,
        device="cpu",
        calibration={"source": str(d / "calibration.txt"), "nsamples": 4, "seqlen": 16},
        gradual={"stages": 2},
    )
    res = prune(cfg, tmp_path / "out")
    assert len(res.metrics["gradual"]["per_stage"]) == 2 and res.metrics["recovery"] is None
    assert torch.tensor(res.metrics["achieved_sparsity"]).item() == pytest.approx(0.5, abs=0.01)
