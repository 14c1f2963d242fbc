"""The HTTP API, in process, on embedded SQLite (+ SQLite broker) and on Postgres (+ Redis)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from core.db.engine import session_scope
from core.jobs import execution

PROBLEM = "application/problem+json"


def body(**kw):  # noqa: ANN003, ANN201
    b = {
        "model": "org/tiny-model",
        "method": "wanda",
        "sparsity": 0.5,
        "calibration": {"texts": ["hello world"], "nsamples": 4, "seqlen": 32},
    }
    b.update(kw)
    return b


def assert_problem(r, status: int, field: str | None = None):  # noqa: ANN001, ANN201
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    p = r.json()
    assert p["status"] == status and p["title"] and "type" in p
    if field is not None:
        locs = [".".join(str(x) for x in e["loc"] if x not in ("body", "query", "header")) for e in p["errors"]]
        assert any(loc == field or loc.startswith(field + ".") for loc in locs), (field, p)
        assert field.split(".")[0] in p["detail"]
    return p


# --- auth and tenancy ---------------------------------------------------------------------------


def test_requires_a_valid_key(api):  # noqa: ANN001
    assert_problem(api.client.get("/v1/pruning-jobs"), 401)
    r = api.client.get("/v1/pruning-jobs", headers={"Authorization": "Bearer sct_0123456789abcdef_" + "x" * 43})
    assert_problem(r, 401)
    assert r.headers["www-authenticate"] == "Bearer"


def test_tenants_never_see_each_other(api):  # noqa: ANN001
    _, ha = api.tenant()
    _, hb = api.tenant()
    job = api.client.post("/v1/pruning-jobs", json=body(), headers=ha).json()
    cal = api.client.post("/v1/calibration-sets", files={"file": ("c.txt", b"some text")}, headers=ha).json()
    for path in (
        f"/v1/pruning-jobs/{job['id']}",
        f"/v1/pruning-jobs/{job['id']}/events",
        f"/v1/pruning-jobs/{job['id']}/artifacts",
        f"/v1/pruning-jobs/{job['id']}/artifacts/x",
        f"/v1/calibration-sets/{cal['id']}",
        f"/v1/pruning-jobs/{job['id']}/events/stream",
    ):
        assert_problem(api.client.get(path, headers=hb), 404)
    assert_problem(api.client.post(f"/v1/pruning-jobs/{job['id']}/cancel", headers=hb), 404)
    assert api.client.get("/v1/pruning-jobs", headers=hb).json()["data"] == []
    assert api.client.get("/v1/calibration-sets", headers=hb).json()["data"] == []
    r = api.client.post("/v1/pruning-jobs", json=body(calibration={"calibration_set_id": cal["id"]}), headers=hb)
    assert_problem(r, 422, "calibration.calibration_set_id")


# --- create, get, list --------------------------------------------------------------------------


def test_create_returns_201_location_and_the_job(api):  # noqa: ANN001
    _, h = api.tenant()
    r = api.client.post("/v1/pruning-jobs", json=body(metadata={"team": "x"}, pattern="2:4", sparsity=None), headers=h)
    assert r.status_code == 201, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/pruning-jobs/{job['id']}"
    assert job["status"] == "queued" and job["attempt"] == 0 and job["pattern"] == "2:4"
    assert job["metadata"] == {"team": "x"}
    assert job["timestamps"]["queued_at"] and job["timestamps"]["running_at"] is None
    assert job["urls"]["events_stream"].endswith("/events/stream")
    got = api.client.get(r.headers["location"], headers=h)
    assert got.status_code == 200 and got.json()["id"] == job["id"]
    evs = api.client.get(f"/v1/pruning-jobs/{job['id']}/events", headers=h).json()
    assert [(e["id"], e["type"], e["data"]["status"]) for e in evs["data"]] == [(1, "status", "queued")]


def test_etag_and_if_none_match(api):  # noqa: ANN001
    tid, h = api.tenant()
    job = api.client.post("/v1/pruning-jobs", json=body(), headers=h).json()
    r1 = api.client.get(f"/v1/pruning-jobs/{job['id']}", headers=h)
    etag = r1.headers["etag"]
    r2 = api.client.get(f"/v1/pruning-jobs/{job['id']}", headers={**h, "If-None-Match": etag})
    assert r2.status_code == 304 and r2.content == b"" and r2.headers["etag"] == etag
    assert api.client.get(f"/v1/pruning-jobs/{job['id']}", headers={**h, "If-None-Match": '"other"'}).status_code == 200
    with session_scope(api.settings.db_url) as s:  # the job changes: the ETag must too
        execution.claim(s, tid, job["id"], "w1", 60)
    r3 = api.client.get(f"/v1/pruning-jobs/{job['id']}", headers={**h, "If-None-Match": etag})
    assert r3.status_code == 200 and r3.headers["etag"] != etag and r3.json()["status"] == "running"


def test_list_cursor_pagination_and_status_filter(api):  # noqa: ANN001
    _, h = api.tenant()
    ids = [api.client.post("/v1/pruning-jobs", json=body(), headers=h).json()["id"] for _ in range(5)]
    api.client.post(f"/v1/pruning-jobs/{ids[1]}/cancel", headers=h)
    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = api.client.get("/v1/pruning-jobs", params=params, headers=h).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == ids[::-1]
    q = api.client.get("/v1/pruning-jobs", params={"status": "cancelled"}, headers=h).json()
    assert [j["id"] for j in q["data"]] == [ids[1]]
    q = api.client.get("/v1/pruning-jobs", params={"status": "queued,cancelled", "limit": 100}, headers=h).json()
    assert len(q["data"]) == 5
    assert_problem(api.client.get("/v1/pruning-jobs", params={"status": "nope"}, headers=h), 422, "status")
    assert_problem(api.client.get("/v1/pruning-jobs", params={"limit": 0}, headers=h), 422, "limit")


# --- idempotency --------------------------------------------------------------------------------


def test_idempotency_key_replays_the_stored_response(api):  # noqa: ANN001
    _, h = api.tenant()
    hk = {**h, "Idempotency-Key": "abc-1"}
    r1 = api.client.post("/v1/pruning-jobs", json=body(), headers=hk)
    r2 = api.client.post("/v1/pruning-jobs", json=body(), headers=hk)
    assert r1.status_code == r2.status_code == 201
    assert r2.json() == r1.json() and r2.headers["location"] == r1.headers["location"]
    assert r2.headers["idempotent-replayed"] == "true"
    assert len(api.client.get("/v1/pruning-jobs", headers=h).json()["data"]) == 1
    p = assert_problem(api.client.post("/v1/pruning-jobs", json=body(sparsity=0.6), headers=hk), 422)
    assert p["code"] == "idempotency_key_reused"
    # keys are per tenant
    _, h2 = api.tenant()
    r3 = api.client.post("/v1/pruning-jobs", json=body(), headers={**h2, "Idempotency-Key": "abc-1"})
    assert r3.status_code == 201 and r3.json()["id"] != r1.json()["id"]


def test_idempotency_key_in_flight_gives_409(api):  # noqa: ANN001
    from core.jobs.schemas import JobCreate
    from core.jobs.service import JobService, request_hash

    tid, h = api.tenant()
    with session_scope(api.settings.db_url) as s:  # a first request that has reserved the key, still running
        JobService(s, tid, api.settings).idempotency_begin("k-2", request_hash(JobCreate.model_validate(body())))
    p = assert_problem(api.client.post("/v1/pruning-jobs", json=body(), headers={**h, "Idempotency-Key": "k-2"}), 409)
    assert p["code"] == "idempotency_in_progress"


def test_rejected_body_does_not_burn_the_idempotency_key(api):  # noqa: ANN001
    _, h = api.tenant()
    hk = {**h, "Idempotency-Key": "k-3"}
    assert_problem(api.client.post("/v1/pruning-jobs", json=body(pattern="3:2"), headers=hk), 422, "pattern")
    assert api.client.post("/v1/pruning-jobs", json=body(), headers=hk).status_code == 201


# --- validation: every bad input is a 4xx problem naming the field ------------------------------


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"sparsity": 1.5}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": "half"}, "sparsity"),
        ({"pattern": "4:4"}, "pattern"),
        ({"pattern": "5:4"}, "pattern"),
        ({"pattern": "two-four"}, "pattern"),
        ({"method": "random"}, "method"),
        ({"model": ""}, "model"),
        ({"model": "/etc"}, "model"),
        ({"model": "../../etc/passwd"}, "model"),
        ({"model": "s3://"}, "model"),
        ({"model": "~nosuchuser/m"}, "model"),
        ({"model": "~/m"}, "model"),
        ({"dtype": "int3"}, "dtype"),
        ({"calibration": {"nsamples": 0}}, "calibration.nsamples"),
        ({"calibration": {"source": "/etc/passwd"}}, "calibration.source"),
        ({"calibration": {"texts": ["  "]}}, "calibration"),
        ({"calibration": {"source": "c4", "texts": ["a"]}}, "calibration"),
        ({"calibration": {"calibration_set_id": "cal_" + "0" * 26}}, "calibration.calibration_set_id"),
        ({"metadata": {"k": "v" * 600}}, "metadata"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"overrides": {"(": 0.3}}, "overrides"),
        ({"exclude": ["[unclosed"]}, "exclude"),
        ({"exclude": ["a{4294967296}"]}, "exclude"),
        ({"overrides": {"(" * 1000 + ")" * 1000: 0.3}}, "overrides"),
        ({"device": "cuda:0"}, "device"),
        ({"trust_remote_code": True}, "trust_remote_code"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"evaluation": {"source": "/etc/hosts"}}, "evaluation.source"),
    ],
)
def test_bad_inputs_are_422_problems_naming_the_field(api, patch, field):  # noqa: ANN001
    _, h = api.tenant()
    assert_problem(api.client.post("/v1/pruning-jobs", json=body(**patch), headers=h), 422, field)


def test_method_options_are_checked_at_creation_and_flat_settings_still_accepted(api):  # noqa: ANN001
    _, h = api.tenant()
    r = api.client.post("/v1/pruning-jobs", json=body(method="sparsegpt", percdamp=0.05), headers=h)
    assert r.status_code == 201, r.text
    assert r.json()["request"]["method_options"]["percdamp"] == 0.05
    assert_problem(api.client.post("/v1/pruning-jobs", json=body(percdamp=0.05), headers=h), 422, "percdamp")
    bad = body(pattern="2:4", sparsity=None, method_options={"wanda_alpha_search": True})
    assert_problem(api.client.post("/v1/pruning-jobs", json=bad, headers=h), 422, "method_options.wanda_alpha_search")
    unknown = body(method_options={"blocksize": 64})
    assert_problem(api.client.post("/v1/pruning-jobs", json=unknown, headers=h), 422, "method_options")


def test_missing_target_and_malformed_json(api):  # noqa: ANN001
    _, h = api.tenant()
    p = assert_problem(api.client.post("/v1/pruning-jobs", json=body(sparsity=None), headers=h), 422)
    assert "sparsity" in p["detail"]
    r = api.client.post("/v1/pruning-jobs", content=b"{not json", headers={**h, "content-type": "application/json"})
    assert_problem(r, 422)
    assert_problem(api.client.post("/v1/pruning-jobs", json={}, headers=h), 422, "model")


def test_local_model_paths_must_be_inside_allowed_roots(api, tmp_path):  # noqa: ANN001
    _, h = api.tenant()
    root = api.settings.model_roots[0]
    (root / "m1").mkdir()
    assert api.client.post("/v1/pruning-jobs", json=body(model=str(root / "m1")), headers=h).status_code == 201
    assert_problem(api.client.post("/v1/pruning-jobs", json=body(model=str(root / "missing")), headers=h), 422, "model")
    assert_problem(
        api.client.post("/v1/pruning-jobs", json=body(model=str(root / "m1" / ".." / "..")), headers=h), 422, "model"
    )
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    assert_problem(api.client.post("/v1/pruning-jobs", json=body(model=str(root / "link")), headers=h), 422, "model")


def test_unknown_routes_and_methods_are_problems(api):  # noqa: ANN001
    _, h = api.tenant()
    assert_problem(api.client.get("/v1/nothing", headers=h), 404)
    assert_problem(api.client.delete("/v1/pruning-jobs", headers=h), 405)
    assert_problem(api.client.get("/v1/pruning-jobs/job_nope", headers=h), 404)


# --- cancel -------------------------------------------------------------------------------------


def test_cancel_queued_running_finished(api):  # noqa: ANN001
    tid, h = api.tenant()
    q = api.client.post("/v1/pruning-jobs", json=body(), headers=h).json()
    r = api.client.post(f"/v1/pruning-jobs/{q['id']}/cancel", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["timestamps"]["cancelled_at"]
    assert api.client.post(f"/v1/pruning-jobs/{q['id']}/cancel", headers=h).json()["status"] == "cancelled"

    run = api.client.post("/v1/pruning-jobs", json=body(), headers=h).json()
    with session_scope(api.settings.db_url) as s:
        assert execution.claim(s, tid, run["id"], "w", 60).outcome == "claimed"
    r = api.client.post(f"/v1/pruning-jobs/{run['id']}/cancel", headers=h)
    assert r.json()["status"] == "cancelling" and r.json()["cancel_requested"] is True
    assert api.client.post(f"/v1/pruning-jobs/{run['id']}/cancel", headers=h).json()["status"] == "cancelling"
    with session_scope(api.settings.db_url) as s:  # the worker sees the flag between blocks
        assert execution.report(s, tid, run["id"], 1, 60, progress={"stage": "prune"}) == "cancel"
        assert execution.finish(s, tid, run["id"], 1, outcome="succeeded", artifacts=[]) == "cancelled"
    assert api.client.get(f"/v1/pruning-jobs/{run['id']}/artifacts", headers=h).json()["data"] == []

    done = api.client.post("/v1/pruning-jobs", json=body(), headers=h).json()
    with session_scope(api.settings.db_url) as s:
        execution.claim(s, tid, done["id"], "w", 60)
        execution.finish(s, tid, done["id"], 1, outcome="failed", error=("invalid_model", "bad"))
    p = assert_problem(api.client.post(f"/v1/pruning-jobs/{done['id']}/cancel", headers=h), 409)
    assert p["code"] == "job_finished"
    j = api.client.get(f"/v1/pruning-jobs/{done['id']}", headers=h).json()
    assert j["error"] == {"code": "invalid_model", "message": "bad"} and j["status"] == "failed"


# --- events: list and SSE -----------------------------------------------------------------------


def _sse(text: str) -> list[dict]:
    out = []
    for block in text.split("\n\n"):
        ev = {}
        for line in block.splitlines():
            k, _, v = line.partition(": ")
            if k in ("id", "event", "data"):
                ev[k] = v
        if "data" in ev:
            out.append(ev)
    return out


def test_events_paging_and_sse_with_last_event_id(api):  # noqa: ANN001
    tid, h = api.tenant()
    job = api.client.post("/v1/pruning-jobs", json=body(), headers=h).json()
    jid = job["id"]
    with session_scope(api.settings.db_url) as s:
        execution.claim(s, tid, jid, "w", 60)
    for b in range(3):
        with session_scope(api.settings.db_url) as s:
            execution.report(
                s,
                tid,
                jid,
                1,
                60,
                progress={"stage": "prune", "block": b, "total_blocks": 3},
                event=("progress", {"stage": "prune", "block": b, "total_blocks": 3}),
            )
    page = api.client.get(f"/v1/pruning-jobs/{jid}/events", params={"after": 1, "limit": 2}, headers=h).json()
    assert [e["id"] for e in page["data"]] == [2, 3] and page["has_more"] is True
    assert api.client.get(f"/v1/pruning-jobs/{jid}", headers=h).json()["progress"]["block"] == 2

    def finish_later() -> None:
        time.sleep(0.8)
        with session_scope(api.settings.db_url) as s:
            execution.finish(s, tid, jid, 1, outcome="succeeded", artifacts=[], metrics={"achieved_sparsity": 0.5})

    t = threading.Thread(target=finish_later)
    t.start()
    r = api.client.get(f"/v1/pruning-jobs/{jid}/events/stream", headers={**h, "Last-Event-ID": "3"})
    t.join()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = _sse(r.text)  # the stream closed by itself after the terminal event
    # 1 queued, 2 running, 3-5 progress, 6 metrics, 7 succeeded
    assert [int(e["id"]) for e in evs] == [4, 5, 6, 7]
    assert [e["event"] for e in evs] == ["progress", "progress", "metrics", "status"]
    assert json.loads(evs[-1]["data"])["data"]["status"] == "succeeded"
    # resuming after the end returns nothing and closes at once
    assert _sse(api.client.get(f"/v1/pruning-jobs/{jid}/events/stream", headers={**h, "Last-Event-ID": "7"}).text) == []


# --- calibration sets ---------------------------------------------------------------------------


def test_calibration_upload_list_get_and_limits(api):  # noqa: ANN001
    _, h = api.tenant()
    r = api.client.post(
        "/v1/calibration-sets", files={"file": ("c.jsonl", b'{"text": "a b c"}\n{"text": "d"}\n')}, headers=h
    )
    assert r.status_code == 201, r.text
    cs = r.json()
    assert cs["format"] == "jsonl" and cs["records"] == 2 and len(cs["sha256"]) == 64
    assert api.client.get(f"/v1/calibration-sets/{cs['id']}", headers=h).json() == cs
    assert [c["id"] for c in api.client.get("/v1/calibration-sets", headers=h).json()["data"]] == [cs["id"]]
    job = api.client.post(
        "/v1/pruning-jobs", json=body(calibration={"calibration_set_id": cs["id"], "nsamples": 4}), headers=h
    )
    assert job.status_code == 201 and job.json()["request"]["calibration"]["calibration_set_id"] == cs["id"]

    assert_problem(api.client.post("/v1/calibration-sets", files={"file": ("e.txt", b"")}, headers=h), 422, "file")
    assert_problem(
        api.client.post("/v1/calibration-sets", files={"file": ("e.txt", b" \n\n ")}, headers=h), 422, "file"
    )
    assert_problem(api.client.post("/v1/calibration-sets", files={"file": ("x.csv", b"a,b")}, headers=h), 422, "file")
    assert_problem(
        api.client.post("/v1/calibration-sets", files={"file": ("x.jsonl", b"{oops\n")}, headers=h), 422, "file"
    )
    assert_problem(
        api.client.post("/v1/calibration-sets", files={"file": ("x.jsonl", b'{"t": 1}\n')}, headers=h), 422, "file"
    )
    big = b"word " * (api.settings.calibration_max_bytes // 5 + 10)
    assert_problem(api.client.post("/v1/calibration-sets", files={"file": ("big.txt", big)}, headers=h), 413)
    assert_problem(api.client.post("/v1/calibration-sets", headers=h), 422, "file")


# --- operations ---------------------------------------------------------------------------------


def test_health_ready_metrics(api):  # noqa: ANN001
    _, h = api.tenant()
    api.client.post("/v1/pruning-jobs", json=body(), headers=h)
    assert api.client.get("/healthz").json() == {"status": "ok"}
    r = api.client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    m = api.client.get("/metrics").text
    assert 'secateurs_jobs{status="queued"} 1.0' in m
    assert "secateurs_queue_depth 1.0" in m
    assert 'secateurs_http_request_duration_seconds_count{method="POST",route="/v1/pruning-jobs",status="201"} 1.0' in m


def test_openapi_documents_routes_errors_and_examples(api):  # noqa: ANN001
    spec = api.client.get("/openapi.json").json()
    paths = spec["paths"]
    for p in (
        "/v1/pruning-jobs",
        "/v1/pruning-jobs/{job_id}",
        "/v1/pruning-jobs/{job_id}/cancel",
        "/v1/pruning-jobs/{job_id}/events",
        "/v1/pruning-jobs/{job_id}/events/stream",
        "/v1/pruning-jobs/{job_id}/artifacts",
        "/v1/pruning-jobs/{job_id}/artifacts/{name}",
        "/v1/calibration-sets",
        "/v1/calibration-sets/{set_id}",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert p in paths, p
    post = paths["/v1/pruning-jobs"]["post"]
    for code in ("201", "401", "409", "422"):
        assert code in post["responses"]
    assert "application/problem+json" in post["responses"]["422"]["content"]
    assert post["responses"]["422"]["content"]["application/problem+json"]["example"]["errors"]
    assert post["requestBody"]["content"]["application/json"]["examples"]
    assert "Problem" in spec["components"]["schemas"]
    for path, ops in paths.items():
        for op in ops.values():
            if path.startswith("/v1/"):
                assert "401" in op["responses"], (path, op.get("summary"))


def test_oversized_upload_is_refused_before_parsing(api):  # noqa: ANN001
    _, h = api.tenant()
    big = b"x" * (api.settings.calibration_max_bytes + 200 * 1024)
    r = api.client.post("/v1/calibration-sets", files={"file": ("big.txt", big)}, headers=h)
    p = assert_problem(r, 413)
    assert p["code"] == "too_large"


def test_local_artifacts_stream_with_range(api, tmp_path):  # noqa: ANN001
    import hashlib

    from core.db.models import Artifact

    tid, h = api.tenant()
    jid = api.client.post("/v1/pruning-jobs", json=body(), headers=h).json()["id"]
    data = bytes(range(256)) * 100
    src = tmp_path / "w.bin"
    src.write_bytes(data)
    storage = api.client.app.state.storage
    key = f"tenants/{tid}/jobs/{jid}/attempt-1/sub/w.bin"
    info = storage.put_file(key, src)
    with session_scope(api.settings.db_url) as s:
        execution.claim(s, tid, jid, "w", 60)
        art = Artifact(
            tenant_id=tid,
            job_id=jid,
            attempt=1,
            name="sub/w.bin",
            kind="model",
            size=info.size,
            sha256=info.sha256,
            storage_key=key,
        )
        assert (
            execution.finish(s, tid, jid, 1, outcome="succeeded", artifacts=[art], metrics={"achieved_sparsity": 0.5})
            == "succeeded"
        )
    arts = api.client.get(f"/v1/pruning-jobs/{jid}/artifacts", headers=h).json()["data"]
    assert arts == [
        {
            "name": "sub/w.bin",
            "kind": "model",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "attempt": 1,
            "url": f"/v1/pruning-jobs/{jid}/artifacts/sub/w.bin",
        }
    ]
    full = api.client.get(arts[0]["url"], headers=h)
    assert full.status_code == 200 and full.content == data and full.headers["accept-ranges"] == "bytes"
    part = api.client.get(arts[0]["url"], headers={**h, "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    tail = api.client.get(arts[0]["url"], headers={**h, "Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    assert api.client.get(arts[0]["url"], headers={**h, "Range": f"bytes={len(data) + 5}-"}).status_code == 416
    assert_problem(api.client.get(f"/v1/pruning-jobs/{jid}/artifacts/../../etc/passwd", headers=h), 404)
    job = api.client.get(f"/v1/pruning-jobs/{jid}", headers=h).json()
    assert job["status"] == "succeeded" and job["metrics"] == {"achieved_sparsity": 0.5}


def test_cli_creates_tenant_and_key(service_settings, monkeypatch):  # noqa: ANN001
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from api.app import create_app
    from cli.app import app as cli
    from core.settings import get_settings

    s = service_settings
    monkeypatch.setenv("SECATEURS_DATABASE_URL", s.db_url)
    monkeypatch.setenv("SECATEURS_SECRET_KEY", "test-secret")
    monkeypatch.setenv("SECATEURS_DATA_DIR", str(s.data_dir))
    get_settings.cache_clear()
    try:
        r = CliRunner().invoke(cli, ["service", "create-key", "team-a", "--create-tenant", "--name", "ci"])
        assert r.exit_code == 0, r.output
        key = r.output.strip().splitlines()[-1]
        assert key.startswith("sct_")
        bad = CliRunner().invoke(cli, ["service", "create-key", "no-such-tenant"])
        assert bad.exit_code == 1
    finally:
        get_settings.cache_clear()
    with TestClient(create_app(s)) as c:
        assert c.get("/v1/pruning-jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_concurrent_requests_with_one_idempotency_key_create_one_job(api):  # noqa: ANN001
    from concurrent.futures import ThreadPoolExecutor

    _, h = api.tenant()
    hk = {**h, "Idempotency-Key": "race-1"}
    with ThreadPoolExecutor(6) as ex:
        rs = list(ex.map(lambda _: api.client.post("/v1/pruning-jobs", json=body(), headers=hk), range(6)))
    codes = sorted(r.status_code for r in rs)
    assert set(codes) <= {201, 409} and 201 in codes, [r.text for r in rs]
    ids = {r.json()["id"] for r in rs if r.status_code == 201}
    assert len(ids) == 1
    assert len(api.client.get("/v1/pruning-jobs", headers=h).json()["data"]) == 1


@pytest.mark.parametrize(
    "extra",
    [
        {"schedule": {"kind": "owl"}},
        {"sparsity": None, "structure": {"mlp_channels": 0.25, "heads": 0.25}},
        {"method": "sparsegpt", "sparsity": None, "pattern": "2:4", "true_sequential": True},
        {"exclude": ["lm_head", r"layers\.0\."], "overrides": {r"mlp\.down_proj": 0.3}},
        {
            "calibration": {"source": "wikitext2", "nsamples": 8, "seqlen": 64},
            "evaluation": {"source": "wikitext2", "max_windows": 4},
        },
    ],
    ids=["owl", "structure", "sparsegpt-2:4", "exclude-overrides", "named-sets"],
)
def test_engine_options_pass_through_to_the_stored_config(api, extra):  # noqa: ANN001
    _, h = api.tenant()
    r = api.client.post("/v1/pruning-jobs", json=body(**extra), headers=h)
    assert r.status_code == 201, r.text
    req = r.json()["request"]
    for k, v in extra.items():
        if isinstance(v, dict) and k in req and isinstance(req[k], dict):
            assert {kk: req[k][kk] for kk in v} == v
        else:
            assert req[k] == v


def test_an_unreachable_database_answers_503_with_retry_after(tmp_path):  # noqa: ANN001
    """Postgres down (here: nothing listens on its port): the routes that need it say 503 with Retry-After, not 500."""
    import socket

    from fastapi.testclient import TestClient

    from api.app import create_app
    from core.settings import Settings

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(
        _env_file=None,
        env="test",
        data_dir=tmp_path / "var",
        database_url=f"postgresql+psycopg://postgres@127.0.0.1:{port}/test",
        broker_url=None,
        result_backend=None,
        queue="secateurs-test-down",
        allowed_model_roots=[tmp_path],
        secret_key="test-secret",
    )
    h = {"Authorization": "Bearer sct_" + "0" * 16 + "_" + "a" * 43}  # well formed: its lookup needs the database
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        for r in (
            c.get("/v1/pruning-jobs", headers=h),
            c.post("/v1/pruning-jobs", json=body(), headers=h),
            c.get("/v1/calibration-sets", headers=h),
        ):
            p = assert_problem(r, 503)
            assert p["code"] == "database_unavailable" and int(r.headers["retry-after"]) > 0
            assert "psycopg" not in r.text and str(port) not in r.text  # no internals
        ready = c.get("/readyz")
        assert (
            ready.status_code == 503 and "database" in ready.json()["detail"] and int(ready.headers["retry-after"]) > 0
        )
        assert c.get("/healthz").status_code == 200
        assert "503" in c.get("/openapi.json").json()["paths"]["/v1/pruning-jobs"]["post"]["responses"]


def test_a_500_keeps_the_keep_alive_connection_usable(service_settings):  # noqa: ANN001
    """Over a real uvicorn server: after an unexpected error the client's connection still serves its next
    request, and the 500 carries no internals."""
    import socket
    import threading

    import uvicorn

    from api.app import create_app

    app = create_app(service_settings)

    @app.get("/boom", include_in_schema=False)
    def boom() -> None:
        raise RuntimeError("secret internals")

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            replies = []
            for path in ("/boom", "/healthz"):
                conn.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                data = b""
                while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
                    chunk = conn.recv(65536)
                    assert chunk, f"the server closed the connection after {replies}"
                    data += chunk
                replies.append(data)
        assert replies[0].startswith(b"HTTP/1.1 500") and b"application/problem+json" in replies[0]
        assert b"secret internals" not in replies[0] and b"internal_error" in replies[0]
        assert replies[1].startswith(b"HTTP/1.1 200")
    finally:
        server.should_exit = True
        thread.join(10)


def _content_length(response: bytes) -> int:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    return next((int(line.split(":", 1)[1]) for line in head.split("\r\n") if line.startswith("content-length:")), 0)
