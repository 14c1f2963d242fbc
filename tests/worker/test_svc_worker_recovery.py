"""Recovery in real jobs: created over the API, run by a real Celery worker process on Postgres + Redis.
A job fine-tunes stories260k with its masks held (progress shows `recover` step i/N with the running loss);
a cancel during recovery ends the job `cancelled` between training steps, with nothing published."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, require
from tests.service_fixtures import REDIS_URL, Api, redis_up

ENDED = ("succeeded", "failed", "cancelled")


@dataclass
class Stack:
    api: Api
    headers: dict[str, str]
    model: Path
    text: str
    log: Path

    def create(self, recovery: dict[str, Any], **kw: Any) -> str:
        c = self.api.client
        cs = c.post("/v1/calibration-sets", files={"file": ("t.txt", self.text.encode())}, headers=self.headers)
        assert cs.status_code == 201, cs.text
        body = {
            "model": str(self.model),
            "method": "wanda",
            "pattern": "2:4",
            "calibration": {"calibration_set_id": cs.json()["id"], "nsamples": 8, "seqlen": 64},
            "evaluation": {"calibration_set_id": cs.json()["id"], "seqlen": 64, "max_windows": 8},
            # the same uploaded set: training draws only from the tokens after the evaluated windows
            "recovery": {"calibration_set_id": cs.json()["id"], **recovery},
            **kw,
        }
        r = c.post("/v1/pruning-jobs", json=body, headers=self.headers)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def get(self, jid: str) -> dict[str, Any]:
        return dict(self.api.client.get(f"/v1/pruning-jobs/{jid}", headers=self.headers).json())

    def wait(self, jid: str, until: tuple[str, ...] = ENDED, timeout: float = 240) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (job := self.get(jid))["status"] not in until:
            assert time.monotonic() < deadline, f"job {jid} still {job['status']}\n{self.log.read_text()[-4000:]}"
            time.sleep(0.3)
        return job

    def events(self, jid: str) -> list[dict[str, Any]]:
        r = self.api.client.get(f"/v1/pruning-jobs/{jid}/events", params={"limit": 1000}, headers=self.headers)
        return list(r.json()["data"])


@pytest.fixture(scope="module")
def stack(
    pg_database: str, stories260k: Path, text_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    require(redis_up(), f"Redis not reachable at {REDIS_URL}")
    from fastapi.testclient import TestClient

    from api.app import create_app
    from core.settings import Settings

    tmp = tmp_path_factory.mktemp("worker-recovery")
    model = tmp / "models" / "stories260k"
    shutil.copytree(stories260k, model, copy_function=shutil.copyfile)
    for p in [model, *model.rglob("*")]:  # shared/ may be read-only
        p.chmod(0o755 if p.is_dir() else 0o644)
    text = (text_dir / "tinystories-valid.txt").read_text("utf-8")[:40000]
    queue = f"secateurs-recovery-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env.update(
        SECATEURS_ENV="test",
        SECATEURS_DATA_DIR=str(tmp / "var"),
        SECATEURS_DATABASE_URL=pg_database,
        SECATEURS_BROKER_URL=REDIS_URL,
        SECATEURS_QUEUE=queue,
        SECATEURS_SECRET_KEY="recovery-secret",
        SECATEURS_ALLOWED_MODEL_ROOTS=str(tmp / "models"),
        SECATEURS_PROGRESS_EVENT_INTERVAL_SECONDS="0",
        SECATEURS_DEVICE="cpu",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="2",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    settings = Settings(
        _env_file=None,
        env="test",
        data_dir=tmp / "var",
        database_url=pg_database,
        broker_url=REDIS_URL,
        queue=queue,
        secret_key="recovery-secret",
        allowed_model_roots=[tmp / "models"],
    )
    settings.ensure_dirs()
    log = tmp / "worker.log"
    cmd = [sys.executable, "-m", "celery", "-A", "worker.main", "worker", "--loglevel=INFO", "--pool=prefork"]
    cmd += ["--concurrency=1", "-Q", queue, "--without-gossip", "--without-mingle", "--without-heartbeat"]
    cmd += [f"--hostname=recovery-{uuid.uuid4().hex[:4]}@%h"]
    worker = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            api = Api(settings, client)
            _, headers = api.tenant()
            yield Stack(api, headers, model, text, log)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(5)
        import redis

        redis.Redis.from_url(REDIS_URL).delete(queue)


def test_a_job_recovers_with_masks_held_and_reports_its_steps(stack: Stack) -> None:
    jid = stack.create({"steps": 6, "lr": 2e-3, "batch_size": 4, "seqlen": 64})
    job = stack.wait(jid)
    assert job["status"] == "succeeded", (job, stack.log.read_text()[-4000:])
    m = job["metrics"]
    assert m["recovery"]["mask_violations"] == 0 and m["recovery"]["steps"] == 6
    assert "same file as evaluation" in m["recovery"]["data"]["split"]
    assert m["perplexity"]["recovered"] < m["perplexity"]["pruned"]
    progress = [e["data"] for e in stack.events(jid) if e["type"] == "progress"]
    recover = [p for p in progress if p["stage"] == "recover"]
    assert [p["message"].split(" loss ")[0] for p in recover] == [f"step {i}/6" for i in range(1, 7)]
    stages = list(dict.fromkeys(p["stage"] for p in progress))
    assert stages.index("prune") < stages.index("evaluate_pruned") < stages.index("recover") < stages.index("export")
    fractions = [p["fraction"] for p in progress if "fraction" in p]
    assert fractions == sorted(fractions)
    names = {
        a["name"]
        for a in stack.api.client.get(f"/v1/pruning-jobs/{jid}/artifacts", headers=stack.headers).json()["data"]
    }
    assert {"metrics.json", "masks.safetensors"} <= names


def test_cancel_during_recovery_ends_cancelled_with_nothing_published(stack: Stack) -> None:
    from core.storage import keys, make_storage

    jid = stack.create({"steps": 100_000, "batch_size": 2, "seqlen": 32})
    deadline = time.monotonic() + 240
    while not any(e["type"] == "progress" and e["data"]["stage"] == "recover" for e in stack.events(jid)):
        assert time.monotonic() < deadline, stack.log.read_text()[-4000:]
        assert stack.get(jid)["status"] not in ENDED, stack.get(jid)
        time.sleep(0.3)
    r = stack.api.client.post(f"/v1/pruning-jobs/{jid}/cancel", headers=stack.headers)
    assert r.status_code in (200, 202), r.text
    job = stack.wait(jid, timeout=60)
    assert job["status"] == "cancelled", job
    arts = stack.api.client.get(f"/v1/pruning-jobs/{jid}/artifacts", headers=stack.headers).json()["data"]
    assert arts == []
    tenant = job.get("tenant_id") or _tenant_of(stack, jid)
    storage = make_storage(stack.api.settings)
    assert storage.list(keys.attempt_prefix(tenant, jid, 1)) == []
    steps = [
        e["data"]["data"]["step"]
        for e in stack.events(jid)
        if e["type"] == "progress" and e["data"]["stage"] == "recover"
    ]
    assert 1 <= max(steps) < 100_000


def _tenant_of(stack: Stack, jid: str) -> str:
    from core.db.engine import session_scope
    from core.db.models import Job

    with session_scope(stack.api.settings.db_url) as s:
        return str(s.get(Job, jid).tenant_id)
