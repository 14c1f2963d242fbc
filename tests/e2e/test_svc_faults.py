"""Fault injection on the production-shaped stack: the API under uvicorn and real Celery workers on a Postgres
and a Redis that this module starts on ports of its own, so it can break them; artifacts on moto's S3 server.

Scenarios: the worker's process group SIGKILLed at targeted and at random points; Redis restarted empty with
jobs queued; Postgres stopped and started with jobs queued and one running. Each one checks that every job
ends succeeded with one attempt per kill that hit it, exactly one artifact set (the final attempt's, the
names of its manifest), storage holding exactly the recorded artifacts, no scratch directory left, and that
a client polling the API all along never saw a 5xx other than 503 problem+json with Retry-After.

Figures (jobs, lost, seconds from the last fault to all terminal, 5xx/503, attempts) are printed at the end
and written as JSON to $SECATEURS_FAULTS_REPORT when set.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, require
from tests.e2e.stack import PostgresServer, RedisServer, free_port, kill_group, pg_available, slow_model, tail

pytestmark = pytest.mark.slow

BUCKET = "secateurs-faults"
LEASE_S = 3
REDELIVER_S = 3
ENQUEUE_TIMEOUT_S = 1
TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("running", "cancelling")
REPORT: dict[str, dict[str, Any]] = {}


# the stack ----------------------------------------------------------------------------------------------


@dataclass
class Stack:
    tmp: Path
    env: dict[str, str]
    pg: PostgresServer
    redis: RedisServer
    storage: Any
    models: Path
    work_dir: Path
    text: str
    base: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    tenant: str = ""
    api: subprocess.Popen | None = None
    workers: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    _db: Any = None

    # workers: one at a time, so that a kill freezes every job it hit until the next worker's sweep
    def start_worker(self) -> str:
        assert self.live_worker() is None, "one worker at a time"
        n = len(self.workers)
        name = f"w{n}-{uuid.uuid4().hex[:4]}"
        env = {**self.env, "SECATEURS_DATABASE_URL": self.db_url(app=name)}
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
            f"--hostname={name}@%h",
        ]
        log = open(self.tmp / f"worker-{n}.log", "w")
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append((name, p))
        return name

    def live_worker(self) -> str | None:
        if self.workers and self.workers[-1][1].poll() is None:
            return self.workers[-1][0]
        return None

    def ensure_worker(self) -> str:
        return self.live_worker() or self.start_worker()

    def worker_log(self, name: str | None = None) -> str:
        i = [n for n, _ in self.workers].index(name) if name else len(self.workers) - 1
        return (self.tmp / f"worker-{i}.log").read_text(errors="replace")

    def wait_worker_ready(self, name: str, timeout: float = 90) -> None:
        until(lambda: re.search(rf"{name}@\S+ ready\.", self.worker_log(name)), timeout, f"{name} ready", self)

    def kill_worker(self, release: Callable[[], None] | None = None) -> float:
        """SIGKILL the live worker's process group; ``release`` (e.g. a row lock the test holds) runs after the
        kill; then wait until Postgres has dropped the dead worker's sessions, so nothing it sent is still
        landing when the caller reads the jobs' state. Returns the moment of the kill."""
        name = self.live_worker()
        assert name is not None, "no live worker to kill"
        kill_group(self.workers[-1][1], signal.SIGKILL)
        t = time.monotonic()
        if release is not None:
            release()
        until(
            lambda: not self.sql("SELECT 1 FROM pg_stat_activity WHERE application_name = %s", name),
            20,
            f"{name}'s database sessions gone",
            self,
        )
        return t

    # database, as the test sees it (psycopg, autocommit)
    def db_url(self, app: str = "") -> str:
        return self.pg.url("secateurs") + (f"?application_name={app}" if app else "")

    def sql(self, q: str, *args: Any) -> list[dict[str, Any]]:
        import psycopg
        from psycopg.rows import dict_row

        for retry in (True, False):
            try:
                if self._db is None or self._db.closed:
                    self._db = psycopg.connect(self.pg.dsn("secateurs"), autocommit=True, row_factory=dict_row)
                return self._db.execute(q, args).fetchall()
            except psycopg.OperationalError:
                self._db = None
                if not retry:
                    raise
        raise AssertionError("unreachable")

    def job(self, jid: str) -> dict[str, Any]:
        return self.sql("SELECT status, attempt, progress, enqueued_at, worker_id FROM jobs WHERE id = %s", jid)[0]

    def events(self, jid: str) -> list[dict[str, Any]]:
        return self.sql("SELECT seq, type, data FROM job_events WHERE job_id = %s ORDER BY seq", jid)

    def client(self, timeout: float = 15) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers=self.headers, timeout=timeout)

    def jobs_table(self) -> str:
        """Every job's state, first in a failure's message (the logs after it may be cut where it is shown)."""
        try:
            rows = self.sql(
                "SELECT id, status, attempt, progress->>'stage' AS stage, worker_id, lease_expires_at, enqueued_at"
                " FROM jobs ORDER BY created_at"
            )
        except Exception as e:  # noqa: BLE001  (the database may be what is down)
            return f"--- jobs: unreadable ({e.__class__.__name__}) ---\n"
        return "--- jobs ---\n" + "".join(f"{dict(r)}\n" for r in rows)

    def logs(self, n: int = 2500) -> str:
        parts = [tail(self.tmp / f"worker-{i}.log", n) for i in range(max(0, len(self.workers) - 3), len(self.workers))]
        return "\n".join([*parts, tail(self.tmp / "api.log", n)])

    # jobs
    def small(self, method: str = "magnitude", **extra: Any) -> dict[str, Any]:
        return {
            "model": str(self.models / "stories260k"),
            "method": method,
            "sparsity": 0.5,
            "calibration": {"texts": [self.text], "nsamples": 4, "seqlen": 32},
            **extra,
        }

    def slow(self, method: str = "magnitude", nsamples: int = 8, seqlen: int = 64) -> dict[str, Any]:
        """A job on the 24-block model: a few seconds with magnitude, longer with wanda and more samples."""
        return {
            "model": str(self.models / "slow"),
            "method": method,
            "sparsity": 0.5,
            "calibration": {"texts": [self.text], "nsamples": nsamples, "seqlen": seqlen},
        }

    def submit(self, c: httpx.Client, body: dict[str, Any]) -> str:
        r = c.post("/v1/pruning-jobs", json=body)
        assert r.status_code == 201, r.text
        return r.json()["id"]


