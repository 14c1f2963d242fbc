"""Settings: embedded defaults with zero config, env prefix, production refuses defaulted secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from core.settings import Settings


def test_zero_config_is_embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    s = Settings(_env_file=None)
    d = (tmp_path / "var").resolve()
    assert s.db_url == f"sqlite:///{d}/secateurs.db"
    assert s.broker == f"sqla+sqlite:///{d}/broker.db" and s.broker.startswith("sqla+sqlite:////")
    assert s.backend == f"db+sqlite:///{d}/results.db"
    assert s.storage_backend == "local" and s.artifacts_path == d / "artifacts"
    assert s.visibility == s.task_time_limit + 3600


def test_env_prefix_and_lists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("SECATEURS_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("SECATEURS_BROKER_URL", "redis://h:6379/0")
    monkeypatch.setenv("SECATEURS_ALLOWED_MODEL_ROOTS", f"{tmp_path}/a,{tmp_path}/b")
    s = Settings(_env_file=None)
    assert s.db_url == "postgresql+psycopg://u@h/db" and s.broker == "redis://h:6379/0"
    assert s.backend == "redis://h:6379/0"
    assert s.model_roots == [tmp_path / "a", tmp_path / "b"]


def test_production_refuses_default_secrets():
    with pytest.raises(ValidationError, match="SECATEURS_SECRET_KEY"):
        Settings(_env_file=None, env="production")
    with pytest.raises(ValidationError, match="S3_SECRET_ACCESS_KEY"):
        Settings(_env_file=None, env="production", secret_key="s" * 32, storage_backend="s3")
    assert Settings(_env_file=None, env="production", secret_key="s" * 32).pepper == b"s" * 32
