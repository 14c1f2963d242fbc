"""Jobs that resume (issue 22) on the real service: real Celery worker processes on Postgres + Redis, artifacts
and resume checkpoints on S3 (moto's server). A worker SIGKILLed mid-job (after block 4 of 8 is checkpointed):
the next attempt, in a fresh worker, resumes at the first unfinished block and its masks equal an uninterrupted
run's. The checkpoint is removed when the job succeeds, fails or is cancelled, and the sweeper removes that of a
job that ended without removing it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from core.storage import keys
from tests.conftest import ROOT, require
from tests.fixtures import tiny_models
from tests.service_fixtures import REDIS_URL, Api, redis_up

BUCKET = "secateurs-resume"
BLOCKS = 8
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Stack:
    api: Api
    headers: dict[str, str]
    tenant: str
    env: dict[str, str]
    settings: Any
    storage: Any
    model: Path
    tmp: Path
    workers: list[subprocess.Popen]

    def start_worker(self) -> subprocess.Popen:
        n = len(self.workers)
        cmd = [sys.executable, "-m", "celery", "-A", "worker.main", "worker", "--loglevel=INFO", "--pool=prefork"]
        cmd += ["--concurrency=1", "-Q", self.env["SECATEURS_QUEUE"], "--without-gossip", "--without-mingle"]
        cmd += ["--without-heartbeat", f"--hostname=resume{n}-{uuid.uuid4().hex[:4]}@%h"]
        log = open(self.tmp / f"worker-{n}.log", "w")
        p = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append(p)
        return p

    def logs(self) -> str:
        return "\n".join((self.tmp / f"worker-{i}.log").read_text()[-3000:] for i in range(len(self.workers)))

    def body(self, method: str = "wanda") -> dict[str, Any]:
        return {
            "model": str(self.model),
            "method": method,
            "sparsity": 0.5,
            "calibration": {"texts": [tiny_models.CORPUS * 40], "nsamples": 32, "seqlen": 128},
        }

    def submit(self, body: dict[str, Any]) -> str:
        r = self.api.client.post("/v1/pruning-jobs", json=body, headers=self.headers)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job(self, jid: str) -> dict[str, Any]:
        return self.api.client.get(f"/v1/pruning-jobs/{jid}", headers=self.headers).json()

    def events(self, jid: str) -> list[dict[str, Any]]:
        r = self.api.client.get(f"/v1/pruning-jobs/{jid}/events", params={"limit": 1000}, headers=self.headers)
        return r.json()["data"]

    def resume_keys(self, jid: str) -> list[str]:
        return self.storage.list(keys.resume_prefix(self.tenant, jid))

    def records(self, jid: str) -> int:
        return sum(1 for k in self.resume_keys(jid) if k.endswith(".json"))

    def until(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while not (v := pred()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}\n{self.logs()}"
            time.sleep(0.05)
        return v

    def ended(self, jid: str, timeout: float = 120) -> dict[str, Any]:
        return self.until(lambda: (j := self.job(jid))["status"] in TERMINAL and j, timeout, f"{jid} to end")


def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(10)


@pytest.fixture(scope="module")
def stack(pg_database: str, moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require(redis_up(), f"Redis not reachable at {REDIS_URL}")
    from fastapi.testclient import TestClient
    from transformers import LlamaConfig, LlamaForCausalLM

    from api.app import create_app
    from core.settings import Settings
    from core.storage.s3 import S3Storage

    tmp = tmp_path_factory.mktemp("resume")
    model = tmp / "models" / "deep"
    cfg = LlamaConfig(
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=BLOCKS,
        num_attention_heads=6,
        num_key_value_heads=6,
        vocab_size=tiny_models.VOCAB,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(model, safe_serialization=True)
    tiny_models.tokenizer().save_pretrained(model)
    queue = f"secateurs-resume-{uuid.uuid4().hex[:8]}"
    values = {
        "ENV": "test",
        "DATA_DIR": str(tmp / "var"),
        "DATABASE_URL": pg_database,
        "BROKER_URL": REDIS_URL,
        "QUEUE": queue,
        "SECRET_KEY": "resume-secret",
        "ALLOWED_MODEL_ROOTS": str(tmp / "models"),
        "STORAGE_BACKEND": "s3",
        "S3_BUCKET": BUCKET,
        "S3_ENDPOINT_URL": moto_server,
        "S3_ACCESS_KEY_ID": "testing",
        "S3_SECRET_ACCESS_KEY": "testing",
        "LEASE_SECONDS": "3",
        "REAPER_INTERVAL_SECONDS": "1",
        "REDELIVER_AFTER_SECONDS": "3",
        "MAX_ATTEMPTS": "3",
        "PROGRESS_EVENT_INTERVAL_SECONDS": "0",
        "DEVICE": "cpu",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env.update({f"SECATEURS_{k}": v for k, v in values.items()})
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    settings = Settings(_env_file=None, **{k.lower(): v for k, v in values.items()})
    settings.ensure_dirs()
    storage = S3Storage(BUCKET, endpoint_url=moto_server, access_key_id="testing", secret_access_key="testing")
    storage.ensure_bucket()
    workers: list[subprocess.Popen] = []
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            api = Api(settings, client)
            tid, headers = api.tenant()
            yield Stack(api, headers, tid, env, settings, storage, model, tmp, workers)
    finally:
        for w in workers:
            kill_group(w)
        import redis

        redis.Redis.from_url(REDIS_URL).delete(queue)


def reference_masks(st: Stack, body: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    """The same job uninterrupted, in this process with the worker's one thread."""
    from core.pruning.config import PruneConfig
    from core.pruning.run import prune

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = prune(PruneConfig.model_validate({**body, "device": "cpu"}), out)
    finally:
        torch.set_num_threads(threads)
    return load_file(str(res.out_dir / "masks.safetensors"))