def until(pred: Callable[[], Any], timeout: float, what: str, st: Stack | None = None, every: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something truthy; fail with the logs' tails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}\n{st.jobs_table() + st.logs() if st else ''}"
            )
        time.sleep(every)


@pytest.fixture(scope="module")
def fstack(moto_server: str, stories260k: Path, text_dir: Path, tmp_path_factory, request) -> Iterator[Stack]:  # noqa: ANN001
    require(pg_available(), "initdb/pg_ctl and a postgres OS user are needed to run a Postgres of our own")
    require(shutil.which("redis-server") is not None, "redis-server not found")
    from core.auth import create_key, create_tenant
    from core.db.engine import get_engine, session_scope
    from core.db.migrate import upgrade
    from core.settings import Settings
    from core.storage.s3 import S3Storage

    tmp = tmp_path_factory.mktemp("faults")
    pg = PostgresServer()
    redis = RedisServer(tmp)
    api = None
    st = None
    try:
        pg.start()
        import psycopg

        with psycopg.connect(pg.dsn(), autocommit=True) as c:
            c.execute("CREATE DATABASE secateurs")
        upgrade(pg.url("secateurs"))
        redis.start()
        models = tmp / "models"
        models.mkdir()
        shutil.copytree(stories260k, models / "stories260k", copy_function=shutil.copyfile)
        for p in [models / "stories260k", *(models / "stories260k").rglob("*")]:  # shared/ may be read-only
            p.chmod(0o755 if p.is_dir() else 0o644)
        slow_model(models / "slow", stories260k)
        work_dir = tmp / "work"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
        env.update(
            {
                "SECATEURS_ENV": "test",
                "SECATEURS_DATA_DIR": str(tmp / "var"),
                "SECATEURS_DATABASE_URL": pg.url("secateurs") + "?application_name=api",
                "SECATEURS_BROKER_URL": redis.url,
                "SECATEURS_QUEUE": f"secateurs-faults-{uuid.uuid4().hex[:8]}",
                "SECATEURS_STORAGE_BACKEND": "s3",
                "SECATEURS_S3_BUCKET": BUCKET,
                "SECATEURS_S3_ENDPOINT_URL": moto_server,
                "SECATEURS_S3_PUBLIC_ENDPOINT_URL": moto_server,
                "SECATEURS_S3_ACCESS_KEY_ID": "testing",
                "SECATEURS_S3_SECRET_ACCESS_KEY": "testing",
                "SECATEURS_SECRET_KEY": "faults-secret",
                "SECATEURS_ALLOWED_MODEL_ROOTS": str(models),
                "SECATEURS_WORK_DIR": str(work_dir),
                "SECATEURS_LEASE_SECONDS": str(LEASE_S),
                "SECATEURS_REAPER_INTERVAL_SECONDS": "1",
                "SECATEURS_MAX_ATTEMPTS": "5",
                "SECATEURS_REDELIVER_AFTER_SECONDS": str(REDELIVER_S),
                "SECATEURS_ENQUEUE_TIMEOUT_SECONDS": str(ENQUEUE_TIMEOUT_S),
                "SECATEURS_DEVICE": "cpu",
                "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            }
        )
        storage = S3Storage(BUCKET, endpoint_url=moto_server, access_key_id="testing", secret_access_key="testing")
        storage.ensure_bucket()
        text = (text_dir / "tinystories-valid.txt").read_text("utf-8")[:20_000]
        st = Stack(tmp, env, pg, redis, storage, models, work_dir, text)
        settings = Settings(_env_file=None, database_url=st.db_url(), secret_key="faults-secret")
        with session_scope(st.db_url()) as s:
            st.tenant = create_tenant(s, "faults").id
            _, key = create_key(s, st.tenant, settings.pepper)
        get_engine(st.db_url()).dispose()  # the test's reads go through Stack.sql (psycopg), which reconnects
        st.headers = {"Authorization": f"Bearer {key}"}
        port = free_port()
        st.base = f"http://127.0.0.1:{port}"
        api = st.api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", "127.0.0.1"]
            + ["--port", str(port), "--log-level", "warning"],
            cwd=ROOT,
            env=env,
            stdout=open(tmp / "api.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def ready() -> bool:
            assert api.poll() is None, tail(tmp / "api.log")
            try:
                return httpx.get(st.base + "/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        until(ready, 60, "the API's /readyz", st, every=0.2)
        yield st
    finally:
        if st is not None:
            for _, w in st.workers:
                kill_group(w, signal.SIGKILL)
        if api is not None:
            kill_group(api, signal.SIGTERM)
        redis.stop()
        pg.destroy()
        if REPORT:
            _print_report(request.config)


def _write_report() -> None:
    path = os.environ.get("SECATEURS_FAULTS_REPORT")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=2, sort_keys=True) + "\n")


def _print_report(config: pytest.Config) -> None:
    lines = ["", "fault injection: jobs, lost, s from last fault to all terminal, 5xx (503), attempts"]
    for name, r in REPORT.items():
        lines.append(
            f"  {name:28s} N={r['jobs']:<2d} lost={r['lost']} t={r['seconds_last_fault_to_all_terminal']}s"
            f" 5xx={r['http_5xx']} (503={r['http_503']}) attempts={sorted(r['attempts'].values())}"
            f" duplicates_left={r['duplicate_messages_left']}"
            + "".join(f" {k}={v}" for k, v in r.get("extra", {}).items())
        )
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print("\n".join(lines), flush=True)
    else:
        print("\n".join(lines))


# the client that polls all along -----------------------------------------------------------------------


class Watcher(threading.Thread):
    """A client polling the API throughout a scenario: each job it tracks and the job list, every 0.4 s. It
    counts status codes; a 5xx other than a 503 problem+json with Retry-After, a 4xx, or no answer within
    the client's timeout is recorded as bad."""

    def __init__(self, st: Stack) -> None:
        super().__init__(name="api-watcher", daemon=True)
        self.st = st
        self.jobs: dict[str, dict[str, Any] | None] = {}
        self.seen: list[tuple[float, int]] = []
        self.bad: list[str] = []
        self.all_terminal_at: float | None = None
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def track(self, jid: str) -> str:
        with self._lock:
            self.jobs[jid] = None
            self.all_terminal_at = None
        return jid

    def run(self) -> None:
        with self.st.client(timeout=10) as c:
            while not self._halt.is_set():
                for jid in list(self.jobs):
                    r = self._get(c, f"/v1/pruning-jobs/{jid}")
                    if r is not None and r.status_code == 200:
                        self.jobs[jid] = r.json()
                self._get(c, "/v1/pruning-jobs", params={"limit": 20})
                with self._lock:
                    done = self.jobs and all(j is not None and j["status"] in TERMINAL for j in self.jobs.values())
                    if done and self.all_terminal_at is None:
                        self.all_terminal_at = time.monotonic()
                self._halt.wait(0.4)

    def _get(self, c: httpx.Client, path: str, **kw: Any) -> httpx.Response | None:
        t = time.monotonic()
        try:
            r = c.get(path, **kw)
        except httpx.HTTPError as e:
            self.bad.append(f"{path}: no answer: {e!r}")
            return None
        self.seen.append((t, r.status_code))
        if r.status_code == 503:
            ok = r.headers.get("retry-after") and r.headers.get("content-type", "").startswith(
                "application/problem+json"
            )
            if not ok:
                self.bad.append(f"{path}: 503 without problem+json and Retry-After: {dict(r.headers)} {r.text[:300]}")
        elif r.status_code != 200:
            self.bad.append(f"{path}: {r.status_code} {r.text[:300]}")
        return r

    def stop(self) -> None:
        self._halt.set()
        self.join(15)

    def count(self, lo: int, hi: int, since: float = 0.0, until_: float = float("inf")) -> int:
        return sum(1 for t, s in self.seen if lo <= s <= hi and since <= t <= until_)


# one scenario: faults, then the checks ------------------------------------------------------------------


class Scenario:
    def __init__(self, st: Stack, name: str) -> None:
        self.st, self.name = st, name
        self.watcher = Watcher(st)
        self.watcher.start()
        self.hits: dict[str, set[int]] = {}  # job -> attempts that a kill found running
        self.last_fault: float | None = None  # the last fault that found a job unfinished
        self.extra: dict[str, Any] = {}
        self.t0 = time.monotonic()

    def submit(self, c: httpx.Client, body: dict[str, Any]) -> str:
        return self.watcher.track(self.st.submit(c, body))

    def kill(self, release: Callable[[], None] | None = None) -> dict[str, dict[str, Any]]:
        """SIGKILL the worker; note which attempts it hit (the jobs it left running). Their state is frozen
        until the next worker starts. Returns the jobs' rows as the kill left them."""
        t = self.st.kill_worker(release)
        rows = {jid: self.st.job(jid) for jid in self.watcher.jobs}
        for jid, row in rows.items():
            if row["status"] in ACTIVE:
                self.hits.setdefault(jid, set()).add(row["attempt"])
        if any(r["status"] not in TERMINAL for r in rows.values()):  # a kill after the last job ended is no fault
            self.last_fault = t
        return rows

    def fault(self) -> None:
        self.last_fault = time.monotonic()

    def finish(self, timeout: float) -> None:
        """Wait for every job to be terminal, record the figures, then check everything."""
        st, w = self.st, self.watcher
        deadline = time.monotonic() + timeout
        while w.all_terminal_at is None and time.monotonic() < deadline and not w.bad:
            time.sleep(0.1)
        w.stop()
        final = {jid: st.job(jid) for jid in w.jobs}
        lost = [jid for jid, j in final.items() if j["status"] not in TERMINAL]
        t_done = w.all_terminal_at
        # messages still waiting once every job ended are duplicates (the sweep's republications): count them,
        # then drop them so the next scenario starts from an empty queue rather than behind them
        queue = st.env["SECATEURS_QUEUE"]
        leftover = st.redis.client().llen(queue) if not lost else None
        if not lost:
            st.redis.client().delete(queue)
        REPORT[self.name] = {
            "jobs": len(final),
            "lost": len(lost),
            "seconds_last_fault_to_all_terminal": round(t_done - self.last_fault, 1)
            if t_done and self.last_fault
            else None,
            "http_5xx": w.count(500, 599),
            "http_503": w.count(503, 503),
            "http_requests": len(w.seen),
            "attempts": {jid: j["attempt"] for jid, j in final.items()},
            "kills_that_hit": {jid: sorted(a) for jid, a in self.hits.items()},
            "duplicate_messages_left": leftover,
            "scenario_seconds": round(time.monotonic() - self.t0, 1),
            "extra": self.extra,
        }
        _write_report()
        assert not w.bad, f"the polling client saw bad answers: {w.bad[:10]}\n{st.logs()}"
        assert not lost, f"jobs not terminal after {timeout}s: { {j: final[j] for j in lost} }\n{st.logs()}"
        for jid, job in final.items():
            self.check_job(jid, job)

    def check_job(self, jid: str, job: dict[str, Any]) -> None:
        st = self.st
        assert job["status"] == "succeeded", f"{jid}: {job}\n{st.logs()}"
        hits = sorted(self.hits.get(jid, ()))
        assert job["attempt"] == len(hits) + 1, (
            f"{jid}: attempt {job['attempt']}, but kills hit attempts {hits}\n{st.logs()}"
        )
        lost_events = [
            e for e in st.events(jid) if e["type"] == "status" and "worker lost" in (e["data"].get("reason") or "")
        ]
        assert len(lost_events) == job["attempt"] - 1, f"{jid}: attempt {job['attempt']} after {lost_events}"
        # exactly one artifact set: the final attempt's, the files its manifest names
        rows = st.sql("SELECT attempt, name, size, sha256, storage_key FROM artifacts WHERE job_id = %s", jid)
        assert rows and {r["attempt"] for r in rows} == {job["attempt"]}, rows
        by_name = {r["name"]: r for r in rows}
        mkey = by_name["manifest.json"]["storage_key"]
        dest = st.tmp / "manifests" / jid / "manifest.json"
        manifest = json.loads(st.storage.get_file(mkey, dest).read_text())
        files = {f["name"]: f for f in manifest["files"]}
        assert set(by_name) == {*files, "manifest.json"}, (sorted(by_name), sorted(files))
        assert {"config.json", "model.safetensors", "masks.safetensors", "metrics.json"} <= set(by_name)
        for name, f in files.items():
            assert (by_name[name]["sha256"], by_name[name]["size"]) == (f["sha256"], f["size"]), name
        prefix = f"tenants/{st.tenant}/jobs/{jid}/"
        assert all(r["storage_key"].startswith(f"{prefix}attempt-{job['attempt']}/") for r in rows)
        # storage holds exactly what the database records (a dead attempt's uploads were removed)
        keys = sorted(r["storage_key"] for r in rows)
        until(lambda: st.storage.list(prefix) == keys, 10, f"storage under {prefix} == the artifact rows", st)
        # no scratch left: the attempt removes its own, the sweeper those of dead attempts (and the job's dir)
        until(lambda: not (st.work_dir / jid).exists(), 10, f"no scratch left under {st.work_dir / jid}", st)


# 1. SIGKILL of the worker's process group ---------------------------------------------------------------


def test_sigkill_between_receive_and_claim_during_prune_and_during_upload(fstack: Stack):
    """The worker's process group SIGKILLed at three points made deterministic: (a) its message received and
    the claim not committed (the message stays in Redis' `unacked`: the sweep must publish the job again);
    (b) pruning; (c) every artifact uploaded, none recorded (the sweep must remove the dead attempt's objects).
    Attempts at the end: 1, 2 and 2."""
    st = fstack
    import psycopg

    sc = Scenario(st, "kill-targeted")
    with st.client() as c:
        # (a) received, not claimed: hold the row so the claim blocks; the message dies with the worker
        if st.live_worker():
            sc.kill()
        ja = sc.submit(c, st.small())
        lock = psycopg.connect(st.pg.dsn("secateurs"))
        lock.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (ja,))
        name = st.start_worker()
        until(
            lambda: re.search(r"Task secateurs\.prune\[[^]]+\] received", st.worker_log(name)), 90, "task received", st
        )
        until(
            lambda: st.sql(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'", name
            ),
            30,
            "the claim blocked on the row lock",
            st,
        )
        rows = sc.kill(release=lock.rollback)
        lock.close()
        assert rows[ja]["status"] == "queued" and rows[ja]["attempt"] == 0, rows[ja]
        # its message is held in Redis' `unacked` by the dead worker (until the visibility timeout, hours)
        assert any(ja.encode() in m for m in st.redis.client().hvals("unacked")), "message not held in unacked"
        st.start_worker()

        # (b) during pruning
        jb = sc.submit(c, st.slow("wanda"))
        until(lambda: _in_prune(st.job(jb)), 120, f"{jb} pruning", st)
        rows = sc.kill()
        assert rows[jb]["status"] == "running" and rows[jb]["progress"]["stage"] == "prune", rows[jb]
        st.start_worker()

        # (c) after its upload, before the artifacts are recorded: while the job prunes (it is the only one
        # running), block inserts into `artifacts`; the worker says "uploading N artifacts", puts all N in
        # storage, then its finish blocks. Kill it there: the objects of the dead attempt must be removed.
        jc = sc.submit(c, st.slow("wanda"))
        name = until(lambda: _in_prune(st.job(jc)) and st.live_worker(), 180, f"{jc} pruning", st)
        hold = psycopg.connect(st.pg.dsn("secateurs"))
        hold.execute("LOCK TABLE artifacts IN EXCLUSIVE MODE")  # reads go on; inserts wait
        n = until(lambda: _uploading(st, jc), 60, f"{jc} uploading", st)
        row = st.job(jc)
        assert row["status"] == "running", f"{jc} ended before the test held it: {row}"
        prefix = f"tenants/{st.tenant}/jobs/{jc}/attempt-{row['attempt']}/"
        until(lambda: len(st.storage.list(prefix)) == n, 60, f"{n} objects under {prefix}", st)
        until(
            lambda: st.sql(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'"
                " AND query ILIKE 'INSERT INTO artifacts%%'",
                name,
            ),
            30,
            "the finish blocked on recording the artifacts",
            st,
        )
        rows = sc.kill(release=hold.rollback)
        hold.close()
        assert rows[jc]["status"] == "running", rows[jc]
        sc.extra["uploaded_by_dead_attempt"] = n
        st.start_worker()
    sc.finish(timeout=120)
    assert REPORT[sc.name]["attempts"] == {ja: 1, jb: 2, jc: 2}


