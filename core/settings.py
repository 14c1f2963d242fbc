"""Service settings: one pydantic-settings class, environment prefix ``SECATEURS_``.

With no configuration at all the service runs embedded on one machine: a SQLite file database, a local
artifact directory and a Celery broker that needs no server (kombu's SQLAlchemy transport on a SQLite file),
all under ``data_dir``. Pointing ``database_url`` at Postgres, ``broker_url`` at Redis and
``storage_backend=s3`` at an S3-compatible store runs the same code on real services.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEV_SECRET = "dev-insecure-secret-change-me"


def _abs(p: Path) -> Path:
    return p.expanduser().resolve()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SECATEURS_", env_file=".env", extra="ignore")

    env: Literal["development", "test", "production"] = Field(
        "development", description="production refuses to start with defaulted secrets"
    )
    data_dir: Path = Field(Path("./var"), description="home of the embedded database, broker and artifacts")

    # database
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/secateurs.db")
    database_echo: bool = False

    # broker
    broker_url: str | None = Field(None, description="Celery broker; default sqla+sqlite:///<data_dir>/broker.db")
    result_backend: str | None = Field(
        None, description="Celery result backend; default db+sqlite:///<data_dir>/results.db"
    )
    queue: str = Field("secateurs", description="Celery queue the prune tasks go to")

    # artifacts
    storage_backend: Literal["local", "s3"] = "local"
    artifacts_dir: Path | None = Field(None, description="local backend root; default <data_dir>/artifacts")
    s3_bucket: str = "secateurs"
    s3_endpoint_url: str | None = Field(None, description="endpoint the service talks to (in-cluster host)")
    s3_public_endpoint_url: str | None = Field(None, description="endpoint presigned URLs are signed for")
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "path"
    presign_expires_seconds: int = Field(300, ge=1, le=7 * 24 * 3600)

    # API
    secret_key: SecretStr | None = Field(None, description="pepper for API-key hashes; required outside development")
    allowed_model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="local model directories jobs may read (comma separated)"
    )
    allowed_task_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="directories of lm-eval task files jobs may name in evaluation.task_paths (comma separated); "
        "their YAML may run Python code on the worker (`!function`): trusted files only",
    )
    calibration_max_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_metadata_keys: int = 16
    idempotency_lock_seconds: int = Field(60, description="an unfinished Idempotency-Key older than this is taken over")
    sse_poll_seconds: float = Field(0.5, gt=0, description="how often a stream polls on SQLite (Postgres pushes)")
    sse_max_streams_per_tenant: int = Field(
        100, ge=1, description="open event streams one tenant may hold per API process (429 beyond)"
    )
    public_base_url: str | None = Field(None, description="prefix of absolute URLs in responses; default relative")

    # worker
    max_attempts: int = Field(3, ge=1, description="deliveries of one job before it fails with worker_lost")
    task_time_limit: int = Field(6 * 3600, ge=1, description="hard time limit of one prune task, seconds")
    visibility_timeout: int | None = Field(None, description="broker redelivery timeout; default time limit + 1h")
    lease_seconds: float = Field(60.0, gt=0, description="a running job whose heartbeat is older is presumed lost")
    reaper_interval_seconds: float = Field(15.0, gt=0, description="how often a worker looks for lost jobs")
    redeliver_after_seconds: float = Field(
        120.0,
        gt=0,
        description="a queued job not claimed this long after it was published, and whose message is no longer "
        "waiting in the broker (lost, dropped, or held by a dead worker), is published again by the sweep",
    )
    enqueue_timeout_seconds: float = Field(
        2.0,
        gt=0,
        description="the longest a job creation waits for the broker; past it the job stays stored and queued, "
        "and the sweep publishes it once the broker is back",
    )
    database_retry_seconds: float = Field(
        60.0,
        ge=0,
        description="how long a worker retries a claim or a job's final write while the database is unreachable",
    )
    work_dir: Path | None = Field(None, description="scratch space of the worker; default <data_dir>/work")
    device: str = Field("auto", description="device the worker prunes on")
    progress_event_interval_seconds: float = Field(
        1.0, ge=0, description="at most one progress event per job per this many seconds (0: every report)"
    )

    # webhooks
    webhook_queue: str | None = Field(
        None, description="Celery queue of webhook deliveries (the webhook worker's); default <queue>-webhooks"
    )
    webhook_allow_private_addresses: bool = Field(
        False,
        description="let webhook URLs reach loopback, link-local, private, unspecified and multicast addresses "
        "(for tests and closed networks only)",
    )
    webhook_secret_grace_seconds: float = Field(
        24 * 3600.0, ge=0, description="after a secret rotation, deliveries are signed with the previous secret too"
    )
    webhook_max_attempts: int = Field(15, ge=1, description="attempts of one delivery before it is given up")
    webhook_backoff_base_seconds: float = Field(
        10.0, gt=0, description="wait after a delivery's first failed attempt; doubled after each further one"
    )
    webhook_backoff_max_seconds: float = Field(
        6 * 3600.0, gt=0, description="the longest wait between two attempts of one delivery (before jitter)"
    )
    webhook_connect_timeout_seconds: float = Field(5.0, gt=0, description="connecting to a webhook receiver")
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, description="the whole of one delivery attempt: resolve, connect, send, read the answer"
    )
    webhook_redeliver_after_seconds: float = Field(
        60.0,
        gt=0,
        description="a due delivery published this long ago and not attempted since, whose message no longer "
        "waits in the broker, is published again by the sweep",
    )
    webhook_progress_interval_seconds: float = Field(
        10.0,
        ge=0,
        description="job.progress deliveries (opt-in per endpoint) about one job to one endpoint are at least this "
        "far apart; the reports in between are coalesced into the waiting one",
    )
    webhook_worker_threads: int = Field(4, ge=1, description="threads of `secateurs service webhooks`")
    webhook_max_endpoints_per_tenant: int = Field(20, ge=1, description="webhook endpoints one tenant may register")

    @field_validator("allowed_model_roots", "allowed_task_roots", mode="before")
    @classmethod
    def _split_roots(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                import json

                return json.loads(v)
            return [p for p in v.replace(os.pathsep, ",").split(",") if p.strip()]
        return v

    @model_validator(mode="after")
    def _production_secrets(self) -> Settings:
        if self.env == "production":
            if self.secret_key is None or self.secret_key.get_secret_value() == DEV_SECRET:
                raise ValueError("SECATEURS_SECRET_KEY must be set in production")
            if self.storage_backend == "s3" and self.s3_secret_access_key is None:
                raise ValueError("SECATEURS_S3_SECRET_ACCESS_KEY must be set in production")
        return self

    # derived values -------------------------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        return _abs(self.data_dir)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_path / 'secateurs.db'}"

    @property
    def broker(self) -> str:
        # sqla+sqlite:////abs/path: four slashes for an absolute path
        return self.broker_url or f"sqla+sqlite:///{self.data_path / 'broker.db'}"

    @property
    def backend(self) -> str:
        if self.result_backend:
            return self.result_backend
        if self.broker.startswith(("redis://", "rediss://")):
            return self.broker
        return f"db+sqlite:///{self.data_path / 'results.db'}"

    @property
    def artifacts_path(self) -> Path:
        return _abs(self.artifacts_dir) if self.artifacts_dir else self.data_path / "artifacts"

    @property
    def work_path(self) -> Path:
        return _abs(self.work_dir) if self.work_dir else self.data_path / "work"

    @property
    def visibility(self) -> int:
        return self.visibility_timeout or self.task_time_limit + 3600

    @property
    def webhooks_queue(self) -> str:
        return self.webhook_queue or f"{self.queue}-webhooks"

    @property
    def pepper(self) -> bytes:
        return (self.secret_key.get_secret_value() if self.secret_key else DEV_SECRET).encode()

    @property
    def model_roots(self) -> list[Path]:
        return [_abs(p) for p in self.allowed_model_roots]

    @property
    def task_roots(self) -> list[Path]:
        return [_abs(p) for p in self.allowed_task_roots]

    def ensure_dirs(self) -> None:
        if (
            self.db_url.startswith("sqlite")
            or self.broker.startswith("sqla+sqlite")
            or self.backend.startswith("db+sqlite")
            or self.storage_backend == "local"
        ):
            self.data_path.mkdir(parents=True, exist_ok=True)
        if self.storage_backend == "local":
            self.artifacts_path.mkdir(parents=True, exist_ok=True)


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
