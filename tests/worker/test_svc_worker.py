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
