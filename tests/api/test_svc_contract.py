"""The API keeps its published contract: every operation of the OpenAPI document is called with generated
requests (valid and invalid, seeded so runs repeat), as an authenticated tenant, on SQLite and on Postgres,
and every response must be documented: its status code, its content type and its body's schema.

Each generated request runs twice: as generated (unknown ids: the 404/422 paths) and with its path ids
replaced by a real succeeded job, its artifact and a calibration set (the 200/409 paths)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from core.db.engine import session_scope
from core.db.models import Artifact
from core.jobs import execution

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture
def seeded(api, tmp_path):  # noqa: ANN001, ANN201
    """A tenant with a succeeded job (one artifact) and a calibration set; their ids and the tenant's headers."""
    tid, headers = api.tenant()
    r = api.client.post(
        "/v1/pruning-jobs",
        headers=headers,
        json={
            "model": "org/tiny-model",
            "sparsity": 0.5,
            "calibration": {"texts": ["hello world"], "nsamples": 4, "seqlen": 32},
        },
    )
    assert r.status_code == 201, r.text
    jid = r.json()["id"]
    src = tmp_path / "model.safetensors"
    src.write_bytes(b"\0" * 64)
    key = f"tenants/{tid}/jobs/{jid}/attempt-1/model.safetensors"
    info = api.client.app.state.storage.put_file(key, src)
    with session_scope(api.settings.db_url) as s:
        execution.claim(s, tid, jid, "w", 60)
        art = Artifact(
            tenant_id=tid,
            job_id=jid,
            attempt=1,
            name="model.safetensors",
            kind="model",
            size=info.size,
            sha256=info.sha256,
            storage_key=key,
        )
        execution.finish(s, tid, jid, 1, outcome="succeeded", artifacts=[art], metrics={"achieved_sparsity": 0.5})
    r = api.client.post("/v1/calibration-sets", headers=headers, files={"file": ("c.txt", b"some text")})
    assert r.status_code == 201, r.text
    ids = {"job_id": jid, "name": "model.safetensors", "set_id": r.json()["id"]}
    return headers, ids


@pytest.fixture
def contract(api):  # noqa: ANN001, ANN201
    return schemathesis.openapi.from_asgi("/openapi.json", api.client.app)


schema = schemathesis.pytest.from_fixture("contract")


@schema.parametrize()
@settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_response_is_the_documented_one(case, seeded):  # noqa: ANN001
    headers, ids = seeded
    case.call_and_validate(headers=headers, checks=CHECKS)
    known = {k: v for k, v in ids.items() if k in (case.path_parameters or {})}
    if known:
        case.path_parameters = {**case.path_parameters, **known}
        case.call_and_validate(headers=headers, checks=CHECKS)
