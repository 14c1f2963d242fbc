"""Worker-side job logic against a real database: atomic claim, fencing, lost-job sweep, failure codes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from core.auth import create_tenant
from core.db.engine import session_scope
from core.db.models import utcnow
from core.db.repositories import JobRepository
from core.jobs import execution
from core.jobs.schemas import JobCreate
from core.jobs.service import JobService
from core.settings import Settings
from tests.conftest import require


@pytest.fixture
def env(db_url: str, tmp_path: Path):  # noqa: ANN201
    (tmp_path / "models" / "empty").mkdir(parents=True)
    s = Settings(
        _env_file=None,
        env="test",
        data_dir=tmp_path / "var",
        database_url=db_url,
        allowed_model_roots=[tmp_path / "models"],
        max_attempts=2,
        lease_seconds=30,
    )
    s.ensure_dirs()
    with session_scope(db_url) as sess:
        tid = create_tenant(sess, "w").id
    return s, tid


def new_job(s: Settings, tid: str, **kw) -> str:  # noqa: ANN003
    b = {"model": "org/tiny", "sparsity": 0.5, "calibration": {"texts": ["a b c"], "nsamples": 2, "seqlen": 8}, **kw}
    with session_scope(s.db_url) as sess:
        return JobService(sess, tid, s).create(JobCreate.model_validate(b)).id


def get(s: Settings, tid: str, jid: str):  # noqa: ANN201
    with session_scope(s.db_url) as sess:
        job = JobRepository(sess, tid).get(jid)
        evs, _ = JobRepository(sess, tid).events(jid, after=0, limit=100)
        return job, [(e.type, e.data) for e in evs]


def expire_lease(s: Settings, tid: str, jid: str) -> None:
    with session_scope(s.db_url) as sess:
        JobRepository(sess, tid).get(jid, lock=True).lease_expires_at = utcnow() - timedelta(seconds=1)


def claim(s: Settings, tid: str, jid: str, worker: str = "w1") -> execution.Claim:
    with session_scope(s.db_url) as sess:
        return execution.claim(sess, tid, jid, worker, s.lease_seconds)


def test_claim_is_atomic_and_duplicates_do_nothing(env):  # noqa: ANN001
    s, tid = env
    jid = new_job(s, tid)
    c1 = claim(s, tid, jid)
    assert (c1.outcome, c1.attempt) == ("claimed", 1)
    c2 = claim(s, tid, jid, "w2")  # duplicate / redelivered message while the job runs
    assert c2.outcome == "skipped"
    job, evs = get(s, tid, jid)
    assert job.status == "running" and job.attempt == 1 and job.worker_id == "w1"
    assert [d["status"] for t, d in evs if t == "status"] == ["queued", "running"]
    assert claim(s, tid, "job_missing").outcome == "skipped"
    with session_scope(s.db_url) as sess:  # another tenant cannot claim it
        other = create_tenant(sess, "other").id
        assert execution.claim(sess, other, jid, "w3", 30).outcome == "skipped"


def test_lost_worker_is_taken_over_then_fails_after_max_attempts(env):  # noqa: ANN001
    s, tid = env
    jid = new_job(s, tid)
    claim(s, tid, jid)
    expire_lease(s, tid, jid)
    c = claim(s, tid, jid, "w2")  # redelivery after the worker died
    assert (c.outcome, c.attempt) == ("claimed", 2)
    with session_scope(s.db_url) as sess:  # attempt 1 is fenced off
        assert execution.report(sess, tid, jid, 1, 30, progress={"stage": "prune"}) == "lost"
        assert execution.finish(sess, tid, jid, 1, outcome="succeeded", artifacts=[]) is None
    expire_lease(s, tid, jid)
    c = claim(s, tid, jid, "w3")
    assert c.outcome == "exhausted"
    job, evs = get(s, tid, jid)
    assert job.status == "failed" and job.error_code == "worker_lost" and job.attempt == 2
    assert job.failed_at is not None and job.finished_at is not None
    assert [d["status"] for t, d in evs if t == "status"] == ["queued", "running", "queued", "running", "failed"]


def test_sweep_requeues_lost_jobs_and_enqueues_them(env):  # noqa: ANN001
    from worker.celery_app import make_celery
    from worker.sweep import sweep

    s, tid = env
    lost, cancelling, healthy = new_job(s, tid), new_job(s, tid), new_job(s, tid)
    for j in (lost, cancelling, healthy):
        claim(s, tid, j)
    with session_scope(s.db_url) as sess:
        JobService(sess, tid, s).cancel(cancelling)
    expire_lease(s, tid, lost)
    expire_lease(s, tid, cancelling)
    app = make_celery(s)
    counts = sweep(s, app)
    assert counts["requeued"] == 1 and counts["cancelled"] == 1
    job, _ = get(s, tid, lost)
    assert job.status == "queued" and job.enqueued_at is not None and job.attempt == 1
    assert get(s, tid, cancelling)[0].status == "cancelled"
    assert get(s, tid, healthy)[0].status == "running"
    assert claim(s, tid, lost).attempt == 2
    with app.connection_for_write() as conn:  # exactly one message was published for the lost job
        with conn.SimpleQueue(s.queue) as q:
            msg = q.get(timeout=5)
            assert msg.payload is not None
            msg.ack()
            assert q.qsize() == 0


def test_worker_does_nothing_for_finished_or_cancelled_jobs(env):  # noqa: ANN001
    from worker.runner import run_job

    s, tid = env
    jid = new_job(s, tid)
    with session_scope(s.db_url) as sess:
        JobService(sess, tid, s).cancel(jid)
    assert run_job(s, tid, jid, "w1") == "skipped"
    job, evs = get(s, tid, jid)
    assert job.status == "cancelled" and job.attempt == 0


@pytest.mark.parametrize(
    ("model", "code"),
    [
        ("nonexistent-org/nonexistent-model-xyz", "model_not_found"),
        ("EMPTY_DIR", ("model_not_found", "invalid_model")),
    ],
)
def test_failures_end_failed_with_a_code(env, monkeypatch, model, code):  # noqa: ANN001
    import huggingface_hub.constants

    from worker.runner import run_job

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    s, tid = env
    if model == "EMPTY_DIR":
        model = str(s.model_roots[0] / "empty")
    jid = new_job(s, tid, model=model)
    assert run_job(s, tid, jid, "w1") == "failed"
    job, evs = get(s, tid, jid)
    assert job.status == "failed" and job.error_code in ((code,) if isinstance(code, str) else code), job.error_message
    assert job.error_message and job.lease_expires_at is None
    with session_scope(s.db_url) as sess:
        assert JobRepository(sess, tid).artifacts(jid) == []


def test_sweep_publishes_jobs_whose_enqueue_never_happened(env):  # noqa: ANN001
    from worker.celery_app import make_celery
    from worker.sweep import sweep

    s, tid = env
    fresh, old = new_job(s, tid), new_job(s, tid)  # committed, but the API died before publishing
    with session_scope(s.db_url) as sess:
        JobRepository(sess, tid).get(old, lock=True).created_at = utcnow() - timedelta(minutes=5)
    app = make_celery(s)
    assert sweep(s, app)["enqueued"] == 1
    assert get(s, tid, old)[0].enqueued_at is not None
    assert get(s, tid, fresh)[0].enqueued_at is None  # within the grace period: the API may still publish it
    assert sweep(s, app)["enqueued"] == 0  # published once, not on every sweep


def test_sweep_removes_what_a_lost_attempt_uploaded(env, tmp_path):  # noqa: ANN001
    from core.storage import make_storage
    from worker.celery_app import make_celery
    from worker.sweep import sweep

    s, tid = env
    jid = new_job(s, tid)
    claim(s, tid, jid)
    storage = make_storage(s)
    (tmp_path / "f").write_bytes(b"partial")
    storage.put_file(f"tenants/{tid}/jobs/{jid}/attempt-1/model.safetensors", tmp_path / "f")
    expire_lease(s, tid, jid)
    assert sweep(s, make_celery(s))["requeued"] == 1
    assert storage.list(f"tenants/{tid}/jobs/{jid}/") == []


def test_concurrent_claims_run_a_job_once(env):  # noqa: ANN001
    from concurrent.futures import ThreadPoolExecutor

    s, tid = env
    jid = new_job(s, tid)
    with ThreadPoolExecutor(8) as ex:
        outcomes = list(ex.map(lambda i: claim(s, tid, jid, f"w{i}").outcome, range(8)))
    assert outcomes.count("claimed") == 1 and outcomes.count("skipped") == 7
    job, _ = get(s, tid, jid)
    assert job.attempt == 1


def test_error_codes_of_exceptions():
    import torch
    from celery.exceptions import SoftTimeLimitExceeded

    from core.pruning.errors import CalibrationError, InvalidModelError
    from core.storage import StorageError
    from worker.runner import _error_of

    assert _error_of(MemoryError()) == ("out_of_memory", "out of host memory")
    assert _error_of(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))[0] == "out_of_memory"
    assert _error_of(CalibrationError("no texts")) == ("calibration_error", "no texts")
    assert _error_of(InvalidModelError("not a causal LM"))[0] == "invalid_model"
    assert _error_of(SoftTimeLimitExceeded())[0] == "timeout"
    assert _error_of(StorageError("bucket gone"))[0] == "storage_error"
    code, msg = _error_of(KeyError("x"))
    assert code == "internal_error" and "KeyError" in msg


def _dead_db_url() -> str:
    import socket

    with socket.socket() as sock:  # a port nobody listens on: connection refused, as when Postgres is down
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/nothing"


@pytest.fixture(params=["embedded", "redis"])
def broker_env(env, request):  # noqa: ANN001, ANN201
    """``env`` with the embedded broker (kombu on SQLite) or Redis (its own queue)."""
    import uuid

    from tests.service_fixtures import REDIS_URL, redis_up

    s, tid = env
    if request.param == "redis":
        require(redis_up(), f"Redis not reachable at {REDIS_URL}")
        s = s.model_copy(update={"broker_url": REDIS_URL, "queue": f"secateurs-test-{uuid.uuid4().hex[:8]}"})
    yield s, tid
    if request.param == "redis":
        import redis

        redis.Redis.from_url(REDIS_URL).delete(s.queue)


def _drain(app, queue: str) -> int:  # noqa: ANN001
    """Take every waiting message and acknowledge it without running it (as a task that failed to claim
    and was acknowledged would); how many there were."""
    n = 0
    with app.connection_for_write() as conn, conn.SimpleQueue(queue) as q:
        while True:
            try:
                q.get(timeout=0.5).ack()
            except q.Empty:
                return n
            n += 1


def test_sweep_publishes_again_a_queued_job_whose_message_vanished(broker_env):  # noqa: ANN001
    import time

    from core.jobs.celery_queue import CeleryQueue
    from core.jobs.queue import enqueue_after_commit
    from worker.celery_app import make_celery
    from worker.sweep import Sweeper

    s, tid = broker_env
    s = s.model_copy(update={"redeliver_after_seconds": 1.5})
    app = make_celery(s)
    queue = CeleryQueue(app)
    waiting, lost = new_job(s, tid), new_job(s, tid)
    for jid in (waiting, lost):
        with session_scope(s.db_url) as sess:
            enqueue_after_commit(sess, queue, tid, jid)
    assert queue.waiting() == {waiting, lost}
    sweeper = Sweeper(s, queue)
    time.sleep(1.6)
    assert sweeper.sweep()["republished"] == 0  # both still in line: nothing to do
    assert _drain(app, s.queue) == 2  # both messages gone (taken and acknowledged, nobody claimed)
    with session_scope(s.db_url) as sess:
        enqueue_after_commit(sess, queue, tid, waiting)  # one of them is published again by someone
    assert sweeper.sweep()["republished"] == 1  # the lost one (overdue); the other waits in the queue
    assert queue.waiting() == {waiting, lost}
    assert _drain(app, s.queue) == 2
    assert sweeper.sweep()["republished"] == 0  # both published < 1.5 s ago: once per period, not every pass
    time.sleep(1.6)
    assert sweeper.sweep()["republished"] == 2
    claim(s, tid, lost)
    assert _drain(app, s.queue) == 2
    time.sleep(1.6)
    assert sweeper.sweep()["republished"] == 1  # only the unclaimed one


def test_a_claim_on_an_unreachable_database_is_rejected_for_redelivery(env):  # noqa: ANN001
    """Not acknowledged and dropped: the task raises Celery's Reject(requeue=True), after retrying."""
    import time

    from celery.exceptions import Reject

    from worker.tasks import prune_job

    s, tid = env
    jid = new_job(s, tid)
    down = s.model_copy(update={"database_url": _dead_db_url(), "database_retry_seconds": 1.0})
    before = getattr(prune_job.app.conf, "secateurs_settings", None)
    prune_job.app.conf.secateurs_settings = down
    try:
        t0 = time.monotonic()
        with pytest.raises(Reject) as e:
            prune_job(tid, jid)
    finally:
        prune_job.app.conf.secateurs_settings = before
    assert e.value.requeue is True
    assert 0.5 < time.monotonic() - t0 < 10  # it retried (for at most database_retry_seconds) first
    assert get(s, tid, jid)[0].status == "queued"


