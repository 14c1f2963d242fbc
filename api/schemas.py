"""Response bodies (documented in OpenAPI) and the functions that build them from rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from core.db.models import Artifact, CalibrationSet, JobEvent, WebhookDelivery, WebhookEndpoint

# the job's models live in core (webhooks carry the same JobOut); re-exported for the routes
from core.jobs.views import JobError, JobOut, Progress, Timestamps, job_out, job_urls  # noqa: F401


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


class WebhookEndpointOut(BaseModel):
    id: str = Field(examples=["whe_0191c5f0a3b2c1d2e3f4a5b6c7"])
    object: str = "webhook_endpoint"
    url: str = Field(examples=["https://example.com/hooks/secateurs"])
    description: str
    event_types: list[str] = Field(examples=[["job.succeeded", "job.failed", "job.cancelled"]])
    created_at: datetime
    rotated_at: datetime | None = Field(None, description="when the signing secret was last rotated")
    previous_secret_expires_at: datetime | None = Field(
        None, description="until then deliveries are signed with the previous secret too"
    )
    urls: dict[str, str]


class WebhookEndpointCreated(WebhookEndpointOut):
    secret: str = Field(
        description="the signing secret (Standard Webhooks); shown only in this response",
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    )


class WebhookEndpointList(BaseModel):
    object: str = "list"
    data: list[WebhookEndpointOut]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class WebhookSecretOut(BaseModel):
    object: str = "webhook_secret"
    endpoint_id: str
    secret: str = Field(description="the new signing secret; shown only in this response")
    previous_secret_expires_at: datetime | None = Field(
        None, description="until then deliveries carry a signature with the previous secret too"
    )


class WebhookDeliveryOut(BaseModel):
    id: str = Field(examples=["msg_0191c5f0a3b2c1d2e3f4a5b6c7"])
    object: str = "webhook_delivery"
    webhook_id: str = Field(description="the `webhook-id` header, the same on every attempt")
    endpoint_id: str
    event_type: str = Field(examples=["job.succeeded"])
    job_id: str | None = None
    status: str = Field(
        examples=["pending"],
        description="pending (waits for its next attempt), sending (an attempt is in flight), succeeded, failed "
        "(given up)",
    )
    attempts: int
    created_at: datetime
    last_attempt_at: datetime | None = None
    next_attempt_at: datetime | None = Field(None, description="when a pending delivery is attempted next")
    last_status_code: int | None = Field(None, examples=[200])
    last_error: str | None = Field(None, examples=["timeout: timed out"])
    response_body: str | None = Field(None, description="the start of the last answer's body (at most 1 KiB)")
    finished_at: datetime | None = None


class WebhookDeliveryList(BaseModel):
    object: str = "list"
    data: list[WebhookDeliveryOut]
    has_more: bool
    last_id: str | None = None


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Ready(BaseModel):
    status: str = Field(examples=["ok"])
    checks: dict[str, str] = Field(examples=[{"database": "ok", "broker": "ok", "storage": "ok"}])


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


def webhook_endpoint_out(ep: WebhookEndpoint, base: str = "") -> WebhookEndpointOut:
    p = f"{base}/v1/webhook-endpoints/{ep.id}"
    return WebhookEndpointOut(
        id=ep.id,
        url=ep.url,
        description=ep.description,
        event_types=list(ep.event_types),
        created_at=ep.created_at,
        rotated_at=ep.rotated_at,
        previous_secret_expires_at=ep.previous_secret_expires_at,
        urls={
            "self": p,
            "deliveries": f"{p}/deliveries",
            "rotate_secret": f"{p}/rotate-secret",
            "test": f"{p}/test",
        },
    )


def webhook_delivery_out(d: WebhookDelivery) -> WebhookDeliveryOut:
    return WebhookDeliveryOut(
        id=d.id,
        webhook_id=d.id,
        endpoint_id=d.endpoint_id,
        event_type=d.event_type,
        job_id=d.job_id,
        status=d.status,
        attempts=d.attempts,
        created_at=d.created_at,
        last_attempt_at=d.last_attempt_at,
        next_attempt_at=d.next_attempt_at if d.status == "pending" else None,
        last_status_code=d.last_status_code,
        last_error=d.last_error,
        response_body=d.response_body,
        finished_at=d.finished_at,
    )