def _in_prune(job: dict[str, Any]) -> bool:
    """Running, pruning. (Progress reports are throttled, but the first of each stage is written at once.)"""
    p = job.get("progress") or {}
    return job["status"] == "running" and p.get("stage") == "prune"


def _uploading(st: Stack, jid: str) -> int:
    for e in st.sql("SELECT data FROM job_events WHERE job_id = %s AND type = 'log'", jid):
        m = re.match(r"uploading (\d+) artifacts", e["data"].get("message", ""))
        if m:
            return int(m.group(1))
    return 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_random_points(fstack: Stack, seed: int):
    """Three jobs (two small, one on the slow model, in a random order) submitted to a ready worker, which is
    killed after a random delay; then the next worker, once ready, is killed after another random delay.
    Wherever the kills fall (message received and not claimed, any stage, after the finish, the recovery
    itself), every job ends succeeded, one attempt per kill that found it running."""
    st = fstack
    rng = random.Random(seed)
    sc = Scenario(st, f"kill-random-seed{seed}")
    points = []
    with st.client() as c:
        st.wait_worker_ready(st.ensure_worker())
        bodies = [st.small("magnitude"), st.small("wanda"), st.slow(rng.choice(["magnitude", "wanda"]))]
        rng.shuffle(bodies)
        jobs = [sc.submit(c, b) for b in bodies]
        for limit in (8.0, 6.0):
            delay = rng.uniform(0, limit)
            time.sleep(delay)  # the fault's random point, not a wait for a condition
            rows = sc.kill()
            points.append(
                {
                    "delay_s": round(delay, 2),
                    "left": [[r["status"], r["attempt"], (r["progress"] or {}).get("stage")] for r in rows.values()],
                }
            )
            st.wait_worker_ready(st.start_worker())
    sc.extra["kills"] = points
    sc.finish(timeout=120)
    assert len(jobs) == 3


