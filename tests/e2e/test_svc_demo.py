"""The README's first command, on the embedded defaults (SQLite, SQLite-backed broker, local artifacts):
API and worker as separate processes, a real job over HTTP, artifacts downloaded and verified."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_on_embedded_defaults(stories260k: Path, text_dir: Path, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env["SECATEURS_SHARED_DIR"] = str(stories260k.parents[1])
    r = subprocess.run(
        [sys.executable, "-m", "cli.demo", "--data-dir", str(tmp_path / "var"), "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:] + "".join(
        p.read_text()[-3000:] for p in (tmp_path / "var" / "logs").glob("*.log")
    )
    assert "status -> succeeded" in out
    assert "every sha256 verified" in out
    assert "linear-layer sparsity 0.5" in out
    assert "perplexity_pruned" in out
    assert (tmp_path / "var" / "secateurs.db").is_file() and (tmp_path / "var" / "broker.db").is_file()


def test_demo_without_shared_assets_builds_its_own_model(tmp_path: Path):
    """A user's fresh clone has no ../shared and maybe no internet: the demo still runs end to end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env["SECATEURS_SHARED_DIR"] = str(tmp_path / "no-such-dir")
    r = subprocess.run(
        [sys.executable, "-m", "cli.demo", "--data-dir", str(tmp_path / "var"), "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "building a small random-init Llama" in out and "every sha256 verified" in out
    assert "linear-layer sparsity 0.5" in out
