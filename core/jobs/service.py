"""API-facing job logic: submit (validated into a PruneConfig, idempotent by key, published after commit),
get, list, cancel, events, artifacts.

Services never commit: the caller (request or task) owns the transaction boundary.
"""

from __future__ import annotations

import builtins
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db.ids import new_id
from core.db.models import Artifact, IdempotencyRecord, Job, JobEvent, utcnow
from core.db.repositories import CalibrationSetRepository, IdempotencyRepository, JobRepository
from core.errors import Conflict, InvalidInput, NotFound
from core.jobs.model_ref import check_task_path, classify_model
from core.jobs.queue import JobQueue, Publication, enqueue_after_commit
from core.jobs.schemas import JobCreate
from core.jobs.state import INITIAL, TERMINAL, JobStatus, transition
from core.pruning import preflight
from core.pruning.config import PruneConfig
from core.settings import Settings


def request_hash(body: JobCreate) -> str:
    canon = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _pydantic_to_invalid(e: ValidationError, prefix: list[str | int]) -> InvalidInput:
    errors = []
    for err in e.errors(include_url=False):
        loc = [*prefix, *err["loc"]]
        msg = str(err["msg"]).removeprefix("Value error, ")
        errors.append({"loc": ["body", *loc], "msg": msg, "type": err["type"]})
    first = errors[0]
    where = ".".join(str(x) for x in first["loc"][1:]) or "body"
    return InvalidInput(f"{where}: {first['msg']}", errors=errors)


@dataclass
class StoredResponse:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class Submitted:
    response: StoredResponse
    replayed: bool  # the stored response of an earlier request with the same Idempotency-Key
    publication: Publication | None = None  # a new job's publication, filled in when the caller commits


