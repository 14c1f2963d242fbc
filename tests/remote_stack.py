"""The stack the Python client and the remote CLI are tested against (tests/client, tests/cli): its own Postgres
database, Redis, the API under uvicorn with local artifact storage, a real Celery worker, and a second API
process on the same database whose storage is S3 (moto over HTTP, reached through a FaultProxy that records
what the client sends it). The second API publishes to a queue no worker reads, so a job created through it
stays queued (a job that is never finished by itself, to watch and interrupt).

Session-scoped: the processes start once, in parallel, for both test directories."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, require
from tests.fault_proxy import FaultProxy
from tests.service_fixtures import PG_URL, REDIS_URL, _pg_admin, _with_db, postgres_up, redis_up

__all__ = ["api_proxy", "finished_job", "live_job", "parked_job", "remote_stack"]
SECRET = "client-tests-secret"
BUCKET = "secateurs-client"


@dataclass
class RemoteStack:
    base: str  # the API, local storage (Range downloads)
    s3_base: str  # the second API, S3 storage (307 to presigned URLs)
    key: str
    tenant: str
    env: dict[str, str]  # the processes' environment (SECATEURS_* cleared, then set)
    tmp: Path
    model: Path  # stories260k, under the allowed model root
    cal_file: Path  # a small .txt calibration file
    text: str
    db_url: str
    artifacts_root: Path
    s3_proxy: FaultProxy  # in front of moto: every request the client sends to the presigned URLs
    moto: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def client(self, base: str | None = None, **kw: Any):  # noqa: ANN201
        from client import Client, RetryPolicy

        kw.setdefault("retry", RetryPolicy(max_retries=4, backoff=0.05, max_backoff=0.5))
        return Client(base or self.base, self.key, **kw)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def job_body(self, **overrides: Any) -> dict[str, Any]:
        """A real job that finishes in seconds: Wanda 50 % on stories260k, 4 windows of 32 tokens."""
        body: dict[str, Any] = {
            "model": str(self.model),
            "method": "wanda",
            "sparsity": 0.5,
            "calibration": {"texts": [self.text], "nsamples": 4, "seqlen": 32},
        }
        return {**body, **overrides}

    def s3(self):  # noqa: ANN201
        """The second API's bucket, created again if a test reset the session's shared moto server since."""
        from core.storage.s3 import S3Storage

        s3 = S3Storage(BUCKET, endpoint_url=self.moto, access_key_id="testing", secret_access_key="testing")
        s3.ensure_bucket()
        return s3

    def copy_artifacts_to_s3(self, job_id: str) -> None:
        """A finished job's artifacts, copied into the second API's bucket under the same keys."""
        s3 = self.s3()
        for f in self.artifacts_root.rglob(f"{job_id}/attempt-*/*"):
            s3.client.upload_file(str(f), BUCKET, f.relative_to(self.artifacts_root).as_posix())

    def logs(self) -> str:
        out = []
        for p in sorted(self.tmp.glob("*.log")):
            out.append(f"--- {p.name} ---\n" + p.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def wait_terminal(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        """The job once it is terminal, by plain polling (independent of the client under test)."""
        deadline = time.monotonic() + timeout
        with self.http() as c:
            while time.monotonic() < deadline:
                job = c.get(f"/v1/pruning-jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    return job
                time.sleep(0.2)
        raise AssertionError(f"job {job_id} not terminal after {timeout} s: {job}\n{self.logs()}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(p: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)


def _uvicorn(port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--log-level", "warning"]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


@pytest.fixture(scope="session")
def remote_stack(stories260k: Path, text_dir: Path, moto_server: str, tmp_path_factory) -> Iterator[RemoteStack]:  # noqa: ANN001
    require(postgres_up(), f"Postgres not reachable at {PG_URL}")
    require(redis_up(), f"Redis not reachable at {REDIS_URL}")
    from core.auth import create_key, create_tenant
    from core.db.engine import dispose_all, session_scope
    from core.db.migrate import upgrade
    from core.settings import Settings
    from core.storage.s3 import S3Storage

    tmp = tmp_path_factory.mktemp("remote")
    name = f"secateurs_c_{uuid.uuid4().hex[:10]}"
    with _pg_admin() as c:
        c.execute(f'CREATE DATABASE "{name}"')
    db_url = _with_db(PG_URL, name)
    procs: dict[str, subprocess.Popen] = {}
    queue = f"secateurs-client-{uuid.uuid4().hex[:8]}"
    s3_proxy = FaultProxy(int(moto_server.rsplit(":", 1)[1]))
    try:
        models = tmp / "models"
        models.mkdir()
        model = models / "stories260k"
        shutil.copytree(stories260k, model, copy_function=shutil.copyfile)
        for p in [model, *model.rglob("*")]:  # shared/ may be read-only
            p.chmod(0o755 if p.is_dir() else 0o644)
        text = (text_dir / "tinystories-valid.txt").read_text("utf-8")[:20_000]
        cal_file = tmp / "corpus.txt"
        cal_file.write_text(text, "utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
        env.update(
            SECATEURS_ENV="test",
            SECATEURS_DATA_DIR=str(tmp / "var"),
            SECATEURS_DATABASE_URL=db_url,
            SECATEURS_BROKER_URL=REDIS_URL,
            SECATEURS_QUEUE=queue,
            SECATEURS_SECRET_KEY=SECRET,
            SECATEURS_ALLOWED_MODEL_ROOTS=str(models),
            SECATEURS_PROGRESS_EVENT_INTERVAL_SECONDS="0",  # an event per block: streams worth cutting
            SECATEURS_DEVICE="cpu",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        upgrade(db_url)
        with session_scope(db_url) as s:
            tenant = create_tenant(s, "client-tests").id
            _, key = create_key(s, tenant, Settings(_env_file=None, secret_key=SECRET).pepper)
        dispose_all()
        port, s3_port = _free_port(), _free_port()
        procs["api"] = _uvicorn(port, env, tmp / "api.log")
        s3_env = {
            **env,
            "SECATEURS_DATA_DIR": str(tmp / "var-s3"),
            "SECATEURS_QUEUE": queue + "-parked",  # no worker reads it
            "SECATEURS_STORAGE_BACKEND": "s3",
            "SECATEURS_S3_BUCKET": BUCKET,
            "SECATEURS_S3_ENDPOINT_URL": moto_server,
            "SECATEURS_S3_PUBLIC_ENDPOINT_URL": s3_proxy.url,
            "SECATEURS_S3_ACCESS_KEY_ID": "testing",
            "SECATEURS_S3_SECRET_ACCESS_KEY": "testing",
        }
        S3Storage(
            BUCKET, endpoint_url=moto_server, access_key_id="testing", secret_access_key="testing"
        ).ensure_bucket()
        procs["api-s3"] = _uvicorn(s3_port, s3_env, tmp / "api-s3.log")
        worker_cmd = [sys.executable, "-m", "celery", "-A", "worker.main", "worker", "--loglevel=INFO"]
        worker_cmd += ["--pool=prefork", "--concurrency=1", "-Q", queue, "--without-gossip", "--without-mingle"]
        worker_cmd += ["--without-heartbeat", f"--hostname=client-{uuid.uuid4().hex[:4]}@%h"]
        # parked jobs (published to a queue no worker reads) must stay queued however long the session runs: the
        # worker's sweep would publish them again, to its own queue, once they are redeliver_after_seconds old
        worker_env = {**env, "SECATEURS_REDELIVER_AFTER_SECONDS": "86400"}
        procs["worker"] = subprocess.Popen(
            worker_cmd,
            cwd=ROOT,
            env=worker_env,
            stdout=open(tmp / "worker.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        st = RemoteStack(
            base=f"http://127.0.0.1:{port}",
            s3_base=f"http://127.0.0.1:{s3_port}",
            key=key,
            tenant=tenant,
            env=env,
            tmp=tmp,
            model=model,
            cal_file=cal_file,
            text=text,
            db_url=db_url,
            artifacts_root=tmp / "var" / "artifacts",
            s3_proxy=s3_proxy,
            moto=moto_server,
            procs=procs,
        )
        deadline = time.monotonic() + 120
        for base in (st.base, st.s3_base):
            while True:
                try:
                    if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                dead = [n for n, p in procs.items() if p.poll() is not None]
                assert not dead and time.monotonic() < deadline, f"{dead} exited or not ready\n{st.logs()}"
                time.sleep(0.2)
        yield st
    finally:
        for p in procs.values():
            _kill(p)
        s3_proxy.close()
        import redis

        r = redis.Redis.from_url(REDIS_URL)
        r.delete(queue, queue + "-parked")
        with _pg_admin() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def api_proxy(remote_stack: RemoteStack) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the (local storage) API."""
    p = FaultProxy(remote_stack.port)
    yield p
    p.close()


@pytest.fixture(scope="session")
def live_job(remote_stack: RemoteStack) -> str:
    """A real job, created when first asked for (the client tests follow it while it runs)."""
    with remote_stack.http() as c:
        r = c.post("/v1/pruning-jobs", json=remote_stack.job_body(metadata={"case": "live"}))
        assert r.status_code == 201, r.text
        return r.json()["id"]


@pytest.fixture(scope="session")
def finished_job(remote_stack: RemoteStack, live_job: str) -> dict[str, Any]:
    """The live job once it succeeded."""
    job = remote_stack.wait_terminal(live_job)
    assert job["status"] == "succeeded", f"{job}\n{remote_stack.logs()}"
    return job


@pytest.fixture(scope="session")
def parked_job(remote_stack: RemoteStack) -> str:
    """A job created through the second API, whose queue no worker reads: it stays queued until cancelled."""
    with httpx.Client(base_url=remote_stack.s3_base, headers={"Authorization": f"Bearer {remote_stack.key}"}) as c:
        r = c.post("/v1/pruning-jobs", json=remote_stack.job_body(metadata={"case": "parked"}))
        assert r.status_code == 201, r.text
        return r.json()["id"]
