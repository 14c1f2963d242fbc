"""`secateurs prune` run as a user runs it: a subprocess."""

import json
import os
import subprocess
import sys

import pytest
import transformers

from core.pruning import models, patterns


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "cli", "prune", *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_prune_writes_a_model_transformers_loads_and_prints_the_table(tiny_model, tmp_path):
    src = tiny_model("llama")
    out = tmp_path / "pruned"
    r = cli(
        "--model",
        src,
        "--method",
        "sparsegpt",
        "--pattern",
        "2:4",
        "--calibration",
        src / "calibration.txt",
        "--nsamples",
        8,
        "--seqlen",
        32,
        "--eval",
        src / "calibration.txt",
        "--eval-seqlen",
        32,
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    assert "achieved sparsity" in r.stdout and "perplexity" in r.stdout and "0.5000" in r.stdout
    assert "prune" in r.stderr  # the progress bars go to stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    _, blocks = models.find_blocks(model)
    for b in blocks:
        for m in models.prunable_layers(b).values():
            assert patterns.satisfies_nm(models.get_weight(m), 2, 4)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["pattern"] == "2:4" and metrics["perplexity"]["pruned"] > 0


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--sparsity", "1.5"], "sparsity"),
        (["--sparsity", "-0.1"], "sparsity"),
        (["--pattern", "4:4"], "N:M needs 0 < N < M"),
        (["--pattern", "2-4"], "pattern"),
        (["--method", "obs", "--sparsity", "0.5"], "method"),
        (["--sparsity", "0.5", "--override", "noequals"], "--override"),
        (["--sparsity", "0.5", "--exclude", "("], "invalid regex"),
        (["--sparsities", "0.3,0.5", "--sparsity", "0.4"], "--sparsity: a sweep"),
        (["--sparsities", "0.3,x"], "--sparsities"),
        (["--sparsities", "0.3,0.5", "--export-sparsities", "0.4"], "--export-sparsities: 0.4 is not among"),
        (["--patterns", "2:4,3:3"], "--patterns"),
    ],
)
def test_bad_arguments_exit_nonzero_with_one_line_and_write_nothing(tiny_model, tmp_path, args, needle):
    out = tmp_path / "o"
    r = cli("--model", tiny_model("llama"), *args, "--out", out)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not out.exists()


def test_missing_model_directory(tmp_path):
    r = cli("--model", tmp_path / "nope", "--sparsity", "0.5", "--out", tmp_path / "o")
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert not (tmp_path / "o").exists()


def test_unusable_calibration_fails_with_its_code_and_writes_nothing(tiny_model, tmp_path):
    (tmp_path / "tiny.txt").write_text("too short")
    r = cli(
        "--model",
        tiny_model("llama"),
        "--sparsity",
        "0.5",
        "--calibration",
        tmp_path / "tiny.txt",
        "--out",
        tmp_path / "o",
    )
    assert r.returncode == 1 and "calibration_error" in r.stderr
    assert not (tmp_path / "o").exists()


HISTORICAL_FLAGS = [
    "--model",
    "--out",
    "--method",
    "--sparsity",
    "--pattern",
    "--calibration",
    "--nsamples",
    "--seqlen",
    "--seed",
    "--eval",
    "--eval-seqlen",
    "--eval-windows",
    "--eval-batch-size",
    "--dtype",
    "--device",
    "--revision",
    "--trust-remote-code",
    "--exclude",
    "--override",
    "--magnitude-scope",
    "--wanda-alpha-search",
    "--blocksize",
    "--percdamp",
    "--true-sequential",
    "--propagate",
    "--schedule",
    "--schedule-values",
    "--schedule-first",
    "--schedule-last",
    "--owl-m",
    "--owl-lambda",
    "--structure-mlp",
    "--structure-heads",
    "--structure-blocks",
    "--structure-score",
    "--bias-compensation",
    "--save-model",
    "--masks",
    "--compact",
    "--json",
]