def test_sweep_removes_scratch_of_attempts_that_no_longer_run(env):  # noqa: ANN001
    from worker.celery_app import make_celery
    from worker.sweep import sweep

    s, tid = env
    running, requeued, done = new_job(s, tid), new_job(s, tid), new_job(s, tid)
    for jid in (running, requeued, done):
        claim(s, tid, jid)
    expire_lease(s, tid, requeued)
    with session_scope(s.db_url) as sess:
        execution.finish(sess, tid, done, 1, outcome="failed", error=("x", "y"))
    root = s.work_path
    dirs = {
        "live": root / running / "attempt-1",
        "old attempt of a running job": root / running / "attempt-0",
        "lost attempt": root / requeued / "attempt-1",
        "finished job": root / done / "attempt-1",
        "unknown job": root / "job_gone" / "attempt-3",
    }
    for d in dirs.values():
        (d / "out").mkdir(parents=True)
        (d / "out" / "model.safetensors").write_bytes(b"x" * 1000)
    counts = sweep(s, make_celery(s))
    assert counts["requeued"] == 1 and counts["scratch_removed"] == 4
    assert [k for k, d in dirs.items() if d.exists()] == ["live"]
    assert sorted(p.name for p in root.iterdir()) == [running]


def test_sweep_waits_a_lease_after_a_database_outage_before_judging_leases(env):  # noqa: ANN001
    """While the database was down no worker could renew its lease: a lease that expired meanwhile is not a
    lost worker until the workers have had a lease period to renew it."""
    import time

    from core.jobs.celery_queue import CeleryQueue
    from worker.celery_app import make_celery
    from worker.sweep import Sweeper

    s, tid = env
    s = s.model_copy(update={"lease_seconds": 1.0})
    jid = new_job(s, tid)
    claim(s, tid, jid)
    expire_lease(s, tid, jid)
    sweeper = Sweeper(s.model_copy(update={"database_url": _dead_db_url()}), CeleryQueue(make_celery(s)))
    assert sweeper.tick() == {}  # the outage is noted, nothing happens
    sweeper.s = s  # the database is back
    assert sweeper.tick()["requeued"] == 0
    assert get(s, tid, jid)[0].status == "running"
    time.sleep(1.1)
    assert sweeper.tick()["requeued"] == 1


