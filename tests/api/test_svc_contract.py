"""The API keeps its published contract: every operation of the OpenAPI document is called with generated
requests (valid and invalid, seeded so runs repeat), as an authenticated tenant (its key is the token of the
documented bearer scheme), on SQLite and on Postgres. Every response must be the documented one (status code,
content type, headers, body schema); a request the schema allows must be accepted and one it forbids refused;
a request without the key is a 401; a method a path lacks is a 405 with `Allow`, and OPTIONS lists them all.

Each generated request runs twice: as generated (unknown ids: the 404/422 paths) and with its path ids
replaced by a real succeeded job, its artifact, a calibration set and a webhook endpoint (the 200/409 paths).
Ids and keys in the body or headers that name server state (a calibration set, an Idempotency-Key already used)
are made real or fresh before either call: whether they exist is the server's state, which no schema states.
Likewise a webhook URL the schema allows is made one whose host is a public address: what a host name resolves
to is the world's state."""

from __future__ import annotations

import json
import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    allow_header_conformance,
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from schemathesis.config import SchemathesisConfig
from schemathesis.core.parameters import ParameterLocation

from core.db.engine import session_scope
from core.db.models import Artifact
from core.jobs import execution
from core.jobs.schemas import CAL_ID
from core.webhooks.schemas import WEBHOOK_URL


def invalid_data_is_refused(ctx, response, case):  # noqa: ANN001, ANN201
    """negative_data_rejection, less two readings the schema does not advertise: a multipart part is text
    whatever JSON type was drawn for it, and the JSON body parser reads true/false as 1/0 where a number is
    expected and 1/0 as true/false where a boolean is (pydantic's lax mode). An accepted request whose only
    invalid part is a body that one such reading makes valid is not counted as invalid data accepted."""
    if 200 <= response.status_code < 300 and _body_valid_as_read(case):
        return None
    return negative_data_rejection(ctx, response, case)


@schemathesis.serializer("application/jsonl")
def _jsonl(ctx, value):  # noqa: ANN001, ANN202
    """A calibration upload's file part (one of whose documented types is application/jsonl) drawn as a value that
    is not a file, e.g. `false` in a negative case: sent as its JSON text, as the text/plain reading would be."""
    return {"data": value if isinstance(value, bytes) else json.dumps(value).encode()}


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    positive_data_acceptance,
    invalid_data_is_refused,
    missing_required_header,
    ignored_auth,
    unsupported_method,
    allow_header_conformance,
]
NOT_BODY = (ParameterLocation.PATH, ParameterLocation.QUERY, ParameterLocation.HEADER, ParameterLocation.COOKIE)
# A valid request may still meet a resource that is missing (404) or in another state (409), or lack a key
# the tenant never had (401); any other 4xx says the schema allowed what the server refuses.
PUBLIC_URL = "https://93.184.216.34/hook"  # a public address literal: nothing to resolve, nothing is sent
CONFIG = {
    "seed": 19,  # the same cases on every run (with derandomize), as in CI
    "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "3xx", "401", "404", "409"]}},
}


@pytest.fixture
def seeded(api, tmp_path):  # noqa: ANN001, ANN201
    """A tenant with a succeeded job (one artifact), a calibration set and a webhook endpoint; their ids and the
    tenant's headers."""
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
    set_id = r.json()["id"]
    r = api.client.post("/v1/webhook-endpoints", headers=headers, json={"url": PUBLIC_URL})
    assert r.status_code == 201, r.text
    ids = {"job_id": jid, "name": "model.safetensors", "set_id": set_id, "endpoint_id": r.json()["id"]}
    return headers, ids


@pytest.fixture
def contract(api, seeded):  # noqa: ANN001, ANN201
    """The schema as the seeded tenant uses it: its key is the bearer token of the OpenAPI security scheme."""
    headers, _ = seeded
    token = headers["Authorization"].removeprefix("Bearer ")
    config = {**CONFIG, "auth": {"openapi": {"HTTPBearer": {"bearer": token}}}}
    return schemathesis.openapi.from_asgi("/openapi.json", api.client.app, config=SchemathesisConfig.from_dict(config))


schema = schemathesis.pytest.from_fixture("contract")


@schema.parametrize()
@settings(
    max_examples=20,  # the fuzzing phase's, per operation and mode; the coverage phase adds its own cases
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_response_is_the_documented_one(case, seeded):  # noqa: ANN001
    _, ids = seeded
    _with_real_state(case, ids)
    case.call_and_validate(checks=CHECKS)
    known = {k: v for k, v in ids.items() if k in (case.path_parameters or {})}
    if known:
        # invalid ids replaced by real ones no longer make the request invalid
        replaced_invalid = case.meta is not None and case.meta.is_negative_at(ParameterLocation.PATH)
        case.path_parameters = {**case.path_parameters, **known}
        case.call_and_validate(checks=[c for c in CHECKS if not (replaced_invalid and c is invalid_data_is_refused)])


def _with_real_state(case, ids):  # noqa: ANN001, ANN202
    """Calibration-set ids in the body name the tenant's set; an Idempotency-Key is one not used before (a
    reused key with another body is refused, rightly). Ids and keys the schema forbids are left as they are."""
    if isinstance(case.body, dict):
        url = case.body.get("url")
        if case.operation.path == "/v1/webhook-endpoints" and isinstance(url, str) and WEBHOOK_URL.fullmatch(url):
            case.body["url"] = PUBLIC_URL
        for block in ("calibration", "evaluation", "recovery"):
            part = case.body.get(block)
            if isinstance(part, dict) and isinstance(part.get("calibration_set_id"), str):
                if CAL_ID.match(part["calibration_set_id"]):
                    part["calibration_set_id"] = ids["set_id"]
    negative_body = case.meta is not None and case.meta.is_negative_at(ParameterLocation.BODY)
    if isinstance(case.body, dict) and not negative_body:
        # a sweep's export_* name some of its targets: a rule across fields that JSON Schema cannot state (the
        # fields' descriptions do); a valid body keeps only the marked targets that are swept
        for marked, swept in (("export_sparsities", "sparsities"), ("export_patterns", "patterns")):
            if isinstance(case.body.get(marked), list) and isinstance(case.body.get(swept), list):
                case.body[marked] = [x for x in case.body[marked] if x in case.body[swept]]
    key = (case.headers or {}).get("Idempotency-Key")
    if isinstance(key, str) and 1 <= len(key) <= 255:
        case.headers["Idempotency-Key"] = uuid.uuid4().hex


def _body_valid_as_read(case) -> bool:  # noqa: ANN001
    if case.meta is None or any(case.meta.is_negative_at(where) for where in NOT_BODY):
        return False
    declared = case.operation.get_body_for_media_type(case.media_type)
    if declared is None or not isinstance(case.body, dict):
        return False
    if case.media_type == "multipart/form-data":
        return declared.is_valid({k: v if isinstance(v, (str, bytes)) else json.dumps(v) for k, v in case.body.items()})
    return any(declared.is_valid(read) for read in _lax_readings(case.body))


def _lax_readings(value):  # noqa: ANN001, ANN202
    """`value` with one boolean read as the equal number, or one 0 or 1 read as the equal boolean."""
    if isinstance(value, bool):
        yield int(value)
    elif isinstance(value, (int, float)) and value in (0, 1):
        yield bool(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            for read in _lax_readings(item):
                yield {**value, key: read}
    elif isinstance(value, list):
        for i, item in enumerate(value):
            for read in _lax_readings(item):
                yield [*value[:i], read, *value[i + 1 :]]
