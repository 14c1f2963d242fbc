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
    calibration_max_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_metadata_keys: int = 16
    idempotency_lock_seconds: int = Field(60, description="an unfinished Idempotency-Key older than this is taken over")
    sse_poll_seconds: float = 0.5
    public_base_url: str | None = Field(None, description="prefix of absolute URLs in responses; default relative")

    # worker
    max_attempts: int = Field(3, ge=1, description="deliveries of one job before it fails with worker_lost")
    task_time_limit: int = Field(6 * 3600, ge=1, description="hard time limit of one prune task, seconds")
    visibility_timeout: int | None = Field(None, description="broker redelivery timeout; default time limit + 1h")
    lease_seconds: float = Field(60.0, gt=0, description="a running job whose heartbeat is older is presumed lost")
    reaper_interval_seconds: float = Field(15.0, gt=0, description="how often a worker looks for lost jobs")
    work_dir: Path | None = Field(None, description="scratch space of the worker; default <data_dir>/work")
    device: str = Field("auto", description="device the worker prunes on")

    @field_validator("allowed_model_roots", mode="before")
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
    def pepper(self) -> bytes:
        return (self.secret_key.get_secret_value() if self.secret_key else DEV_SECRET).encode()

    @property
    def model_roots(self) -> list[Path]:
        return [_abs(p) for p in self.allowed_model_roots]

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