def test_a_real_run_writes_at_most_one_progress_event_per_interval(env, stories260k):  # noqa: ANN001
    """A real attempt on stories260k, with every report written (interval 0) and with an interval longer than
    the run: then each stage writes its first report and its last one, and the job's progress is the last."""
    from worker.runner import run_job

    s, tid = env
    s = s.model_copy(update={"allowed_model_roots": [stories260k.parent], "device": "cpu"})
    text = "Once upon a time there was a little girl named Lily. She liked to play outside. " * 30
    written: dict[float, list[dict]] = {}
    for interval in (0.0, 3600.0):
        jid = new_job(
            s.model_copy(update={"progress_event_interval_seconds": interval}),
            tid,
            model=str(stories260k),
            calibration={"texts": [text], "nsamples": 4, "seqlen": 64},
        )
        assert (
            run_job(s.model_copy(update={"progress_event_interval_seconds": interval}), tid, jid, "w1") == "succeeded"
        )
        job, evs = get(s, tid, jid)
        written[interval] = [{k: d.get(k) for k in ("stage", "block", "fraction")} for t, d in evs if t == "progress"]
        assert job.progress["stage"] == "export" and job.progress["fraction"] == 1.0
    every, throttled = written[0.0], written[3600.0]
    stages = list(dict.fromkeys(p["stage"] for p in every))
    per_stage = {st: [p for p in throttled if p["stage"] == st] for st in stages}
    assert len(every) > len(throttled)
    for st, reports in per_stage.items():
        firsts_and_lasts = [p for p in every if p["stage"] == st]
        assert reports == (
            firsts_and_lasts[:1] + firsts_and_lasts[-1:] if len(firsts_and_lasts) > 1 else firsts_and_lasts
        )