def test_help_lists_every_flag_with_the_fields_defaults():
    r = subprocess.run(
        [sys.executable, "-m", "cli", "prune", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert r.returncode == 0
    missing = [f for f in HISTORICAL_FLAGS if f" {f} " not in r.stdout]
    assert not missing and "[default: 0.01]" in r.stdout and "magnitude | sparsegpt | wanda" in r.stdout, missing


def test_a_typo_in_the_calibration_path_is_one_line_before_any_loading(tiny_model, tmp_path):
    r = cli(
        "--model",
        tiny_model("llama"),
        "--sparsity",
        "0.5",
        "--calibration",
        tmp_path / "calbration.txt",
        "--out",
        tmp_path / "o",
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    [line] = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert line.startswith("error: --calibration:") and "calbration.txt" in line
    assert not (tmp_path / "o").exists()


def test_every_problem_is_listed(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep").write_text("x")
    r = cli(
        "--model",
        tmp_path / "nope",
        "--sparsity",
        "0.5",
        "--calibration",
        tmp_path / "typo.txt",
        "--eval",
        tmp_path / "typo.txt",
        "--out",
        tmp_path / "o",
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "4 problems" in r.stderr
    for flag in ("--model", "--calibration", "--eval", "--out"):
        assert f"  {flag}: " in r.stderr, flag


def test_a_setting_of_another_method_is_refused(tiny_model, tmp_path):
    r = cli(
        "--model",
        tiny_model("llama"),
        "--method",
        "wanda",
        "--percdamp",
        "0.05",
        "--sparsity",
        "0.5",
        "--out",
        tmp_path / "o",
    )
    assert r.returncode == 2 and "--percdamp: a setting of sparsegpt" in r.stderr


def test_json_prints_the_metrics(tiny_model, tmp_path):
    src = tiny_model("llama")
    r = cli(
        "--model",
        src,
        "--method",
        "sparsegpt",
        "--percdamp",
        "0.05",
        "--sparsity",
        "0.5",
        "--calibration",
        src / "calibration.txt",
        "--nsamples",
        4,
        "--seqlen",
        32,
        "--out",
        tmp_path / "o",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert metrics["config"]["method_options"] == {"blocksize": 128, "percdamp": 0.05}
    assert metrics["config"] == json.loads((tmp_path / "o" / "metrics.json").read_text())["config"]


def test_a_sweep_prints_one_row_per_target_and_writes_the_plot(tiny_model, tmp_path):
    src = tiny_model("llama")
    out = tmp_path / "sweep"
    cal = src / "calibration.txt"
    r = cli(
        "--model", src, "--sparsities", "0.3,0.5", "--patterns", "2:4", "--export-patterns", "2:4",
        "--calibration", cal, "--nsamples", 8, "--seqlen", 32, "--eval", cal, "--eval-seqlen", 32, "--out", out,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("│")]
    assert [ln.split("│")[1].strip() for ln in rows] == ["dense", "0.3", "0.5", "2:4"], r.stdout
    assert "yes (nm-2-4)" in r.stdout and "sweep.svg" in r.stdout
    assert (out / "sweep.svg").is_file() and (out / "nm-2-4" / "model.safetensors").is_file()
    assert not (out / "sparsity-0.30" / "model.safetensors").exists()
    assert "prune 0.3 (1/3)" in r.stderr or "evaluate 0.3 (1/3)" in r.stderr  # each target's steps are named


def test_sweep_cells():
    from cli.sweep_view import request_targets, targets_text

    assert targets_text([0.7, 0.3, 0.5, 0.4, 0.6], ["2:4"]) == "0.3..0.7 (5) + 2:4"
    assert targets_text([0.5], None) == "0.5"
    assert targets_text(None, ["2:4", "4:8"]) == "2:4, 4:8"
    assert request_targets({"sparsity": 0.5}) is None
