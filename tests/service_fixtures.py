"""Fixtures for the service tests (API, database, jobs, worker, end to end).

Real services only: Postgres (SECATEURS_TEST_POSTGRES_URL, default postgresql+psycopg://postgres@127.0.0.1:5432/test)
and Redis (SECATEURS_TEST_REDIS_URL, default redis://127.0.0.1:6379/0). Each test session migrates its own
throw-away Postgres database with Alembic; every test starts from empty tables.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.conftest import require

PG_URL = os.environ.get("SECATEURS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SECATEURS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TABLES = (
    "webhook_deliveries",
    "webhook_endpoints",
    "idempotency_keys",
    "artifacts",
    "job_events",
    "jobs",
    "calibration_sets",
    "api_keys",
    "tenants",
)


def _port_open(url: str, default_port: int) -> bool:
    u = urlparse(url.replace("+psycopg", ""))
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or default_port), timeout=1):
            return True
    except OSError:
        return False


def postgres_up() -> bool:
    return _port_open(PG_URL, 5432)


def redis_up() -> bool:
    return _port_open(REDIS_URL, 6379)


def _pg_admin():  # noqa: ANN202
    import psycopg

    u = urlparse(PG_URL.replace("+psycopg", ""))
    return psycopg.connect(
        host=u.hostname,
        port=u.port or 5432,
        user=u.username or "postgres",
        password=u.password,
        dbname=(u.path or "/test").lstrip("/"),
        autocommit=True,
    )


def _with_db(url: str, name: str) -> str:
    u = urlparse(url)
    return u._replace(path="/" + name).geturl()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh Postgres database migrated with `alembic upgrade head`, dropped afterwards."""
    require(postgres_up(), f"Postgres not reachable at {PG_URL}")
    from core.db.migrate import upgrade

    name = f"secateurs_t_{uuid.uuid4().hex[:10]}"
    with _pg_admin() as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = _with_db(PG_URL, name)
    upgrade(url)
    yield url
    from core.db.engine import dispose_all

    dispose_all()
    with _pg_admin() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_database(tmp_path_factory: pytest.TempPathFactory) -> str:
    from core.db.migrate import upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'secateurs.db'}"
    upgrade(url)
    return url


def wipe(url: str) -> None:
    from sqlalchemy import text

    from core.db.engine import get_engine

    with get_engine(url).begin() as conn:
        for t in TABLES:
            conn.execute(text(f"DELETE FROM {t}"))


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs on embedded SQLite and on Postgres, from empty tables."""
    url = request.getfixturevalue("sqlite_database" if request.param == "sqlite" else "pg_database")
    wipe(url)
    return url


@pytest.fixture
def service_settings(db_url: str, tmp_path: Path):  # noqa: ANN201
    """Settings for an in-process API: SQLite DB + SQLite broker, or Postgres + Redis (own queue)."""
    from core.settings import Settings

    queue = f"secateurs-test-{uuid.uuid4().hex[:8]}"
    if db_url.startswith("sqlite"):
        broker = None
    else:
        require(redis_up(), f"Redis not reachable at {REDIS_URL}")
        broker = REDIS_URL
    s = Settings(
        _env_file=None,
        env="test",
        data_dir=tmp_path / "var",
        database_url=db_url,
        broker_url=broker,
        result_backend=None,
        queue=queue,
        allowed_model_roots=[tmp_path / "models"],
        secret_key="test-secret",
        calibration_max_bytes=64 * 1024,
    )
    (tmp_path / "models").mkdir()
    yield s
    if broker:
        import redis

        redis.Redis.from_url(REDIS_URL).delete(queue)


class Api:
    """An in-process API client plus helpers to make tenants and keys."""

    def __init__(self, settings, client) -> None:  # noqa: ANN001
        self.settings = settings
        self.client = client

    def tenant(self, name: str | None = None) -> tuple[str, dict[str, str]]:
        from core.auth import create_key, create_tenant
        from core.db.engine import session_scope

        with session_scope(self.settings.db_url) as s:
            t = create_tenant(s, name or f"t-{uuid.uuid4().hex[:8]}")
            _, key = create_key(s, t.id, self.settings.pepper)
            tid = t.id
        return tid, {"Authorization": f"Bearer {key}"}


@pytest.fixture
def api(service_settings) -> Iterator[Api]:  # noqa: ANN001
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(service_settings), raise_server_exceptions=False) as c:
        yield Api(service_settings, c)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's S3 in server mode, over real HTTP."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_endpoint(moto_server: str) -> str:
    """The moto server, reset before each test."""
    import requests

    requests.post(f"{moto_server}/moto-api/reset", timeout=10)
    return moto_server


S3_CREDS = {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}
