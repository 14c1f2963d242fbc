"""Shared test fixtures.

Tests that need ../shared, Postgres or Redis skip with a reason when those are absent; with
SECATEURS_REQUIRE_ALL=1 (set by .ci/run) such a skip becomes a failure, so CI always runs them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SECATEURS_SHARED_DIR", ROOT.parent / "shared"))
REQUIRE_ALL = os.environ.get("SECATEURS_REQUIRE_ALL") == "1"


def require(ok: bool, reason: str) -> None:
    """Skip (or, under CI, fail) when an external resource is missing."""
    if ok:
        return
    if REQUIRE_ALL:
        pytest.fail(f"required resource missing (SECATEURS_REQUIRE_ALL=1): {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    require(SHARED.is_dir(), f"{SHARED} not found: the shared test assets sit beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def stories260k(shared_dir: Path) -> Path:
    p = shared_dir / "assets" / "stories260k-hf"
    require(p.is_dir(), f"{p} not found")
    return p


@pytest.fixture(scope="session")
def text_dir(shared_dir: Path) -> Path:
    p = shared_dir / "assets" / "text"
    require(p.is_dir(), f"{p} not found")
    return p


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch) -> directory of a saved tiny model of that architecture (built once per session)."""
    from tests.fixtures import tiny_models

    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = tiny_models.build(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return get


def pytest_configure(config):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# Service fixtures (Postgres/Redis/moto/API client) live in tests/service_fixtures.py; the stack the client and
# the remote CLI are tested against (tests/client, tests/cli) in tests/remote_stack.py.
from tests.remote_stack import *  # noqa: E402,F401,F403
from tests.service_fixtures import *  # noqa: E402,F401,F403
