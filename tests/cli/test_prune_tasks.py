"""`secateurs prune --tasks`: lm-eval tasks before and after pruning, from the command line (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from core.pruning import tasks
from tests.conftest import require
from tests.core.pruning.test_tasks import broken_task


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cli", "prune", *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )


def common(model: Path, text_dir: Path, out: Path) -> list[object]:
    require(tasks.installed(), "lm-eval is not installed (pip install 'secateurs[lmeval]')")
    cal = text_dir / "tinystories-valid.txt"
    return ["-m", model, "--sparsity", 0.5, "--calibration", cal, "--nsamples", 8, "--seqlen", 128, "--out", out]


def test_the_shipped_task_before_and_after_pruning(stories260k: Path, text_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = cli(*common(stories260k, text_dir, out), "--tasks", "tinystories_continuation", "--eval-limit", 16)
    assert r.returncode == 0, r.stderr
    assert "tinystories_continuation acc" in r.stdout and "perplexity" not in r.stdout  # tasks only: no perplexity
    m = json.loads((out / "metrics.json").read_text())
    assert m["perplexity"] is None
    scores = m["tasks"]
    assert scores["samples"] == {"tinystories_continuation": 16} and scores["limit"] == 16
    for stage in ("dense", "pruned"):
        acc = scores[stage]["tinystories_continuation"]
        assert 0 <= acc["acc"] <= 1 and acc["acc_stderr"] >= 0
    assert m["timings"]["evaluate_dense"] > 0 and m["timings"]["evaluate"] > 0


def test_a_task_whose_data_is_missing_is_bad_input_and_writes_nothing(
    stories260k: Path, text_dir: Path, tmp_path: Path
) -> None:
    root = broken_task(tmp_path / "tasks", tmp_path / "gone.jsonl")
    out = tmp_path / "out"
    r = cli(*common(stories260k, text_dir, out), "--tasks", "broken_local", "--task-path", root)
    assert r.returncode == 2, r.stderr
    assert "--tasks" in r.stderr and "broken_local" in r.stderr and "cannot be had" in r.stderr
    assert not out.exists()
