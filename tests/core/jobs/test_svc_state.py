"""The job state machine: every legal move is allowed and stamped, every other move is refused."""
from __future__ import annotations

import itertools
from datetime import datetime, timezone

import pytest

from core.db.models import Job
from core.jobs.state import LEGAL, TERMINAL, IllegalTransition, JobStatus, can_transition, transition

ALL = list(JobStatus)
LEGAL_PAIRS = [(a, b) for a in ALL for b in sorted(LEGAL[a])]
ILLEGAL_PAIRS = [(a, b) for a, b in itertools.product(ALL, ALL) if b not in LEGAL[a]]


def _job(status: JobStatus) -> Job:
    return Job(id="job_x", tenant_id="ten_x", status=status.value, version=3, lease_expires_at=datetime.now(timezone.utc))


def test_the_machine_is_the_documented_one():
    assert LEGAL_PAIRS == [
        (JobStatus.queued, JobStatus.cancelled), (JobStatus.queued, JobStatus.failed), (JobStatus.queued, JobStatus.running),
        (JobStatus.running, JobStatus.cancelling), (JobStatus.running, JobStatus.failed), (JobStatus.running, JobStatus.queued),
        (JobStatus.running, JobStatus.succeeded), (JobStatus.cancelling, JobStatus.cancelled), (JobStatus.cancelling, JobStatus.failed),
    ]


@pytest.mark.parametrize(("cur", "new"), LEGAL_PAIRS, ids=[f"{a.value}->{b.value}" for a, b in LEGAL_PAIRS])
def test_legal_transition_stamps_its_timestamp(cur: JobStatus, new: JobStatus):
    job = _job(cur)
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    transition(job, new, now)
    assert job.status == new.value
    assert getattr(job, f"{new.value}_at") == now
    assert job.updated_at == now
    assert job.version == 4
    if new in TERMINAL:
        assert job.finished_at == now and job.lease_expires_at is None
    else:
        assert job.finished_at is None
    assert can_transition(cur, new)


@pytest.mark.parametrize(("cur", "new"), ILLEGAL_PAIRS, ids=[f"{a.value}->{b.value}" for a, b in ILLEGAL_PAIRS])
def test_illegal_transition_is_refused_and_changes_nothing(cur: JobStatus, new: JobStatus):
    job = _job(cur)
    with pytest.raises(IllegalTransition):
        transition(job, new)
    assert job.status == cur.value and job.version == 3
    assert getattr(job, f"{new.value}_at") is None
    assert not can_transition(cur, new)


def test_terminal_states_are_final():
    for t in TERMINAL:
        assert LEGAL[t] == frozenset()


def test_unknown_status_is_rejected():
    with pytest.raises(ValueError):
        transition(_job(JobStatus.queued), "paused")
