"""lm-eval tasks in real jobs: created over the API, run by a real Celery worker process on Postgres + Redis.
The shipped task's scores reach the job's metrics, with `evaluate` task j/M in its progress; a task whose data
file is missing fails the job with `task_unavailable` before anything is loaded or pruned."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.pruning import tasks
from tests.conftest import ROOT, require
from tests.core.pruning.test_tasks import broken_task
from tests.service_fixtures import REDIS_URL, Api, redis_up

TASK = "tinystories_continuation"


@dataclass
class Stack:
    api: Api
    headers: dict[str, str]
    model: Path
    calibration: Path
    task_root: Path
    log: Path

    def run(self, evaluation: dict[str, Any], timeout: float = 300) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        body = {
            "model": str(self.model),
            "method": "wanda",
            "sparsity": 0.5,
            "calibration": {"texts": [self.calibration.read_text("utf-8")], "nsamples": 8, "seqlen": 128},
            "evaluation": evaluation,
        }
        c = self.api.client
        r = c.post("/v1/pruning-jobs", json=body, headers=self.headers)
        assert r.status_code == 201, r.text
        jid = r.json()["id"]
        deadline = time.monotonic() + timeout
        while (job := c.get(f"/v1/pruning-jobs/{jid}", headers=self.headers).json())["status"] not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            assert time.monotonic() < deadline, f"job {jid} still {job['status']}\n{self.log.read_text()[-4000:]}"
            time.sleep(0.5)
        events = c.get(f"/v1/pruning-jobs/{jid}/events", params={"limit": 1000}, headers=self.headers).json()
        return job, events["data"]


@pytest.fixture(scope="module")
def stack(
    pg_database: str, stories260k: Path, text_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    require(redis_up(), f"Redis not reachable at {REDIS_URL}")
    require(tasks.installed(), "lm-eval is not installed (pip install 'secateurs[lmeval]')")
    from fastapi.testclient import TestClient

    from api.app import create_app
    from core.settings import Settings

    tmp = tmp_path_factory.mktemp("worker-tasks")
    model = tmp / "models" / "stories260k"
    shutil.copytree(stories260k, model, copy_function=shutil.copyfile)
    for p in [model, *model.rglob("*")]:  # shared/ may be read-only
        p.chmod(0o755 if p.is_dir() else 0o644)
    task_root = tmp / "tasks"
    broken_task(task_root / "broken", tmp / "gone.jsonl")
    calibration = tmp / "calibration.txt"
    calibration.write_text((text_dir / "tinystories-valid.txt").read_text("utf-8")[:8000], "utf-8")
    queue = f"secateurs-tasks-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env.update(
        SECATEURS_ENV="test",
        SECATEURS_DATA_DIR=str(tmp / "var"),
        SECATEURS_DATABASE_URL=pg_database,
        SECATEURS_BROKER_URL=REDIS_URL,
        SECATEURS_QUEUE=queue,
        SECATEURS_SECRET_KEY="tasks-secret",
        SECATEURS_ALLOWED_MODEL_ROOTS=str(tmp / "models"),
        SECATEURS_ALLOWED_TASK_ROOTS=str(task_root),
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
        secret_key="tasks-secret",
        allowed_model_roots=[tmp / "models"],
        allowed_task_roots=[task_root],
    )
    settings.ensure_dirs()
    log = tmp / "worker.log"
    cmd = [sys.executable, "-m", "celery", "-A", "worker.main", "worker", "--loglevel=INFO", "--pool=prefork"]
    cmd += ["--concurrency=1", "-Q", queue, "--without-gossip", "--without-mingle", "--without-heartbeat"]
    cmd += [f"--hostname=tasks-{uuid.uuid4().hex[:4]}@%h"]
    worker = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            api = Api(settings, client)
            _, headers = api.tenant()
            yield Stack(api, headers, model, calibration, task_root, log)
    finally:
        import signal

        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(5)
        import redis

        redis.Redis.from_url(REDIS_URL).delete(queue)


def test_the_shipped_task_scores_reach_the_jobs_metrics(stack: Stack) -> None:
    job, events = stack.run({"tasks": [TASK], "limit": 16, "batch_size": 16})
    assert job["status"] == "succeeded", (job, stack.log.read_text()[-4000:])
    scores = job["metrics"]["tasks"]
    assert scores["lm_eval_version"] == tasks.lm_eval_version() and scores["versions"] == {TASK: 1.0}
    for stage in ("dense", "pruned"):
        assert 0 <= scores[stage][TASK]["acc"] <= 1 and scores[stage][TASK]["acc_stderr"] >= 0
    assert job["metrics"]["perplexity"] is None  # tasks only
    progress = [e["data"] for e in events if e["type"] == "progress"]
    for stage in ("evaluate_dense", "evaluate"):
        mine = [p for p in progress if p["stage"] == stage]
        assert mine[0]["message"] == f"lm-eval task 1/1: {TASK}" and mine[0]["data"]["task"] == TASK
        assert mine[-1]["total_blocks"] == 1 and mine[-1]["block"] == 0


def test_a_task_whose_data_file_is_missing_fails_before_pruning(stack: Stack) -> None:
    job, events = stack.run({"tasks": ["broken_local"], "task_paths": [str(stack.task_root / "broken")]})
    assert job["status"] == "failed" and job["error"]["code"] == "task_unavailable", job
    assert "broken_local" in job["error"]["message"]
    assert not [e for e in events if e["type"] == "progress"]  # nothing loaded, nothing pruned
