"""End to end on the production-shaped stack: Postgres, Redis, S3 (moto server over HTTP), the API under
uvicorn and real Celery worker processes. Tiny models, so each job takes seconds."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, require
from tests.e2e.stack import free_port, kill_group, slow_model
from tests.service_fixtures import REDIS_URL, redis_up, wipe

pytestmark = pytest.mark.slow
BUCKET = "secateurs-e2e"


@dataclass
class Stack:
    base: str
    headers: dict[str, str]
    env: dict[str, str]
    tmp: Path
    tenant: str
    workers: list[subprocess.Popen] = field(default_factory=list)

    def start_worker(self, via_cli: bool = False) -> subprocess.Popen:
        n = len(self.workers)
        log = open(self.tmp / f"worker-{n}.log", "w")
        name = f"w{n}-{uuid.uuid4().hex[:4]}@%h"
        if via_cli:  # `secateurs service worker`
            cmd = [sys.executable, "-c", "from cli.app import main; main()", "service", "worker", "--hostname", name]
        else:
            cmd = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.main",
                "worker",
                "--loglevel=INFO",
                "--pool=prefork",
                "--concurrency=1",
                "-Q",
                self.env["SECATEURS_QUEUE"],
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                f"--hostname={name}",
            ]
        p = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append(p)
        return p

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers=self.headers, timeout=30)


@pytest.fixture(scope="module")
def stack(pg_database: str, moto_server: str, stories260k: Path, text_dir: Path, tmp_path_factory):  # noqa: ANN001, ANN201
    require(redis_up(), f"Redis not reachable at {REDIS_URL}")
    from core.auth import create_key, create_tenant
    from core.db.engine import session_scope
    from core.settings import Settings
    from core.storage.s3 import S3Storage

    wipe(pg_database)
    tmp = tmp_path_factory.mktemp("e2e")
    models = tmp / "models"
    models.mkdir()
    shutil.copytree(stories260k, models / "stories260k", copy_function=shutil.copyfile)
    for p in [models / "stories260k", *(models / "stories260k").rglob("*")]:  # shared/ may be read-only
        p.chmod(0o755 if p.is_dir() else 0o644)
    slow_model(models / "slow", stories260k)
    queue = f"secateurs-e2e-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env.update(
        {
            "SECATEURS_ENV": "test",
            "SECATEURS_DATA_DIR": str(tmp / "var"),
            "SECATEURS_DATABASE_URL": pg_database,
            "SECATEURS_BROKER_URL": REDIS_URL,
            "SECATEURS_QUEUE": queue,
            "SECATEURS_STORAGE_BACKEND": "s3",
            "SECATEURS_S3_BUCKET": BUCKET,
            "SECATEURS_S3_ENDPOINT_URL": moto_server,
            "SECATEURS_S3_PUBLIC_ENDPOINT_URL": moto_server,
            "SECATEURS_S3_ACCESS_KEY_ID": "testing",
            "SECATEURS_S3_SECRET_ACCESS_KEY": "testing",
            "SECATEURS_SECRET_KEY": "e2e-secret",
            "SECATEURS_ALLOWED_MODEL_ROOTS": str(models),
            "SECATEURS_LEASE_SECONDS": "3",
            "SECATEURS_REAPER_INTERVAL_SECONDS": "1",
            "SECATEURS_MAX_ATTEMPTS": "3",
            "SECATEURS_DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "2",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
    )
    storage = S3Storage(BUCKET, endpoint_url=moto_server, access_key_id="testing", secret_access_key="testing")
    storage.ensure_bucket()
    settings = Settings(_env_file=None, database_url=pg_database, secret_key="e2e-secret")
    with session_scope(pg_database) as s:
        tenant = create_tenant(s, "e2e").id
        _, key = create_key(s, tenant, settings.pepper)
    port = free_port()
    api = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "api.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=open(tmp / "api.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    st = Stack(f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}, env, tmp, tenant)
    st.storage = storage  # type: ignore[attr-defined]
    st.models = models  # type: ignore[attr-defined]
    st.text_dir = text_dir  # type: ignore[attr-defined]
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(st.base + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert api.poll() is None and time.time() < deadline, (tmp / "api.log").read_text()[-3000:]
        time.sleep(0.3)
    st.start_worker()
    yield st
    for w in st.workers:
        kill_group(w, signal.SIGTERM)
    kill_group(api, signal.SIGTERM)
    import redis

    redis.Redis.from_url(REDIS_URL).delete(queue)


def _texts(st: Stack) -> list[str]:
    return [(st.text_dir / "tinystories-valid.txt").read_text("utf-8")[:100_000]]  # type: ignore[attr-defined]


def wait_for(c: httpx.Client, job_id: str, pred, timeout: float = 150, st: Stack | None = None) -> dict:  # noqa: ANN001
    deadline = time.time() + timeout
    etag = None
    job = None
    while time.time() < deadline:
        r = c.get(f"/v1/pruning-jobs/{job_id}", headers={"If-None-Match": etag} if etag else {})
        if r.status_code == 200:
            job, etag = r.json(), r.headers["etag"]
        else:
            assert r.status_code == 304
        if pred(job):
            return job
        time.sleep(0.25)
    logs = "".join(p.read_text()[-2000:] for p in st.tmp.glob("worker-*.log")) if st else ""
    raise AssertionError(f"timed out; last state {job}\n{logs}")


def terminal(j: dict) -> bool:
    return j["status"] in ("succeeded", "failed", "cancelled")


def in_prune(j: dict) -> bool:
    p = j.get("progress") or {}
    return j["status"] == "running" and p.get("stage") == "prune" and (p.get("block") or 0) >= 1


def _slow_job_in_prune(c: httpx.Client, st: Stack, method: str) -> str:
    """Submit a job on the slow model and wait until it is pruning its second block; its id."""
    body = {
        "model": str(st.models / "slow"),
        "method": method,
        "sparsity": 0.5,  # type: ignore[attr-defined]
        "calibration": {"texts": _texts(st), "nsamples": 32, "seqlen": 128},
    }
    jid = c.post("/v1/pruning-jobs", json=body).json()["id"]
    wait_for(c, jid, in_prune, st=st)
    return jid


def linear_sparsity(path: Path) -> tuple[float, list]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    zeros = total = 0
    weights = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            zeros += int((mod.weight == 0).sum())
            total += mod.weight.numel()
            weights.append(mod.weight.detach())
    return zeros / total, weights


@pytest.mark.parametrize("spec", [{"sparsity": 0.5}, {"pattern": "2:4"}], ids=["unstructured-50", "2of4"])
def test_job_succeeds_and_every_artifact_verifies(stack: Stack, spec: dict, tmp_path: Path):
    with stack.client() as c:
        cal = c.post(
            "/v1/calibration-sets",
            files={
                "file": (
                    "cal.jsonl",
                    "\n".join(
                        f'{{"text": {__import__("json").dumps(t)}}}' for t in _texts(stack)[0].split("\n\n")[:200]
                    ).encode(),
                )
            },
        )
        assert cal.status_code == 201, cal.text
        body = {
            "model": str(stack.models / "stories260k"),
            "method": "wanda",
            **spec,  # type: ignore[attr-defined]
            "calibration": {"calibration_set_id": cal.json()["id"], "nsamples": 8, "seqlen": 64},
            "metadata": {"case": "e2e"},
        }
        t0 = time.perf_counter()
        r = c.post("/v1/pruning-jobs", json=body)
        assert r.status_code == 201, r.text
        job = wait_for(c, r.json()["id"], terminal, st=stack)
        elapsed = time.perf_counter() - t0
        assert job["status"] == "succeeded", job
        print(f"POST -> succeeded in {elapsed:.1f}s")
        assert job["attempt"] == 1 and job["timestamps"]["succeeded_at"] and job["progress"]["fraction"] == 1.0
        assert abs(job["metrics"]["achieved_sparsity"] - 0.5) < 0.01
        events = c.get(f"/v1/pruning-jobs/{job['id']}/events", params={"limit": 500}).json()["data"]
        fractions = [e["data"]["fraction"] for e in events if e["type"] == "progress"]
        stages = [e["data"]["stage"] for e in events if e["type"] == "progress"]
        assert {"load", "calibrate", "prune", "export"} <= set(stages), stages
        assert all(0 <= f <= 1 for f in fractions) and fractions == sorted(fractions), (
            fractions
        )  # whole run, every stage
        arts = c.get(f"/v1/pruning-jobs/{job['id']}/artifacts").json()["data"]
        names = {a["name"] for a in arts}
        assert {"manifest.json", "metrics.json", "masks.safetensors", "config.json"} <= names
        out = tmp_path / "dl"
        for a in arts:
            r = c.get(a["url"])
            assert r.status_code == 307  # S3: a presigned URL signed for the public endpoint
            loc = r.headers["location"]
            assert "X-Amz-Signature" in loc and f"/tenants/{stack.tenant}/jobs/{job['id']}/attempt-1/" in loc
            data = httpx.get(loc, timeout=30).content
            assert hashlib.sha256(data).hexdigest() == a["sha256"] and len(data) == a["size"]
            (out / a["name"]).parent.mkdir(parents=True, exist_ok=True)
            (out / a["name"]).write_bytes(data)
    sp, weights = linear_sparsity(out)
    assert abs(sp - 0.5) < 0.01
    if "pattern" in spec:  # at most 2 non-zeros in every 4 consecutive inputs
        for w in weights:
            assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2


def test_cancel_a_running_job(stack: Stack):
    with stack.client() as c:
        jid = _slow_job_in_prune(c, stack, "wanda")
        r = c.post(f"/v1/pruning-jobs/{jid}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelling"
        job = wait_for(c, jid, terminal, timeout=60, st=stack)
        assert job["status"] == "cancelled" and job["timestamps"]["cancelling_at"] and job["timestamps"]["cancelled_at"]
        assert job["progress"]["block"] < 23  # stopped between blocks, not at the end
        assert c.get(f"/v1/pruning-jobs/{jid}/artifacts").json()["data"] == []
        assert stack.storage.list(f"tenants/{stack.tenant}/jobs/{jid}/") == []  # type: ignore[attr-defined]
        assert c.post(f"/v1/pruning-jobs/{jid}/cancel").json()["status"] == "cancelled"


def test_sigkill_worker_mid_job_and_the_next_worker_finishes_it(stack: Stack):
    with stack.client() as c:
        jid = _slow_job_in_prune(c, stack, "magnitude")
        victim = stack.workers[-1]
        kill_group(victim, signal.SIGKILL)  # the whole worker: main process and its child
        stack.start_worker(via_cli=True)
        job = wait_for(c, jid, terminal, timeout=180, st=stack)
        assert job["status"] == "succeeded", job
        assert job["attempt"] == 2
        evs = c.get(f"/v1/pruning-jobs/{jid}/events", params={"limit": 1000}).json()["data"]
        statuses = [e["data"]["status"] for e in evs if e["type"] == "status"]
        assert statuses == ["queued", "running", "queued", "running", "succeeded"]
        assert any("worker lost" in (e["data"].get("reason") or "") for e in evs if e["type"] == "status")
        arts = c.get(f"/v1/pruning-jobs/{jid}/artifacts").json()["data"]
        assert arts and all(a["attempt"] == 2 for a in arts)
        keys = stack.storage.list(f"tenants/{stack.tenant}/jobs/{jid}/")  # type: ignore[attr-defined]
        assert keys and all("/attempt-2/" in k for k in keys)


def test_bad_inputs_get_named_4xx_or_a_failed_job_with_the_right_code(stack: Stack):
    ok = {
        "model": str(stack.models / "stories260k"),
        "method": "wanda",
        "sparsity": 0.5,  # type: ignore[attr-defined]
        "calibration": {"texts": ["once upon a time"], "nsamples": 4, "seqlen": 32},
    }
    cases = [
        ({"sparsity": 1.5}, "sparsity"),
        ({"sparsity": None, "pattern": "4:4"}, "pattern"),
        ({"method": "lottery"}, "method"),
        ({"model": "/etc"}, "model"),
        ({"model": str(stack.tmp)}, "model"),
    ]
    with stack.client() as c:
        for patch, fld in cases:
            r = c.post("/v1/pruning-jobs", json={**ok, **patch})
            assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json"), r.text
            p = r.json()
            assert any(fld in e["loc"] for e in p["errors"]) and fld in p["detail"]
        r = c.post("/v1/calibration-sets", files={"file": ("empty.txt", b"")})
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "file"]
        jid = c.post("/v1/pruning-jobs", json={**ok, "model": "no-such-org/no-such-model"}).json()["id"]
        job = wait_for(c, jid, terminal, st=stack)
        assert job["status"] == "failed" and job["error"]["code"] == "model_not_found", job
        assert job["error"]["message"]
        # too little calibration text for the asked window: a failed job, not a crash
        short = {**ok, "calibration": {"texts": ["tiny"], "nsamples": 4, "seqlen": 128}}
        job = wait_for(c, c.post("/v1/pruning-jobs", json=short).json()["id"], terminal, st=stack)
        assert job["status"] == "failed" and job["error"]["code"] == "calibration_error", job


def test_model_from_an_s3_uri(stack: Stack):
    storage = stack.storage  # type: ignore[attr-defined]
    src = stack.models / "stories260k"  # type: ignore[attr-defined]
    for f in src.iterdir():
        storage.client.upload_file(str(f), BUCKET, f"models/stories260k/{f.name}")
    with stack.client() as c:
        body = {
            "model": f"s3://{BUCKET}/models/stories260k/",
            "method": "magnitude",
            "sparsity": 0.3,
            "calibration": {"texts": _texts(stack), "nsamples": 2, "seqlen": 16},
        }
        r = c.post("/v1/pruning-jobs", json=body)
        assert r.status_code == 201, r.text
        job = wait_for(c, r.json()["id"], terminal, st=stack)
        assert job["status"] == "succeeded", job
        assert abs(job["metrics"]["achieved_sparsity"] - 0.3) < 0.01
        missing = c.post("/v1/pruning-jobs", json={**body, "model": f"s3://{BUCKET}/models/nothing-here/"}).json()
        job = wait_for(c, missing["id"], terminal, st=stack)
        assert job["status"] == "failed" and job["error"]["code"] == "model_not_found", job


def test_structured_job_with_owl_schedule_gives_a_smaller_model(stack: Stack, tmp_path: Path):
    """The `structure` and `schedule` blocks of a job body reach the engine: the model that comes back is
    physically smaller and unstructured sparsity was spread by OWL."""
    import json

    from transformers import AutoModelForCausalLM

    with stack.client() as c:
        body = {
            "model": str(stack.models / "stories260k"),
            "method": "wanda",
            "sparsity": 0.5,  # type: ignore[attr-defined]
            "schedule": {"kind": "owl"},
            "structure": {"mlp_channels": 0.25, "blocks": 0.2},
            "calibration": {"texts": _texts(stack), "nsamples": 8, "seqlen": 64},
        }
        r = c.post("/v1/pruning-jobs", json=body)
        assert r.status_code == 201, r.text
        job = wait_for(c, r.json()["id"], terminal, st=stack)
        assert job["status"] == "succeeded", job
        arts = {a["name"]: a for a in c.get(f"/v1/pruning-jobs/{job['id']}/artifacts").json()["data"]}
        out = tmp_path / "dl"
        for name in ("config.json", "model.safetensors", "metrics.json"):
            data = httpx.get(c.get(arts[name]["url"]).headers["location"], timeout=30).content
            assert hashlib.sha256(data).hexdigest() == arts[name]["sha256"]
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
    metrics = json.loads((out / "metrics.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4 and model.config.intermediate_size == 129
    assert metrics["model"]["params_after"] < metrics["model"]["params_before"] == 260_032
    assert len(set(metrics["block_sparsity"])) > 1  # OWL: not uniform
    assert abs(metrics["achieved_sparsity"] - 0.5) < 0.02
