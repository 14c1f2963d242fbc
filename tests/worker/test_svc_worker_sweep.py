"""A sweep job end to end (tests/remote_stack.py: uvicorn, Postgres, Redis, a real Celery worker): submitted with
`secateurs jobs submit --sparsities ... --patterns ...`, run once by the worker, its per-target directories and
the plot uploaded as artifacts, downloaded by the client into a directory whose exported target transformers
loads, and shown by `jobs show` / `jobs list` as a sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from tests.remote_stack import RemoteStack

pytestmark = pytest.mark.slow


def test_a_sweep_job_gives_per_target_results_artifacts_and_a_plot(remote_stack: RemoteStack, tmp_path: Path) -> None:
    st = remote_stack
    env = {
        "SECATEURS_SERVER": st.base,
        "SECATEURS_API_KEY": st.key,
        "SECATEURS_PROFILES": str(tmp_path / "no-profiles.toml"),
        "SECATEURS_PROFILE": "",
    }

    def cli(*args: str):  # noqa: ANN202
        return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)

    text = tmp_path / "text.txt"
    text.write_text(st.text[:8000], "utf-8")
    out = tmp_path / "out"
    r = cli(
        "jobs", "submit", "-m", str(st.model), "--method", "wanda",
        "--sparsities", "0.3,0.6", "--patterns", "2:4", "--export-sparsities", "0.6",
        "--calibration", str(text), "--nsamples", "4", "--seqlen", "32",
        "--eval", str(text), "--eval-seqlen", "32", "--eval-windows", "4",
        "--wait", "--out", str(out), "--json",
    )  # fmt: skip
    assert r.exit_code == 0, (r.output, st.logs())
    job = json.loads(r.stdout)
    assert job["status"] == "succeeded" and job["request"]["sparsities"] == [0.3, 0.6]
    sweep = job["metrics"]["sweep"]
    points = sweep["points"]
    assert [p["target"] for p in points] == [0.3, 0.6, "2:4"]
    assert [p["exported"] for p in points] == [False, True, False]
    assert all(p["perplexity"] > 0 for p in points) and sweep["dense_perplexity"] > 0

    with st.http() as c:
        events = c.get(f"/v1/pruning-jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        names = {a["name"] for a in c.get(f"/v1/pruning-jobs/{job['id']}/artifacts").json()["data"]}
    stages = {e["data"].get("stage") for e in events if e["type"] == "progress"}
    assert {"prune", "evaluate 0.3 (1/3)", "evaluate 2:4 (3/3)"} <= stages, stages
    assert {"sweep.svg", "metrics.json", "sparsity-0.60/model.safetensors", "nm-2-4/metrics.json"} <= names
    assert "sparsity-0.30/model.safetensors" not in names

    assert (out / "sweep.svg").read_text().startswith("<svg")
    assert json.loads((out / "metrics.json").read_text())["sweep"]["points"][1]["dir"] == "sparsity-0.60"
    for d in ("sparsity-0.30", "nm-2-4"):
        assert (out / d / "metrics.json").is_file() and not (out / d / "model.safetensors").exists()
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out / "sparsity-0.60")
    w = model.model.layers[0].mlp.down_proj.weight
    assert abs(float((w == 0).float().mean()) - 0.6) < 0.02

    r = cli("jobs", "show", job["id"])
    assert r.exit_code == 0 and "0.3..0.6 (2) + 2:4" in r.stdout and "sparsity-0.60" in r.stdout, r.stdout
    r = cli("jobs", "list", "--limit", "5")
    assert r.exit_code == 0 and "0.3..0.6 (2) + 2:4" in r.stdout, r.stdout