class JobService:
    def __init__(self, session: Session, tenant_id: str, settings: Settings, queue: JobQueue | None = None) -> None:
        """``queue``: where submitted jobs are published after commit (without one, the worker's sweep does it)."""
        self.session = session
        self.tenant_id = tenant_id
        self.settings = settings
        self.queue = queue
        self.jobs = JobRepository(session, tenant_id)
        self.cals = CalibrationSetRepository(session, tenant_id)
        self.idem = IdempotencyRepository(session, tenant_id)

    # create ----------------------------------------------------------------------------------
    def build_config(self, body: JobCreate) -> PruneConfig:
        """Map the API body onto PruneConfig; every rejection names the field."""
        classify_model(body.model, self.settings.model_roots)
        data = body.model_dump(exclude={"metadata", "calibration", "evaluation", "recovery"})
        cal = body.calibration
        data["calibration"] = {
            "source": self._text_source(cal, "calibration", default="c4"),
            "texts": cal.texts,
            "nsamples": cal.nsamples,
            "seqlen": cal.seqlen,
            "seed": cal.seed,
        }
        ev = body.evaluation
        if ev is not None:
            tasks_only = bool(ev.tasks) and ev.source is None and ev.calibration_set_id is None
            data["evaluation"] = {
                "source": None if tasks_only else self._text_source(ev, "evaluation", default="wikitext2"),
                "seqlen": ev.seqlen,
                "max_windows": ev.max_windows,
                "batch_size": ev.batch_size,
                "tasks": ev.tasks,
                "task_paths": [check_task_path(p, self.settings.task_roots, i) for i, p in enumerate(ev.task_paths)],
                "num_fewshot": ev.num_fewshot,
                "limit": ev.limit,
            }
        rc = body.recovery
        if rc is not None:
            data["recovery"] = {
                **rc.model_dump(exclude={"source", "calibration_set_id", "texts"}),
                "texts": rc.texts,
                # none given: the calibration's text (the engine's default)
                "source": None
                if rc.source is None and rc.calibration_set_id is None
                else self._text_source(rc, "recovery", default="c4"),
            }
        data["device"] = self.settings.device
        try:
            config = PruneConfig.model_validate(data)
        except ValidationError as e:
            raise _pydantic_to_invalid(e, []) from None
        # what can be checked before a worker loads the model (the worker machine's device and packages it checks
        # itself; uploaded sets were parsed when they were uploaded)
        problems = preflight.check(config, on_this_machine=False)
        if problems:
            first = problems[0]
            raise InvalidInput(
                f"{first.field}: {first.message}",
                errors=[{"loc": ["body", *p.field.split(".")], "msg": p.message, "type": p.code} for p in problems],
            )
        return config

    def _text_source(self, block: Any, where: str, default: str) -> str:
        """A named set, or `uploaded:<id>` of one of this tenant's calibration sets (resolved by the worker)."""
        if block.calibration_set_id is None:
            return block.source or default
        if self.cals.get(block.calibration_set_id) is None:
            raise InvalidInput.field([where, "calibration_set_id"], "no such calibration set")
        return f"uploaded:{block.calibration_set_id}"

    def submit(
        self, body: JobCreate, idempotency_key: str | None, render: Callable[[Job], StoredResponse]
    ) -> Submitted:
        """Create a job and publish it once the caller commits. ``render`` gives the response to a creation,
        which an Idempotency-Key stores: a repeat with the same key and body gets it back (replayed)."""
        config = self.build_config(body)  # reject bad input before reserving the key
        if idempotency_key is not None:
            stored = self.idempotency_begin(idempotency_key, request_hash(body))
            if stored is not None:
                return Submitted(stored, replayed=True)
        job = self.create(body, config)
        response = render(job)
        if idempotency_key is not None:
            self.idempotency_complete(idempotency_key, response.status, response.body, response.headers)
        publication = None
        if self.queue is not None:
            publication = enqueue_after_commit(self.session, self.queue, self.tenant_id, job.id)
        return Submitted(response, replayed=False, publication=publication)

    def create(self, body: JobCreate, config: PruneConfig | None = None) -> Job:
        """Insert a queued job (``config``: ``build_config(body)`` when already built). Not published."""
        config = config or self.build_config(body)
        now = utcnow()
        job = Job(
            id=new_id("job"),
            tenant_id=self.tenant_id,
            request=body.model_dump(mode="json", exclude={"metadata"}),
            config=config.model_dump(mode="json"),
            job_metadata=dict(body.metadata),
            calibration_set_id=body.calibration.calibration_set_id,
            evaluation_set_id=body.evaluation.calibration_set_id if body.evaluation else None,
            attempt=0,
            max_attempts=self.settings.max_attempts,
            cancel_requested=False,
            event_seq=0,
            version=0,
            created_at=now,
        )
        transition(self.session, job, INITIAL, now=now)
        self.jobs.add(job)
        return job

    # idempotency -----------------------------------------------------------------------------
    def idempotency_begin(self, key: str, req_hash: str) -> StoredResponse | None:
        """Reserve ``key`` or return the stored response of an earlier request.

        The reservation is part of the caller's transaction: it commits with the job it creates, and a
        failure rolls both back, leaving the key free. A concurrent request with the same key waits for that
        commit and then replays. Same key + different body -> 422; a reservation left unfinished (not
        completed, younger than ``idempotency_lock_seconds``) -> 409.
        """
        if not 1 <= len(key) <= 255:
            raise InvalidInput(
                "Idempotency-Key must be 1-255 characters",
                errors=[
                    {"loc": ["header", "Idempotency-Key"], "msg": "must be 1-255 characters", "type": "value_error"}
                ],
            )
        now = utcnow()
        rec = self.idem.get(key, lock=True)
        if rec is None:
            try:
                with self.session.begin_nested():
                    self.idem.add(
                        IdempotencyRecord(tenant_id=self.tenant_id, key=key, request_hash=req_hash, locked_at=now)
                    )
                return None
            except IntegrityError:
                rec = self.idem.get(key, lock=True)
                if rec is None:  # pragma: no cover - deleted in between
                    raise Conflict("Idempotency-Key is being used by a concurrent request") from None
        if rec.request_hash != req_hash:
            raise InvalidInput(
                "Idempotency-Key was already used with a different request body",
                errors=[
                    {
                        "loc": ["header", "Idempotency-Key"],
                        "msg": "reused with a different body",
                        "type": "idempotency_mismatch",
                    }
                ],
                code="idempotency_key_reused",
            )
        if rec.response_status is None:
            stale = rec.locked_at is None or rec.locked_at < now - timedelta(
                seconds=self.settings.idempotency_lock_seconds
            )
            if not stale:
                raise Conflict(
                    "a request with this Idempotency-Key is still being processed", code="idempotency_in_progress"
                )
            rec.locked_at = now
            return None
        return StoredResponse(rec.response_status, rec.response_body or {}, dict(rec.response_headers or {}))

    def idempotency_complete(self, key: str, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        rec = self.idem.get(key, lock=True)
        if rec is not None:
            rec.response_status, rec.response_body, rec.response_headers = status, body, headers
            rec.locked_at = None

    # read ------------------------------------------------------------------------------------
    def get(self, job_id: str, *, lock: bool = False) -> Job:
        job = self.jobs.get(job_id, lock=lock)
        if job is None:
            raise NotFound(f"no pruning job {job_id!r}")
        return job

    def list(self, *, statuses: list[str] | None, after: str | None, limit: int) -> tuple[builtins.list[Job], bool]:
        if statuses:
            bad = [s for s in statuses if s not in JobStatus.__members__]
            if bad:
                msg = f"unknown status {bad[0]!r}; one of {', '.join(JobStatus)}"
                raise InvalidInput(f"status: {msg}", errors=[{"loc": ["query", "status"], "msg": msg, "type": "enum"}])
        return self.jobs.list(statuses=statuses, after=after, limit=limit)

    def events(self, job_id: str, *, after: int, limit: int) -> tuple[builtins.list[JobEvent], bool]:
        self.get(job_id)
        return self.jobs.events(job_id, after=after, limit=limit)

    def artifacts(self, job_id: str) -> builtins.list[Artifact]:
        self.get(job_id)
        return self.jobs.artifacts(job_id)

    def artifact(self, job_id: str, name: str) -> Artifact:
        self.get(job_id)
        art = self.jobs.artifact(job_id, name)
        if art is None:
            raise NotFound(f"job {job_id!r} has no artifact {name!r}")
        return art

    # cancel ----------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> Job:
        """queued -> cancelled at once; running -> cancelling (the worker stops between blocks).

        Idempotent for cancelling/cancelled; 409 for a job that already succeeded or failed.
        """
        job = self.get(job_id, lock=True)
        status = JobStatus(job.status)
        if status in (JobStatus.cancelling, JobStatus.cancelled):
            return job
        if status in TERMINAL:
            raise Conflict(f"job {job_id!r} already {status.value}", code="job_finished")
        job.cancel_requested = True
        new = JobStatus.cancelled if status is JobStatus.queued else JobStatus.cancelling
        transition(self.session, job, new, reason="cancel requested")
        return job
