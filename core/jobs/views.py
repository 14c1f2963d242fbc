"""The public representation of a pruning job: what the API answers and what webhooks carry (``data`` of a
``job.*`` event), so both always agree."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from core.db.models import Job


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
