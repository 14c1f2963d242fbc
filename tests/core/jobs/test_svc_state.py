"""The job state machine, from what the services do: drive real jobs through every path the API, the worker
and the sweep take, record each transition (with a policy, the way webhooks will), and check that

- the machine allows exactly the moves the services make (no move it refuses, no move nobody makes),
- each move stamps the job and writes one status event in the same transaction,
- every other move, terminal states included, is refused and changes nothing.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from core.auth import create_tenant
from core.db.engine import session_scope
from core.db.models import Job, utcnow
from core.db.repositories import JobRepository
from core.jobs import execution, state
from core.jobs.schemas import JobCreate
from core.jobs.service import JobService
from core.jobs.state import TERMINAL, IllegalTransition, JobStatus, StatusChange, can_transition, transition
from core.settings import Settings

ALL = list(JobStatus)
S = JobStatus


@pytest.fixture
def observed(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> set[tuple[JobStatus | None, JobStatus]]:
    """Run every service path once; returns the (old, new) moves they made."""
    seen: list[StatusChange] = []

    def record(session: Session, change: StatusChange) -> None:
        job = change.job
        assert job.status == change.new.value
        assert getattr(job, f"{change.new.value}_at") == change.at == job.updated_at
        assert (job.finished_at == change.at) if change.new in TERMINAL else job.finished_at is None
        seen.append(change)

    monkeypatch.setattr(state, "AFTER_TRANSITION", [*state.AFTER_TRANSITION, record])
    s = Settings(
        _env_file=None, env="test", data_dir=tmp_path / "var", database_url=db_url, max_attempts=2, lease_seconds=30
    )
    with session_scope(db_url) as sess:
        tid = create_tenant(sess, "state").id

    def new() -> str:
        body = JobCreate.model_validate(
            {"model": "org/tiny", "sparsity": 0.5, "calibration": {"texts": ["a b c"], "nsamples": 2, "seqlen": 8}}
        )
        with session_scope(db_url) as sess:
            return JobService(sess, tid, s).create(body).id

    def claim(jid: str) -> execution.Claim:
        with session_scope(db_url) as sess:
            return execution.claim(sess, tid, jid, "w", s.lease_seconds)

    def finish(jid: str, attempt: int, outcome: str, **kw: object) -> None:
        with session_scope(db_url) as sess:
            assert execution.finish(sess, tid, jid, attempt, outcome=outcome, **kw) is not None  # type: ignore[arg-type]

    def cancel(jid: str) -> None:
        with session_scope(db_url) as sess:
            JobService(sess, tid, s).cancel(jid)

    def lose(jid: str) -> str:
        with session_scope(db_url) as sess:
            JobRepository(sess, tid).get(jid, lock=True).lease_expires_at = utcnow() - timedelta(seconds=1)
        with session_scope(db_url) as sess:
            return execution.requeue_lost(sess, tid, jid)[0]

    def events(jid: str) -> list[str]:
        with session_scope(db_url) as sess:
            evs, _ = JobRepository(sess, tid).events(jid, after=0, limit=100)
            return [e.data["status"] for e in evs if e.type == "status"]

    a = new()  # queued -> cancelled
    cancel(a)
    b = new()  # running -> succeeded
    claim(b)
    finish(b, 1, "succeeded", artifacts=[])
    c = new()  # running -> failed
    claim(c)
    finish(c, 1, "failed", error=("invalid_model", "bad"))
    d = new()  # running -> cancelling -> cancelled (cancel requested, then the worker stops)
    claim(d)
    cancel(d)
    finish(d, 1, "cancelled")
    e = new()  # cancelling -> failed (the job fails while it is being cancelled)
    claim(e)
    cancel(e)
    finish(e, 1, "failed", error=("out_of_memory", "oom"))
    f = new()  # running -> queued (worker lost), then lost again after max_attempts: running -> failed
    claim(f)
    assert lose(f) == "requeued"
    claim(f)
    assert lose(f) == "failed"
    g = new()  # a queued job delivered once it may no longer run: queued -> failed
    claim(g)
    assert lose(g) == "requeued"
    with session_scope(db_url) as sess:
        JobRepository(sess, tid).get(g, lock=True).max_attempts = 1
    assert claim(g).outcome == "exhausted"

    for jid in (a, b, c, d, e, f, g):  # one status event per move, in order
        assert events(jid) == [ch.new.value for ch in seen if ch.job.id == jid], jid
    return {(ch.old, ch.new) for ch in seen}


def test_the_machine_allows_exactly_the_moves_the_services_make(observed):  # noqa: ANN001
    allowed = {(a, b) for a, b in itertools.product([None, *ALL], ALL) if can_transition(a, b)}
    assert observed == allowed
    assert (None, S.queued) in observed  # a new job enters the machine through transition() too
    assert not any(old in TERMINAL for old, _ in observed)


def _job(status: JobStatus) -> Job:
    return Job(id="job_x", tenant_id="ten_x", status=status.value, version=3, lease_expires_at=datetime.now(UTC))


def test_every_other_move_is_refused_and_changes_nothing(observed, db_url):  # noqa: ANN001
    refused = [(a, b) for a, b in itertools.product(ALL, ALL) if (a, b) not in observed]
    assert {(a, b) for a, b in refused if a in TERMINAL} == {(a, b) for a in TERMINAL for b in ALL}
    with session_scope(db_url) as sess:
        for cur, new in refused:
            job = _job(cur)
            with pytest.raises(IllegalTransition):
                transition(sess, job, new)
            assert job.status == cur.value and job.version == 3 and job.event_seq is None
            assert getattr(job, f"{new.value}_at") is None
            assert not can_transition(cur, new)
        for status in S:  # a new job may only enter as queued
            if status is not S.queued:
                with pytest.raises(IllegalTransition):
                    transition(sess, Job(id="job_y", tenant_id="ten_x"), status)
        with pytest.raises(ValueError):
            transition(sess, _job(S.queued), "paused")
