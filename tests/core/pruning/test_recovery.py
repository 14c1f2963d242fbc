"""Recovery fine-tuning: masks held bit-exactly (full and LoRA, Llama/OPT/GPT-2 Conv1D tiny models and the real
stories260k), perplexity below one-shot's, LoRA merge keeping 2:4, bad inputs, cancel between steps."""

from __future__ import annotations

import pytest
import torch
import transformers
from pydantic import ValidationError
from safetensors.torch import load_file

from core.pruning import models, patterns
from core.pruning.config import PruneConfig
from core.pruning.errors import Cancelled, RecoveryDataError, RecoveryError
from core.pruning.held_masks import HeldMasks
from core.pruning.masks import unpack_mask
from core.pruning.progress import Progress, RunFraction, planned_stages
from core.pruning.run import prune


def tiny_config(model_dir, out_recovery, **kw):
    base = {
        "model": str(model_dir),
        "method": "wanda",
        "sparsity": 0.5,
        "device": "cpu",
        "dtype": "float32",
        "calibration": {"source": str(model_dir / "calibration.txt"), "nsamples": 4, "seqlen": 16},
        "recovery": {"steps": 3, "lr": 1e-2, "batch_size": 2, "seqlen": 16, "weight_decay": 0.1, **out_recovery},
    }
    return PruneConfig.model_validate({**base, **kw})


def removed_masks(out):
    packed = load_file(str(out / "masks.safetensors"))
    import json

    shapes = json.loads((out / "masks.json").read_text())["shapes"] if (out / "masks.json").exists() else None
    return packed, shapes


def check_reloaded(out, original_dir):
    """The exported weights: bit-exact +0.0 at every pruned position, and training changed kept ones."""
    from safetensors import safe_open

    cfg = transformers.AutoConfig.from_pretrained(out)
    model = getattr(transformers, cfg.architectures[0]).from_pretrained(out)
    dense = getattr(transformers, cfg.architectures[0]).from_pretrained(original_dir)
    params = dict(model.named_parameters())
    dense_params = dict(dense.named_parameters())
    with safe_open(str(out / "masks.safetensors"), "pt") as f:
        meta = f.metadata() or {}
        names = list(f.keys())
        assert names
        moved = 0
        for n in names:
            import json

            shape = json.loads(meta[n]) if n in meta else list(params[n].shape)
            removed = ~unpack_mask(f.get_tensor(n), shape)
            w = params[n].detach()
            assert int((w[removed].view(torch.int32) != 0).sum()) == 0, n  # bit-exact +0.0
            moved += int((w[~removed] != dense_params[n].detach()[~removed]).sum())
    assert moved > 0


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_full_recovery_holds_masks_bit_exact_after_every_step(tmp_path, tiny_model, arch):
    d = tiny_model(arch)
    seen = []

    def on_progress(p: Progress) -> None:
        if p.stage == "recover":
            seen.append(p.data["step"])

    res = prune(tiny_config(d, {}), tmp_path / "out", on_progress=on_progress)
    assert seen == [1, 2, 3]
    rec = res.metrics["recovery"]
    assert rec["mask_violations"] == 0 and rec["steps"] == 3
    assert rec["tokens_seen"] == 3 * 2 * 16
    check_reloaded(tmp_path / "out", d)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_held_masks_after_each_adamw_step(tiny_model, arch):
    """Direct: every step of the training loop leaves the pruned weights +0.0, optimizer moments included."""
    from core.pruning.config import RecoveryConfig
    from core.pruning.recovery import recover
    from core.pruning.recovery_data import RecoveryData

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model(arch))
    _, blocks = models.find_blocks(model)
    removed = {}
    gen = torch.Generator().manual_seed(0)
    for i, b in enumerate(blocks):
        for n, m in models.prunable_layers(b).items():
            full = f"{models.find_blocks(model)[0]}.{i}.{n}.weight"
            mask = torch.rand(m.weight.shape, generator=gen) < 0.6
            removed[full] = mask
    held = HeldMasks(model, removed)
    held.apply()
    before = {n: m.clone() for n, m in removed.items()}
    ids = torch.randint(4, 200, (4000,), generator=gen)
    data = RecoveryData(ids, 16, 2, 0, {})
    violations = []
    cfg = RecoveryConfig(steps=4, lr=5e-2, weight_decay=0.5, batch_size=2, seqlen=16, max_grad_norm=None)
    model, rep = recover(
        model,
        held,
        data,
        cfg,
        device=torch.device("cpu"),
        on_progress=lambda p: violations.append(held.violations()),
    )
    assert violations == [0, 0, 0, 0]
    assert all(torch.equal(before[n], m) for n, m in held.removed().items())
    assert rep["mask_violations"] == 0


