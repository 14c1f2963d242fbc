"""The client package stands alone: importing it pulls in none of the service (core, api, worker, cli) nor
torch, transformers or SQLAlchemy; its models mirror the API's published response schemas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import ROOT

FORBIDDEN = ("torch", "transformers", "sqlalchemy", "core", "api", "worker", "cli", "celery", "boto3")


def test_importing_the_client_imports_nothing_heavy_nor_the_service():
    code = (
        "import json, sys\n"
        "import client\n"
        "from client import Client\n"
        "import client.download, client.sse\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout))
    assert "client" in loaded and "httpx" in loaded and "pydantic" in loaded
    assert not loaded & set(FORBIDDEN), sorted(loaded & set(FORBIDDEN))


def _types(schema: dict[str, Any]) -> set[str]:
    """The JSON types a property schema allows (a reference is an object)."""
    if "$ref" in schema:
        return {"object"}
    if "anyOf" in schema:
        return set().union(*(_types(s) for s in schema["anyOf"]))
    return {schema["type"]} if "type" in schema else {"any"}


PAIRS = {  # client model -> the API's schema in /openapi.json
    "Job": "JobOut",
    "JobList": "JobList",
    "Progress": "Progress",
    "JobError": "JobError",
    "Timestamps": "Timestamps",
    "Event": "EventOut",
    "EventList": "EventList",
    "Artifact": "ArtifactOut",
    "ArtifactList": "ArtifactList",
    "CalibrationSet": "CalibrationSetOut",
    "CalibrationSetList": "CalibrationSetList",
    "Problem": "Problem",
    "ProblemError": "ProblemError",
    "Health": "Health",
    "Ready": "Ready",
}


@pytest.fixture(scope="module")
def openapi(tmp_path_factory) -> dict[str, Any]:  # noqa: ANN001
    from api.app import create_app
    from core.settings import Settings

    tmp = tmp_path_factory.mktemp("openapi")
    s = Settings(_env_file=None, env="test", data_dir=tmp, database_url=f"sqlite:///{tmp / 'db.sqlite'}")
    return create_app(s).openapi()


@pytest.mark.parametrize("ours,theirs", PAIRS.items())
def test_client_models_mirror_the_published_schemas(openapi: dict[str, Any], ours: str, theirs: str):
    from client import models

    components = openapi["components"]["schemas"]
    api = components[theirs]
    model = getattr(models, ours)
    fields = model.model_fields
    assert set(fields) == set(api["properties"]), (ours, set(fields) ^ set(api["properties"]))
    required_by_api = set(api.get("required", []))
    required_here = {n for n, f in fields.items() if f.is_required()}
    # what the API always sends may be required here; nothing the API may leave out is
    assert required_here <= required_by_api, (ours, required_here - required_by_api)
    ours_props = model.model_json_schema()["properties"]
    for name, prop in api["properties"].items():
        assert _types(ours_props[name]) == _types(prop), (ours, name, ours_props[name], prop)