# 2. Redis restarted empty ------------------------------------------------------------------------------


def test_redis_restarted_empty_with_jobs_queued(fstack: Stack):
    """One job running, four queued behind it in Redis; Redis is shut down without saving (every message
    lost, the running job's unacked one too); a job is created meanwhile (stored, publication deferred); Redis
    comes back empty. The sweep must publish all of them again."""
    st = fstack
    sc = Scenario(st, "redis-restart-empty")
    queue = st.env["SECATEURS_QUEUE"]
    with st.client() as c:
        name = st.ensure_worker()
        st.wait_worker_ready(name)
        blocker = sc.submit(c, st.slow("wanda", nsamples=32, seqlen=128))
        until(lambda: _in_prune(st.job(blocker)), 120, f"{blocker} pruning", st)
        queued = [sc.submit(c, st.small(m)) for m in ("magnitude", "wanda", "magnitude", "wanda")]
        r = st.redis.client()

        def all_waiting() -> bool:  # (the list may also hold duplicates the sweep published)
            msgs = r.lrange(queue, 0, -1)
            return all(any(jid.encode() in m for m in msgs) for jid in queued)

        until(all_waiting, 10, "the 4 jobs' messages waiting in Redis", st)
        assert st.job(blocker)["status"] == "running", "the worker's job ended before the broker went down"
        try:
            st.redis.shutdown_nosave()
            sc.fault()
            until(lambda: "Connection to broker lost" in st.worker_log(name), 30, "the worker noticing", st)
            t = time.monotonic()
            resp = c.post("/v1/pruning-jobs", json=st.small())
            post_s = time.monotonic() - t
        finally:
            st.redis.start()
            sc.fault()
        assert r.llen(queue) == 0 and r.hlen("unacked") == 0  # restarted empty
        sc.extra["post_during_outage_s"] = round(post_s, 2)
        assert resp.status_code == 201, resp.text
        assert resp.headers.get("secateurs-enqueue") == "deferred", dict(resp.headers)
        assert post_s <= ENQUEUE_TIMEOUT_S + 1, f"POST took {post_s:.1f}s with the broker down"
        deferred = sc.watcher.track(resp.json()["id"])
    sc.finish(timeout=120)
    assert st.job(deferred)["status"] == "succeeded" and len(queued) == 4


