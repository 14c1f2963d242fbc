"""New jobs reach the broker only after their row is committed, once, and are marked enqueued."""

from __future__ import annotations

from core.db.engine import session_scope
from core.db.repositories import JobRepository

BODY = {
    "model": "org/tiny-model",
    "sparsity": 0.5,
    "calibration": {"texts": ["hello world"], "nsamples": 4, "seqlen": 32},
}


class FailingQueue:
    def publish(self, tenant_id: str, job_id: str) -> None:
        raise ConnectionError("broker down")

    def check(self) -> None:
        raise ConnectionError("broker down")


def _messages(api) -> int:  # noqa: ANN001
    n = 0
    with api.client.app.state.queue.app.connection_for_write() as conn, conn.SimpleQueue(api.settings.queue) as q:
        while True:
            try:
                q.get(timeout=1).ack()
            except q.Empty:
                return n
            n += 1


def test_a_created_job_is_published_once_and_marked(api):  # noqa: ANN001
    tid, h = api.tenant()
    hk = {**h, "Idempotency-Key": "pub-1"}
    job = api.client.post("/v1/pruning-jobs", json=BODY, headers=hk).json()
    assert api.client.post("/v1/pruning-jobs", json=BODY, headers=hk).headers["idempotent-replayed"] == "true"
    assert api.client.post("/v1/pruning-jobs", json={**BODY, "sparsity": 1.5}, headers=h).status_code == 422
    assert _messages(api) == 1  # the replay and the rejected request published nothing
    with session_scope(api.settings.db_url) as s:
        assert JobRepository(s, tid).get(job["id"]).enqueued_at is not None


def test_a_failed_publish_still_creates_the_job_for_the_sweep(service_settings):  # noqa: ANN001
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.service_fixtures import Api

    with TestClient(create_app(service_settings, queue=FailingQueue())) as c:
        api = Api(service_settings, c)
        tid, h = api.tenant()
        r = c.post("/v1/pruning-jobs", json=BODY, headers=h)
        assert r.status_code == 201, r.text
        with session_scope(service_settings.db_url) as s:
            job = JobRepository(s, tid).get(r.json()["id"])
            assert job.status == "queued" and job.enqueued_at is None
        assert c.get("/readyz").status_code == 503
