"""Recovery and gradual pruning in a job body: the engine's fields, an uploaded set by id, and 422s naming the
field for what the server can tell at creation."""

from __future__ import annotations

from core.db.engine import session_scope
from core.db.models import Job
from tests.api.test_svc_api import assert_problem, body
from tests.service_fixtures import Api


def post(api: Api, h: dict, **kw: object) -> object:
    return api.client.post("/v1/pruning-jobs", json=body(**kw), headers=h)


def test_recovery_and_gradual_blocks_reach_the_config_with_an_uploaded_set(api: Api) -> None:
    _, h = api.tenant()
    cs = api.client.post("/v1/calibration-sets", files={"file": ("r.txt", b"some text " * 50)}, headers=h).json()
    rec = {"calibration_set_id": cs["id"], "steps": 20, "lr": 3e-4, "mode": "lora", "lora": {"r": 8}, "distill": True}
    r = post(api, h, recovery=rec, gradual={"stages": 3, "schedule": "linear"})
    assert r.status_code == 201, r.text  # type: ignore[attr-defined]
    job = r.json()  # type: ignore[attr-defined]
    with session_scope(api.settings.db_url) as s:  # what the worker will run
        cfg = s.get(Job, job["id"]).config
    assert cfg["recovery"]["source"] == f"uploaded:{cs['id']}"
    assert cfg["recovery"]["steps"] == 20 and cfg["recovery"]["lora"]["r"] == 8 and cfg["recovery"]["distill"]
    assert cfg["gradual"] == {"stages": 3, "schedule": "linear"}
    # none given: the calibration's text
    r = post(api, h, recovery={"steps": 5})
    assert r.status_code == 201, r.text  # type: ignore[attr-defined]
    with session_scope(api.settings.db_url) as s:
        assert s.get(Job, r.json()["id"]).config["recovery"]["source"] is None  # type: ignore[attr-defined]


def test_bad_recovery_inputs_are_422_naming_the_field(api: Api) -> None:
    _, h = api.tenant()
    assert_problem(post(api, h, recovery={"lr": 0}), 422, "recovery.lr")
    assert_problem(post(api, h, recovery={"lr": -1}), 422, "recovery.lr")
    assert_problem(post(api, h, recovery={"steps": 0}), 422, "recovery.steps")
    assert_problem(post(api, h, recovery={"source": "/etc/passwd"}), 422, "recovery.source")
    unknown = "cal_" + "0" * 26
    assert_problem(post(api, h, recovery={"calibration_set_id": unknown}), 422, "recovery.calibration_set_id")
    r = post(api, h, sparsity=None, pattern="2:4", gradual={"stages": 3})
    p = assert_problem(r, 422, "gradual")
    assert "N:M" in p["detail"]