def test_lora_on_conv1d_and_merge_keeps_2_4(tmp_path, tiny_model):
    for arch in ("gpt2", "llama"):
        d = tiny_model(arch)
        cfg = tiny_config(
            d,
            {"mode": "lora", "lora": {"r": 4, "alpha": 8}, "lr": 5e-2},
            sparsity=None,
            pattern="2:4",
            method="sparsegpt",
        )
        out = tmp_path / arch
        res = prune(cfg, out)
        rec = res.metrics["recovery"]
        assert rec["mask_violations"] == 0
        assert rec["lora"]["merge_max_kept_weight_change"] > 0
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
        _, blocks = models.find_blocks(model)
        for b in blocks:
            for layer in models.prunable_layers(b).values():
                assert patterns.satisfies_nm(models.get_weight(layer), 2, 4)
        check_reloaded(out, d)


def test_stories260k_recovery_beats_one_shot_and_holds_masks(tmp_path, stories260k, text_dir):
    text = str(text_dir / "tinystories-valid.txt")
    torch.manual_seed(0)
    cfg = PruneConfig(
        model=str(stories260k),
        method="wanda",
        pattern="2:4",
        dtype="float32",
        device="cpu",
        calibration={"source": text, "nsamples": 8, "seqlen": 128},
        evaluation={"source": text, "seqlen": 128, "max_windows": 16},
        recovery={"steps": 8, "lr": 2e-3, "batch_size": 4, "seqlen": 128, "seed": 0},
    )
    res = prune(cfg, tmp_path / "out")
    ppl, rec = res.metrics["perplexity"], res.metrics["recovery"]
    assert ppl["recovered"] < ppl["pruned"]
    assert ppl["dense"] < ppl["pruned"]
    assert rec["mask_violations"] == 0
    assert "same file as evaluation" in rec["data"]["split"] and "[2048," in rec["data"]["split"]
    assert len(rec["loss_curve"]) == 8 and rec["loss_curve"][-1]["tokens"] == 8 * 4 * 128
    assert {"recover", "evaluate_pruned", "evaluate", "prune"} <= set(res.metrics["timings"])
    check_reloaded(tmp_path / "out", stories260k)


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    ("recovery", "loc"),
    [
        ({"lr": 0}, ("recovery", "lr")),
        ({"lr": -1e-3}, ("recovery", "lr")),
        ({"steps": 0}, ("recovery", "steps")),
        ({"mode": "half"}, ("recovery", "mode")),
        ({"lora": {"r": 0}}, ("recovery", "lora", "r")),
    ],
)
def test_bad_recovery_settings_name_the_field(recovery, loc):
    with pytest.raises(ValidationError) as e:
        PruneConfig(model="m", sparsity=0.5, recovery=recovery)
    assert e.value.errors()[0]["loc"] == loc


def test_gradual_refuses_nm_and_structure_only():
    with pytest.raises(ValidationError) as e:
        PruneConfig(model="m", pattern="2:4", gradual={"stages": 3})
    assert e.value.errors()[0]["loc"] == ("gradual",) and "N:M" in str(e.value)
    with pytest.raises(ValidationError) as e:
        PruneConfig(model="m", structure={"heads": 0.25}, gradual={"stages": 3})
    assert e.value.errors()[0]["loc"] == ("gradual",)


