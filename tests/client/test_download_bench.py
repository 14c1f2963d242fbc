"""bench/download.py at a small size, as a test: an artifact served by the real API (embedded defaults, local
storage), its answer cut 3 times mid-body by a TCP proxy, downloaded by the client in a process of its own:
resumed with Range each time, verified, and the download's peak RSS small. The 1 GiB figures are measured by
the script itself (bench/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_an_interrupted_download_resumes_three_times_and_verifies():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "download.py"), "--size-mb", "16", "--cuts", "3", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["cuts"] == 3 and res["ranges"] == 3 and res["verified"]
    size = 16 << 20
    assert res["transferred"] == size  # every byte once: each resume starts where the cut left off
    assert all(0 < a < b < size for a, b in zip(res["resume_at"], res["resume_at"][1:], strict=False))
    assert (res["rss_peak_kib"] - res["rss_before_kib"]) < 64 * 1024