def test_the_sweeper_removes_checkpoints_of_ended_jobs(stack: Stack, tmp_path: Path):
    from core.db.engine import session_scope
    from core.db.repositories import JobRepository
    from worker.celery_app import make_celery
    from worker.sweep import sweep

    st = stack
    blob = tmp_path / "x"
    blob.write_bytes(b"x")
    from datetime import timedelta

    from core.db.models import utcnow
    from core.jobs.schemas import JobCreate
    from core.jobs.service import JobService

    with session_scope(st.settings.db_url) as sess:  # (not published: no worker runs yet, none will run these)
        svc = JobService(sess, st.tenant, st.settings)
        ended, running = (svc.create(JobCreate.model_validate(st.body())).id for _ in range(2))
    with session_scope(st.settings.db_url) as sess:
        for jid, status in ((ended, "failed"), (running, "running")):
            job = JobRepository(sess, st.tenant).get(jid, lock=True)
            job.status, job.lease_expires_at = status, utcnow() + timedelta(hours=1)
    for jid in (ended, running, "job_gone"):
        st.storage.put_file(keys.resume_prefix(st.tenant, jid) + "block-00000.json", blob)
    counts = sweep(st.settings, make_celery(st.settings))
    assert counts["resume_removed"] == 2
    assert st.resume_keys(ended) == [] and st.resume_keys("job_gone") == []
    assert st.resume_keys(running) != []
    st.storage.delete_prefix(keys.resume_prefix(st.tenant, running))
    with session_scope(st.settings.db_url) as sess:
        JobRepository(sess, st.tenant).get(running, lock=True).status = "cancelled"


def test_a_failed_job_leaves_no_checkpoint(stack: Stack, monkeypatch: pytest.MonkeyPatch):
    """Fails in this process (run_job, as the Celery task calls it) after two blocks were checkpointed."""
    from core.pruning import checkpoints
    from worker.runner import run_job

    st = stack
    save = checkpoints.Checkpoints.save

    def failing(self, i: int, *a: Any, **kw: Any) -> None:  # noqa: ANN001
        save(self, i, *a, **kw)
        if i == 1:
            raise RuntimeError("injected failure after block 2")

    monkeypatch.setattr(checkpoints.Checkpoints, "save", failing)
    body = st.body("magnitude")
    from core.db.engine import session_scope
    from core.jobs.schemas import JobCreate
    from core.jobs.service import JobService

    with session_scope(st.settings.db_url) as sess:
        jid = JobService(sess, st.tenant, st.settings).create(JobCreate.model_validate(body)).id
    assert run_job(st.settings, st.tenant, jid, "in-process") == "failed"
    job = st.job(jid)
    assert job["status"] == "failed" and "injected failure" in job["error"]["message"]
    assert st.resume_keys(jid) == []


def test_a_job_killed_mid_prune_resumes_at_its_first_unfinished_block(stack: Stack, tmp_path: Path):
    st = stack
    first = st.start_worker()
    body = st.body()
    jid = st.submit(body)
    st.until(lambda: st.records(jid) >= 4, 120, "4 blocks checkpointed")
    kill_group(first)  # SIGKILL of the worker's whole process group, mid-job
    done = st.records(jid)
    assert 4 <= done < BLOCKS, done  # the kill came before the end of the walk
    assert st.job(jid)["status"] == "running"
    st.start_worker()
    job = st.ended(jid)
    assert job["status"] == "succeeded", (job, st.logs())
    assert job["attempt"] == 2
    messages = [e["data"].get("message", "") for e in st.events(jid) if e["type"] == "log"]
    resumed = [m for m in messages if m.startswith("resumed at block")]
    assert resumed and resumed[0].startswith(f"resumed at block {done + 1} of {BLOCKS} ({done} finished blocks"), (
        messages
    )
    key = keys.artifact(st.tenant, jid, 2, "masks.safetensors")
    got = load_file(str(st.storage.get_file(key, tmp_path / "masks.safetensors")))
    want = reference_masks(st, body, tmp_path / "reference")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert st.resume_keys(jid) == []  # removed once the job succeeded
    assert not any((st.settings.work_path / jid).glob("*"))


def test_a_cancelled_job_leaves_no_checkpoint(stack: Stack):
    st = stack
    if not any(w.poll() is None for w in st.workers):
        st.start_worker()
    jid = st.submit(st.body())
    st.until(lambda: st.records(jid) >= 2, 120, "2 blocks checkpointed")
    r = st.api.client.post(f"/v1/pruning-jobs/{jid}/cancel", headers=st.headers)
    assert r.status_code in (200, 202), r.text
    assert st.ended(jid)["status"] == "cancelled"
    assert st.resume_keys(jid) == []
