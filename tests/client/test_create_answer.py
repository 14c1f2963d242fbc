"""What a creation's answer says beside the job: ``Secateurs-Enqueue`` (published | deferred) and
``Idempotent-Replayed``, on what ``Client.create_job`` returns and in ``secateurs jobs submit --json``. The
server's side of these headers is tested in tests/api/test_svc_publish.py; the real stack's ``published`` in
tests/client/test_client.py and tests/cli/test_remote_cli.py."""

from __future__ import annotations

import json

import httpx
import pytest
from typer.testing import CliRunner

from client import Client, CreatedJob, RetryPolicy

JOB = {
    "id": "job_0191c5f0a3b2c1d2e3f4a5b6c7",
    "object": "pruning_job",
    "status": "queued",
    "model": "/models/m",
    "method": "wanda",
    "sparsity": 0.5,
    "pattern": None,
    "attempt": 0,
    "max_attempts": 3,
    "cancel_requested": False,
    "timestamps": {"created_at": "2026-01-01T00:00:00Z"},
    "progress": None,
    "error": None,
    "metrics": None,
    "metadata": {},
    "request": {"model": "/models/m", "method": "wanda", "sparsity": 0.5},
    "urls": {"self": "http://test/v1/pruning-jobs/job_0191c5f0a3b2c1d2e3f4a5b6c7"},
}


def answering(status: int, headers: dict[str, str], seen: list[httpx.Request] | None = None) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(status, json=JOB, headers=headers)

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    "status,headers,said",
    [
        (201, {"Secateurs-Enqueue": "published"}, ("published", False)),
        (201, {"Secateurs-Enqueue": "deferred"}, ("deferred", False)),
        (201, {"Idempotent-Replayed": "true"}, (None, True)),
        (201, {}, (None, False)),  # a server that does not say
        (201, {"Secateurs-Enqueue": "something-new"}, (None, False)),
    ],
)
def test_create_job_carries_what_the_answer_said(status: int, headers: dict[str, str], said: tuple):
    seen: list[httpx.Request] = []
    with Client("http://test", "k", transport=answering(status, headers, seen)) as c:
        job = c.create_job(model="/models/m", method="wanda", sparsity=0.5)
    assert isinstance(job, CreatedJob) and job.id == JOB["id"]
    assert (job.enqueue, job.replayed) == said
    assert seen[0].headers["idempotency-key"]
    assert job.model_dump(mode="json")["enqueue"] == said[0]


@pytest.mark.parametrize("enqueue", ["published", "deferred"])
def test_submit_json_includes_the_enqueue_answer(monkeypatch, tmp_path, enqueue: str):  # noqa: ANN001
    import cli.jobs
    from cli.app import app

    monkeypatch.setattr(
        cli.jobs,
        "connect",
        lambda *a: Client(
            "http://test",
            "k",
            retry=RetryPolicy(max_retries=0),
            transport=answering(201, {"Secateurs-Enqueue": enqueue}),
        ),
    )
    env = {"SECATEURS_PROFILES": str(tmp_path / "none.toml"), "SECATEURS_SERVER": "http://test"}
    args = ["jobs", "submit", "-m", "/models/m", "--method", "wanda", "--sparsity", "0.5"]
    r = CliRunner().invoke(app, [*args, "--json"], env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["id"] == JOB["id"] and out["enqueue"] == enqueue and out["replayed"] is False
    r = CliRunner().invoke(app, args, env=env, catch_exceptions=False)
    assert r.exit_code == 0 and r.stdout.strip() == JOB["id"]
    assert ("deferred" in r.stderr) == (enqueue == "deferred"), r.stderr
