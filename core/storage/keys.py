"""The layout of stored objects: every key the service writes is built here."""

from __future__ import annotations


def calibration_set(tenant_id: str, set_id: str, fmt: str) -> str:
    return f"tenants/{tenant_id}/calibration-sets/{set_id}/data.{fmt}"


def attempt_prefix(tenant_id: str, job_id: str, attempt: int) -> str:
    """Everything one attempt of a job uploads; removed whole when the attempt does not succeed."""
    return f"tenants/{tenant_id}/jobs/{job_id}/attempt-{attempt}/"


def artifact(tenant_id: str, job_id: str, attempt: int, name: str) -> str:
    return attempt_prefix(tenant_id, job_id, attempt) + name


RESUME_ROOT = "resume/"


def resume_prefix(tenant_id: str, job_id: str) -> str:
    """A job's resume checkpoint (finished blocks), shared by its attempts; removed when the job ends."""
    return f"{RESUME_ROOT}{tenant_id}/{job_id}/"
