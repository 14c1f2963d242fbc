"""Response bodies (documented in OpenAPI) and the functions that build them from rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from core.db.models import Artifact, CalibrationSet, Job, JobEvent


class Progress(BaseModel):
    stage: str | None = Field(None, examples=["prune"])
    message: str | None = None
    block: int | None = Field(None, examples=[11])
    total_blocks: int | None = Field(None, examples=[32])
    fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        examples=[0.375],
        description="the whole run done so far, stages weighted by their usual share",
    )
    eta_seconds: float | None = Field(None, examples=[412.0])


class JobError(BaseModel):
    code: str = Field(examples=["out_of_memory"])
    message: str


class Timestamps(BaseModel):
    created_at: datetime
    queued_at: datetime | None = None
    running_at: datetime | None = None
    cancelling_at: datetime | None = None
    succeeded_at: datetime | None = None
    failed_at: datetime | None = None
    cancelled_at: datetime | None = None
    finished_at: datetime | None = None


class JobOut(BaseModel):
    id: str = Field(examples=["job_0191c5f0a3b2c1d2e3f4a5b6c7"])
    object: str = "pruning_job"
    status: str = Field(examples=["running"], description="queued, running, cancelling, succeeded, failed, cancelled")
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
    metrics: dict[str, Any] | None = Field(None, description="achieved_sparsity, perplexity {dense, pruned}, timings")
    metadata: dict[str, str]
    request: dict[str, Any]
    urls: dict[str, str]


class JobList(BaseModel):
    object: str = "list"
    data: list[JobOut]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class EventOut(BaseModel):
    id: int = Field(description="sequence number within the job (SSE id)")
    type: str = Field(examples=["progress"], description="status, progress, log, metrics")
    created_at: datetime
    data: dict[str, Any]


class EventList(BaseModel):
    object: str = "list"
    data: list[EventOut]
    has_more: bool
    last_id: int | None = None


class ArtifactOut(BaseModel):
    name: str = Field(examples=["model.safetensors"])
    kind: str = Field(examples=["model"])
    size: int
    sha256: str
    attempt: int
    url: str


class ArtifactList(BaseModel):
    object: str = "list"
    data: list[ArtifactOut]


class CalibrationSetOut(BaseModel):
    id: str
    object: str = "calibration_set"
    filename: str
    format: str
    size: int
    sha256: str
    records: int
    created_at: datetime


class CalibrationSetList(BaseModel):
    object: str = "list"
    data: list[CalibrationSetOut]
    has_more: bool
    last_id: str | None = None


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Ready(BaseModel):
    status: str = Field(examples=["ok"])
    checks: dict[str, str] = Field(examples=[{"database": "ok", "broker": "ok", "storage": "ok"}])


def job_urls(base: str, job_id: str) -> dict[str, str]:
    p = f"{base}/v1/pruning-jobs/{job_id}"
    return {
        "self": p,
        "cancel": f"{p}/cancel",
        "events": f"{p}/events",
        "events_stream": f"{p}/events/stream",
        "artifacts": f"{p}/artifacts",
    }


def job_out(job: Job, base: str = "") -> JobOut:
    cfg = job.config or {}
    return JobOut(
        id=job.id,
        status=job.status,
        model=cfg["model"],
        method=cfg["method"],
        sparsity=cfg.get("sparsity"),
        pattern=cfg.get("pattern"),
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        cancel_requested=job.cancel_requested,
        timestamps=Timestamps.model_validate(job, from_attributes=True),
        progress=Progress.model_validate(job.progress) if job.progress else None,
        error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
        metrics=job.metrics,
        metadata=job.job_metadata or {},
        request=job.request,
        urls=job_urls(base, job.id),
    )


def event_out(ev: JobEvent) -> EventOut:
    return EventOut(id=ev.seq, type=ev.type, created_at=ev.created_at, data=ev.data)


def artifact_out(a: Artifact, base: str = "") -> ArtifactOut:
    return ArtifactOut(
        name=a.name,
        kind=a.kind,
        size=a.size,
        sha256=a.sha256,
        attempt=a.attempt,
        url=f"{base}/v1/pruning-jobs/{a.job_id}/artifacts/{a.name}",
    )


def calibration_out(c: CalibrationSet) -> CalibrationSetOut:
    return CalibrationSetOut.model_validate(c, from_attributes=True)
