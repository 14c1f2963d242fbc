"""`secateurs prune` with recovery and gradual flags, generated from PruneConfig, run as a user runs it."""

import json
import subprocess
import sys

from core.pruning import models, patterns


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "cli", "prune", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_prune_with_lora_recovery_flags(tiny_model, tmp_path):
    import transformers

    src = tiny_model("gpt2")
    out = tmp_path / "out"
    # fmt: off
    r = cli(
        "--model", src, "--method", "wanda", "--pattern", "2:4",
        "--calibration", src / "calibration.txt", "--nsamples", 4, "--seqlen", 16,
        "--recovery-steps", 3, "--recovery-mode", "lora", "--recovery-lr", "0.01", "--recovery-batch-size", 2,
        "--recovery-seqlen", 16, "--recovery-lora-r", 4, "--recovery-lora-targets", "attn", "--out", out,
    )
    # fmt: on
    assert r.returncode == 0, r.stderr
    assert "recovery" in r.stdout and "lora: 3 steps" in r.stdout and "0 violations" in r.stdout
    assert "recover" in r.stderr  # its progress row
    m = json.loads((out / "metrics.json").read_text())
    assert m["recovery"]["config"]["lora"] == {"r": 4, "alpha": 32.0, "dropout": 0.0, "targets": ["attn"]}
    assert m["recovery"]["mask_violations"] == 0 and m["recovery"]["steps"] == 3
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    for b in models.find_blocks(model)[1]:
        for layer in models.prunable_layers(b).values():
            assert patterns.satisfies_nm(models.get_weight(layer), 2, 4)


def test_bad_recovery_and_gradual_flags_name_the_flag(tiny_model, tmp_path):
    src = tiny_model("llama")
    r = cli("--model", src, "--sparsity", "0.5", "--recovery-lr", "0", "--out", tmp_path / "a")
    assert r.returncode == 2 and "--recovery-lr" in r.stderr, r.stderr
    r = cli("--model", src, "--pattern", "2:4", "--gradual-stages", "3", "--out", tmp_path / "b")
    assert r.returncode == 2 and "gradual" in r.stderr and "N:M" in r.stderr, r.stderr