def test_recovery_data_too_short_fails_before_pruning(tmp_path, tiny_model):
    d = tiny_model("llama")
    stages = []
    cfg = tiny_config(d, {"texts": ["a few words only"], "batch_size": 4})
    with pytest.raises(RecoveryDataError, match=r"recovery\.texts: .*fewer than one batch") as e:
        prune(cfg, tmp_path / "out", on_progress=lambda p: stages.append(p.stage))
    assert e.value.code == "recovery_data_error"
    assert "prune" not in stages and not (tmp_path / "out").exists()


def test_distill_teacher_that_does_not_fit_is_refused(tmp_path, tiny_model, monkeypatch):
    import psutil

    class Mem:
        available = 1000

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem())
    cfg = tiny_config(tiny_model("llama"), {"distill": True})
    with pytest.raises(RecoveryError, match="recovery.distill: the dense teacher needs"):
        prune(cfg, tmp_path / "out")


def test_distill_trains_towards_the_dense_model(tmp_path, tiny_model):
    res = prune(tiny_config(tiny_model("opt"), {"distill": True, "steps": 2}), tmp_path / "out")
    rec = res.metrics["recovery"]
    assert rec["runs"][0]["loss"] == "kl_to_dense" and rec["teacher_bytes"] > 0 and rec["mask_violations"] == 0


def test_cancel_between_training_steps(tmp_path, tiny_model):
    steps = []

    def on_progress(p: Progress) -> None:
        if p.stage == "recover":
            steps.append(p.data["step"])

    with pytest.raises(Cancelled, match="during recovery"):
        prune(
            tiny_config(tiny_model("llama"), {"steps": 50}),
            tmp_path / "out",
            on_progress=on_progress,
            should_stop=lambda: len(steps) >= 2,
        )
    assert steps == [1, 2] and not (tmp_path / "out").exists()


def test_structured_model_recovers_as_a_dense_smaller_model(tmp_path, tiny_model):
    cfg = tiny_config(tiny_model("llama"), {"steps": 2}, sparsity=None, structure={"mlp_channels": 0.5})
    res = prune(cfg, tmp_path / "out")
    assert res.metrics["recovery"]["steps"] == 2
    assert res.metrics["model"]["params_after"] < res.metrics["model"]["params_before"]


def test_progress_fraction_counts_recovery():
    cfg = PruneConfig(model="m", sparsity=0.5, evaluation={"source": "x"}, recovery={"steps": 10})
    stages = planned_stages(cfg)
    assert stages.index("evaluate_pruned") < stages.index("recover") < stages.index("evaluate")
    frac = RunFraction(stages)
    a = frac(Progress("recover", block=0, total_blocks=10))
    b = frac(Progress("recover", block=9, total_blocks=10))
    assert 0 < a < b < frac(Progress("export"))


def test_a_missing_recovery_file_is_found_before_the_model_loads(tmp_path, tiny_model):
    from core.pruning.preflight import PreflightError

    cfg = tiny_config(tiny_model("llama"), {"source": str(tmp_path / "typo.txt")})
    with pytest.raises(PreflightError) as e:
        prune(cfg, tmp_path / "out")
    assert [p.field for p in e.value.problems] == ["recovery.source"] and e.value.code == "recovery_data_error"


def test_recovery_from_the_evaluation_file_without_spare_text_says_how_to_fix(tmp_path, tiny_model):
    d = tiny_model("llama")
    cfg = tiny_config(d, {"source": str(d / "calibration.txt")}, evaluation={"source": str(d / "calibration.txt")})
    with pytest.raises(RecoveryDataError, match="evaluation.max_windows"):
        prune(cfg, tmp_path / "out")