def test_post_with_a_frozen_broker_answers_within_the_enqueue_timeout(fstack: Stack):
    """Redis frozen (SIGSTOP: connections are accepted by the kernel, nothing ever answers): a job creation
    still answers 201 `deferred` within the enqueue timeout (+1 s), and the job succeeds once Redis thaws."""
    st = fstack
    sc = Scenario(st, "redis-frozen")
    assert st.redis.proc is not None
    with st.client(timeout=ENQUEUE_TIMEOUT_S + 5) as c:
        name = st.ensure_worker()
        st.wait_worker_ready(name)
        first = sc.submit(c, st.small())  # the API now holds a connection to the broker
        os.kill(st.redis.proc.pid, signal.SIGSTOP)
        sc.fault()
        try:
            t = time.monotonic()
            try:
                resp: httpx.Response | None = c.post("/v1/pruning-jobs", json=st.small())
            except httpx.TimeoutException:
                resp = None
            post_s = time.monotonic() - t
        finally:
            os.kill(st.redis.proc.pid, signal.SIGCONT)
            sc.fault()
    sc.extra["post_during_freeze_s"] = round(post_s, 2)
    sc.extra["post_answer"] = [resp.status_code, resp.headers.get("secateurs-enqueue")] if resp else "none"
    # the job the POST created (committed before the publication), whether or not the client got the answer
    created = [r["id"] for r in st.sql("SELECT id FROM jobs WHERE id > %s ORDER BY id", first)]
    assert len(created) == 1, created
    sc.watcher.track(created[0])
    sc.finish(timeout=90)
    assert resp is not None, f"POST gave no answer in {post_s:.1f}s with the broker frozen\n{st.logs()}"
    assert resp.status_code == 201, resp.text
    assert resp.headers.get("secateurs-enqueue") == "deferred", dict(resp.headers)
    assert post_s <= ENQUEUE_TIMEOUT_S + 1, f"POST took {post_s:.1f}s with the broker frozen"


