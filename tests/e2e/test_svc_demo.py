"""The README's first command, on the embedded defaults (SQLite, SQLite-backed broker, local artifacts):
API and worker as separate processes, a real job over HTTP, artifacts downloaded and verified."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
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
    assert "/dashboard/" in out
    # evaluated on TinyStories, the model's own domain (not on text it never saw): single-digit dense perplexity
    ppl = json.loads(out.split("[demo] metrics: ", 1)[1].splitlines()[0])
    assert ppl["perplexity_dense"] < 10 and ppl["perplexity_dense"] < ppl["perplexity_pruned"] < 60, ppl
    assert (tmp_path / "var" / "secateurs.db").is_file() and (tmp_path / "var" / "broker.db").is_file()


def test_demo_without_shared_assets_builds_its_own_model_and_serves_the_dashboard_until_ctrl_c(tmp_path: Path):
    """A user's fresh clone has no ../shared and maybe no internet: the demo still runs end to end. With
    ``--serve`` (``make demo SERVE=1``) the API stays up afterwards: the dashboard answers and lists the job,
    until Ctrl-C stops every process the demo started."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env["SECATEURS_SHARED_DIR"] = str(tmp_path / "no-such-dir")
    cmd = [sys.executable, "-m", "cli.demo", "--data-dir", str(tmp_path / "var"), "--port", "0", "--serve"]
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    try:
        assert p.stdout is not None
        for line in p.stdout:  # the demo prints its last line and then waits: no timeout needed beyond the job's
            lines.append(line)
            if "serving until Ctrl-C" in line:
                break
        out = "".join(lines)
        assert "building a small random-init Llama" in out and "every sha256 verified" in out, out[-4000:]
        assert "linear-layer sparsity 0.5" in out
        m = re.search(r"open (http://\S+/dashboard/) and enter the API key (\S+)", out)
        assert m, out[-2000:]
        page = httpx.get(m.group(1), timeout=10)
        assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
        jobs = httpx.get(
            m.group(1).replace("/dashboard/", "/v1/pruning-jobs"),
            headers={"Authorization": f"Bearer {m.group(2)}"},
            timeout=10,
        ).json()["data"]
        assert [j["status"] for j in jobs] == ["succeeded"]
        p.send_signal(signal.SIGINT)
        rest, _ = p.communicate(timeout=60)
        assert p.returncode == 0 and "[demo] stopping" in rest, rest
        with pytest.raises(httpx.TransportError):  # the API went with it
            httpx.get(m.group(1), timeout=5)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
