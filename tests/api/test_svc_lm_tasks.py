"""lm-eval tasks in a job body: what the server can tell at creation is a 422 naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core.db.engine import session_scope
from core.db.models import Job
from core.pruning import tasks
from tests.api.test_svc_api import assert_problem, body
from tests.conftest import require
from tests.service_fixtures import Api


@pytest.fixture
def task_api(service_settings, tmp_path: Path) -> Iterator[Api]:  # noqa: ANN001
    from fastapi.testclient import TestClient

    from api.app import create_app

    require(tasks.installed(), "lm-eval is not installed (pip install 'secateurs[lmeval]')")
    roots = tmp_path / "task-roots"
    (roots / "mine").mkdir(parents=True)
    (roots / "mine" / "mine.yaml").write_text("task: my_local_task\ndataset_path: json\noutput_type: loglikelihood\n")
    settings = service_settings.model_copy(update={"allowed_task_roots": [roots]})
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield Api(settings, c)


def post(api: Api, evaluation: dict) -> object:
    _, h = api.tenant()
    return api.client.post("/v1/pruning-jobs", json=body(evaluation=evaluation), headers=h)


def test_the_shipped_task_and_tasks_under_the_allowed_roots_are_taken(task_api: Api) -> None:
    roots = task_api.settings.task_roots[0]
    r = post(task_api, {"tasks": ["tinystories_continuation", "my_local_task"], "task_paths": [str(roots / "mine")]})
    assert r.status_code == 201, r.text  # type: ignore[attr-defined]
    job = r.json()  # type: ignore[attr-defined]
    assert job["request"]["evaluation"]["tasks"] == ["tinystories_continuation", "my_local_task"]
    with session_scope(task_api.settings.db_url) as s:  # what the worker will run
        ev = s.get(Job, job["id"]).config["evaluation"]
    assert ev["tasks"] == ["tinystories_continuation", "my_local_task"] and ev["source"] is None
    assert ev["task_paths"] == [str((roots / "mine").resolve())]


def test_an_unknown_task_is_422_naming_evaluation_tasks(task_api: Api) -> None:
    p = assert_problem(post(task_api, {"tasks": ["no_such_task_xyz"]}), 422, "evaluation.tasks")  # type: ignore[arg-type]
    assert "no_such_task_xyz" in p["detail"]


def test_a_task_path_outside_the_allowed_roots_is_422(task_api: Api, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "t.yaml").write_text("task: t\n")
    for path in (str(outside), str(task_api.settings.task_roots[0] / ".." / "elsewhere"), "relative/dir"):
        r = post(task_api, {"tasks": ["t"], "task_paths": [path]})
        assert_problem(r, 422, "evaluation.task_paths.0")  # type: ignore[arg-type]


def test_a_yaml_that_does_not_load_is_422(task_api: Api) -> None:
    roots = task_api.settings.task_roots[0]
    (roots / "bad").mkdir()
    (roots / "bad" / "bad.yaml").write_text("task: [unclosed\n")
    r = post(task_api, {"tasks": ["tinystories_continuation"], "task_paths": [str(roots / "bad")]})
    p = assert_problem(r, 422, "evaluation.task_paths.0")  # type: ignore[arg-type]
    assert "bad.yaml" in p["detail"]
