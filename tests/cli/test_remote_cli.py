"""The remote commands (`secateurs jobs ...`, `secateurs calibration ...`) against the real service
(tests/remote_stack.py): their exit statuses (0 succeeded, 1 failed, 2 bad usage, 130 cancelled), their --json
outputs, where the server and key come from, and a local calibration file uploaded once."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.app import app
from client import Client
from tests.conftest import ROOT
from tests.fault_proxy import FaultProxy
from tests.remote_stack import RemoteStack

pytestmark = pytest.mark.slow


class Cli:
    def __init__(self, st: RemoteStack, tmp: Path) -> None:
        self.st = st
        self.env = {
            "SECATEURS_SERVER": st.base,
            "SECATEURS_API_KEY": st.key,
            "SECATEURS_PROFILES": str(tmp / "no-profiles.toml"),
            "SECATEURS_PROFILE": "",
        }

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> Any:
        result = CliRunner().invoke(app, list(args), env={**self.env, **(env or {})}, catch_exceptions=False)
        result.json = None
        if "--json" in args and result.stdout.strip():
            result.json = json.loads(result.stdout)
        return result


@pytest.fixture
def cli(remote_stack: RemoteStack, tmp_path: Path) -> Cli:
    return Cli(remote_stack, tmp_path)


def _flags(st: RemoteStack) -> list[str]:
    return ["-m", str(st.model), "--method", "wanda", "--sparsity", "0.5", "--nsamples", "4", "--seqlen", "32"]


def test_submit_uploads_the_calibration_file_once_waits_and_downloads(cli: Cli, tmp_path: Path):
    st = cli.st
    corpus = tmp_path / "cli-corpus.txt"
    corpus.write_text(st.text[:8000] + "\n\nA paragraph only this test has.", "utf-8")
    out = tmp_path / "pruned"
    r = cli(
        "jobs",
        "submit",
        *_flags(st),
        "--calibration",
        str(corpus),
        "--metadata",
        "case=cli",
        "--wait",
        "--out",
        str(out),
        "--json",
    )
    assert r.exit_code == 0, r.output
    job = r.json
    assert job["status"] == "succeeded" and job["metadata"] == {"case": "cli"}
    assert (job["enqueue"], job["replayed"]) == ("published", False)  # what the creation's answer said
    set_id = job["request"]["calibration"]["calibration_set_id"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 5
    assert (out / "manifest.json").is_file() and not list(tmp_path.glob(".pruned.*"))

    # the same file again (a job through the parked API, so no worker runs it): the set is reused, not uploaded
    r = cli("jobs", "submit", *_flags(st), "--calibration", str(corpus), "--json", "--server", st.s3_base)
    assert r.exit_code == 0, r.output
    assert r.json["status"] == "queued" and r.json["request"]["calibration"]["calibration_set_id"] == set_id
    assert r.json["enqueue"] == "published"
    with st.client() as c:
        sha = c.get_calibration_set(set_id).sha256
        assert [s.id for s in c.iter_calibration_sets() if s.sha256 == sha] == [set_id]
        c.cancel_job(r.json["id"])

    # a job document, with a flag on top; calibration upload is idempotent by content too
    doc = tmp_path / "job.json"
    doc.write_text(json.dumps({"model": str(st.model), "method": "magnitude", "sparsity": 0.3, "metadata": {"a": "b"}}))
    r = cli("jobs", "submit", "--file", str(doc), "--sparsity", "0.4", "--json", "--server", st.s3_base)
    assert r.exit_code == 0, r.output
    assert (r.json["method"], r.json["sparsity"], r.json["metadata"]) == ("magnitude", 0.4, {"a": "b"})
    cli("jobs", "cancel", r.json["id"])
    r = cli("calibration", "upload", str(corpus), "--json")
    assert r.exit_code == 0 and r.json["id"] == set_id
    r = cli("calibration", "show", set_id, "--json")
    assert r.exit_code == 0 and r.json["sha256"] == sha
    r = cli("calibration", "list", "--json")
    assert r.exit_code == 0 and set_id in [s["id"] for s in r.json]
    r = cli("calibration", "list")
    assert r.exit_code == 0 and set_id in r.stdout

    # show, list and download of that job
    r = cli("jobs", "show", job["id"], "--json")
    assert r.exit_code == 0 and r.json["id"] == job["id"] and r.json["metrics"]["achieved_sparsity"] > 0.49
    r = cli("jobs", "show", job["id"])
    assert r.exit_code == 0 and "succeeded" in r.stdout and "achieved sparsity" in r.stdout
    r = cli("jobs", "list", "--limit", "2", "--json")
    assert r.exit_code == 0 and len(r.json) == 2 and all("status" in j for j in r.json)
    r = cli("jobs", "list", "--status", "succeeded", "--all")
    assert r.exit_code == 0 and job["id"] in r.stdout
    r = cli("jobs", "download", job["id"], str(tmp_path / "again"), "--json")
    assert r.exit_code == 0, r.output
    assert r.json["path"] == str(tmp_path / "again") and {f["name"] for f in r.json["files"]} >= {"config.json"}
    r = cli("jobs", "download", job["id"], str(tmp_path / "again"))
    assert r.exit_code == 1 and "not an empty directory" in r.stderr
    r = cli("jobs", "watch", job["id"], "--json")
    assert r.exit_code == 0 and r.json["status"] == "succeeded"


def test_exit_statuses_of_bad_usage_and_of_failures(cli: Cli, tmp_path: Path):
    st = cli.st
    # 2: bad usage, found here or by the server (named after the flag)
    r = cli("jobs", "submit", *_flags(st), "--no-such-flag")
    assert r.exit_code == 2
    cal = str(st.cal_file)
    r = cli("jobs", "submit", *_flags(st)[:-6], "--sparsity", "1.5", "--calibration", cal)
    assert r.exit_code == 2 and "--sparsity" in r.stderr, r.output
    r = cli("jobs", "submit", *_flags(st), "--seqlen", "1", "--json")
    assert r.exit_code == 2 and r.json["error"]["code"] == "validation_error" and "--seqlen" in r.stderr
    r = cli("jobs", "submit", *_flags(st), "--calibration", str(tmp_path / "missing.txt"))
    assert r.exit_code == 2 and "--calibration" in r.stderr
    r = cli("jobs", "submit", "--method", "wanda")
    assert r.exit_code == 2 and "--model" in r.stderr
    r = cli("jobs", "list", env={"SECATEURS_SERVER": ""})
    assert r.exit_code == 2 and "no server" in r.stderr
    r = cli("jobs", "list", "--profile", "nope")
    assert r.exit_code == 2 and "[nope]" in r.stderr
    # 1: failed, with the error's code and message
    r = cli("jobs", "show", "job_nope")
    assert r.exit_code == 1 and "not_found" in r.stderr
    r = cli("jobs", "show", "job_nope", "--json")
    assert r.exit_code == 1 and r.json["error"]["status"] == 404 and r.json["error"]["code"] == "not_found"
    r = cli("jobs", "list", "--api-key", "sct_wrong")
    assert r.exit_code == 1 and "unauthorized" in r.stderr
    r = cli("jobs", "list", "--server", "http://127.0.0.1:9", env={"SECATEURS_RETRIES": "1"})  # nothing listens
    assert r.exit_code == 1 and "ConnectionFailed" in r.stderr
    r = cli("jobs", "submit", "-m", "no-such-org/no-such-model", *_flags(st)[2:], "--calibration", cal, "--wait")
    assert r.exit_code == 1 and "model_not_found" in r.stderr, r.output


def test_profiles_choose_the_server_and_key(cli: Cli, tmp_path: Path):
    st = cli.st
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(
        f'[default]\nserver = "http://127.0.0.1:9"\napi_key = "sct_wrong"\nretries = 1\n\n'
        f'[stack]\nserver = "{st.base}"\napi_key = "{st.key}"\n'
    )
    bare = {"SECATEURS_SERVER": "", "SECATEURS_API_KEY": "", "SECATEURS_PROFILES": str(profiles)}
    r = cli("jobs", "list", "--profile", "stack", "--json", env=bare)
    assert r.exit_code == 0 and isinstance(r.json, list)
    r = cli("jobs", "list", "--json", env={**bare, "SECATEURS_PROFILE": "stack"})
    assert r.exit_code == 0
    r = cli("jobs", "list", "--json", env=bare)  # [default]: nothing listens there
    assert r.exit_code == 1
    r = cli("jobs", "list", "--json", env={**bare, "SECATEURS_SERVER": st.base, "SECATEURS_API_KEY": st.key})
    assert r.exit_code == 0  # the environment before [default]
    xdg = tmp_path / "xdg"
    (xdg / "secateurs").mkdir(parents=True)
    shutil.copy(profiles, xdg / "secateurs" / "profiles.toml")
    r = cli("jobs", "list", "--profile", "stack", env={**bare, "SECATEURS_PROFILES": "", "XDG_CONFIG_HOME": str(xdg)})
    assert r.exit_code == 0, r.output


def test_cancelled_jobs_and_interrupts_exit_130(cli: Cli, remote_stack: RemoteStack, parked_job: str):
    st = remote_stack
    # `jobs watch` of a job that stays queued, in its own process, interrupted with ^C
    proxy = FaultProxy(int(st.s3_base.rsplit(":", 1)[1]))
    env = {**st.env, "SECATEURS_SERVER": proxy.url, "SECATEURS_API_KEY": st.key, "SECATEURS_PROFILES": "/nonexistent"}
    try:
        p = subprocess.Popen(
            [sys.executable, "-m", "cli", "jobs", "watch", parked_job],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not proxy.requests("/events/stream"):  # following it
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        _, stderr = p.communicate(timeout=30)
        assert p.returncode == 130, stderr
    finally:
        proxy.close()
    # cancelled: `cancel` succeeds (0); following a cancelled job exits 130
    r = cli("jobs", "cancel", parked_job, "--json", "--server", st.s3_base)
    assert r.exit_code == 0 and r.json["status"] == "cancelled"
    r = cli("jobs", "watch", parked_job, "--json")
    assert r.exit_code == 130 and r.json["status"] == "cancelled"
    r = cli("jobs", "watch", parked_job, "--poll")
    assert r.exit_code == 130 and "cancelled" in r.stderr
    with Client(st.base, st.key) as c:
        job = c.create_job(st.job_body(metadata={"case": "cancel-while-waiting"}))
        assert c.cancel_job(job.id).status in ("cancelled", "cancelling")
    r = cli("jobs", "watch", job.id)
    assert r.exit_code == 130, r.output
    r = cli("jobs", "cancel", "job_nope")
    assert r.exit_code == 1 and "not_found" in r.stderr
