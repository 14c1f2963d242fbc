"""The API's response bodies as Pydantic models (mirroring ``api/schemas.py``; ``tests/client/test_models.py``
holds them to the OpenAPI document). Fields a newer server adds are kept (``extra="allow"``), so an older
client keeps working and still shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
STATUSES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Progress(_Model):
    """Where a run is: its stage, the block just finished (0-based) of ``total_blocks``, the whole run's
    ``fraction`` done in [0, 1] and the worker's ETA."""

    stage: str | None = None
    message: str | None = None
    block: int | None = None
    total_blocks: int | None = None
    fraction: float | None = None
    eta_seconds: float | None = None


class JobError(_Model):
    code: str
    message: str


class Timestamps(_Model):
    created_at: datetime
    queued_at: datetime | None = None
    running_at: datetime | None = None
    cancelling_at: datetime | None = None
    succeeded_at: datetime | None = None
    failed_at: datetime | None = None
    cancelled_at: datetime | None = None
    finished_at: datetime | None = None


class Job(_Model):
    id: str
    object: str = "pruning_job"
    status: str
    model: str
    method: str
    sparsity: float | None = None
    pattern: str | None = None
    attempt: int
    max_attempts: int
    cancel_requested: bool
    timestamps: Timestamps
    progress: Progress | None = None
    error: JobError | None = None
    metrics: dict[str, Any] | None = None
    metadata: dict[str, str]
    request: dict[str, Any]
    urls: dict[str, str]

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class CreatedJob(Job):
    """What :meth:`Client.create_job` returns: the job, and what its ``POST`` answer said beside it.

    ``enqueue`` is the answer's ``Secateurs-Enqueue`` header: ``published`` when the job reached the queue,
    ``deferred`` when the broker could not take it within the server's enqueue timeout (the job is stored and
    queued all the same; the workers' sweep publishes it once the broker is back). None on a replay
    (``replayed``: the same ``Idempotency-Key`` and body were sent before, and the stored answer came back), and
    from servers that do not send the header."""

    enqueue: Literal["published", "deferred"] | None = None
    replayed: bool = False


class JobList(_Model):
    object: str = "list"
    data: list[Job]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class Event(_Model):
    id: int
    type: str
    created_at: datetime
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        """The job's terminal status event: nothing follows it."""
        return self.type == "status" and self.data.get("status") in TERMINAL

    @property
    def progress(self) -> Progress | None:
        return Progress.model_validate(self.data) if self.type == "progress" else None


class EventList(_Model):
    object: str = "list"
    data: list[Event]
    has_more: bool
    last_id: int | None = None


class Artifact(_Model):
    name: str
    kind: str
    size: int
    sha256: str
    attempt: int
    url: str


class ArtifactList(_Model):
    object: str = "list"
    data: list[Artifact]


class CalibrationSet(_Model):
    id: str
    object: str = "calibration_set"
    filename: str
    format: str
    size: int
    sha256: str
    records: int
    created_at: datetime


class CalibrationSetList(_Model):
    object: str = "list"
    data: list[CalibrationSet]
    has_more: bool
    last_id: str | None = None


class ProblemError(_Model):
    loc: list[str | int]
    msg: str
    type: str


class Problem(_Model):
    """An RFC 9457 problem document, as every error of the API is."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    code: str | None = None
    errors: list[ProblemError] | None = None


class Health(_Model):
    status: str


class Ready(_Model):
    status: str
    checks: dict[str, str]
