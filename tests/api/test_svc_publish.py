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
    r = api.client.post("/v1/pruning-jobs", json=BODY, headers=hk)
    job = r.json()
    assert r.headers["secateurs-enqueue"] == "published"
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


def test_a_broker_that_is_down_defers_the_job_within_the_enqueue_timeout(service_settings):  # noqa: ANN001
    """A real Redis client against a port nobody listens on: the job is created, the response says it is
    deferred, and it came back within the enqueue timeout instead of blocking on broker retries."""
    import socket
    import time

    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.service_fixtures import Api

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = service_settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{port}/0", "result_backend": None, "enqueue_timeout_seconds": 1.0}
    )
    with TestClient(create_app(s)) as c:
        api = Api(s, c)
        tid, h = api.tenant()
        t0 = time.monotonic()
        r = c.post("/v1/pruning-jobs", json=BODY, headers=h)
        took = time.monotonic() - t0
        assert r.status_code == 201, r.text
        assert r.headers["secateurs-enqueue"] == "deferred"
        assert took < s.enqueue_timeout_seconds + 1.0, took
        with session_scope(s.db_url) as sess:
            job = JobRepository(sess, tid).get(r.json()["id"])
            assert job.status == "queued" and job.enqueued_at is None  # the sweep publishes it
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"]