# 3. Postgres stopped and started -------------------------------------------------------------------------


def test_postgres_stopped_and_started_with_jobs_queued_and_running(fstack: Stack):
    """One job running, three queued; Postgres is stopped (fast shutdown: every session cut) for 5 s while a
    client keeps polling and creating jobs, then started. The API answers 503 problem+json with Retry-After
    meanwhile, never another 5xx; the running job rides the outage out (its lease ran out, but no worker could
    renew one, so it is not handed on: attempt 1) and every job succeeds."""
    st = fstack
    sc = Scenario(st, "postgres-stop-start")
    posts: Counter[int] = Counter()
    with st.client() as c:
        name = st.ensure_worker()
        st.wait_worker_ready(name)
        running = sc.submit(c, st.slow("wanda", nsamples=32, seqlen=128))
        until(lambda: _in_prune(st.job(running)), 120, f"{running} pruning", st)
        queued = [sc.submit(c, st.small(m)) for m in ("magnitude", "wanda", "magnitude")]
        assert st.job(running)["status"] == "running", "the worker's job ended before the database went down"
        try:
            st.pg.stop("fast")
            t_stop = time.monotonic()
            sc.fault()
            while time.monotonic() - t_stop < 5:  # the outage lasts 5 s; the client keeps creating jobs meanwhile
                r = c.post("/v1/pruning-jobs", json=st.small())
                posts[r.status_code] += 1
                if r.status_code == 503:
                    assert r.headers.get("retry-after"), dict(r.headers)
                    assert r.headers["content-type"].startswith("application/problem+json"), r.text
                time.sleep(0.5)
        finally:
            st.pg.start()
            sc.fault()
            t_start = time.monotonic()
    w = sc.watcher
    sc.extra.update(
        outage_s=round(t_start - t_stop, 1),
        outage_get_503=w.count(503, 503, t_stop, t_start),
        outage_get_5xx_not_503=w.count(500, 502, t_stop, t_start) + w.count(504, 599, t_stop, t_start),
        outage_post_503=posts[503],
        outage_post_other=sum(n for code, n in posts.items() if code != 503),
    )
    sc.finish(timeout=120)
    assert set(posts) == {503}, f"POST during the outage: {dict(posts)}"
    assert sc.extra["outage_get_503"] > 0, "the polling client never saw the outage"
    assert len(queued) == 3
