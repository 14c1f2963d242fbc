"""/v1/webhook-endpoints in process, on SQLite (+ SQLite broker) and Postgres (+ Redis): the endpoints' life,
secrets shown once and stored encrypted, the URL and address rules (422 naming `url`), the outbox rows a job's
terminal transition writes in its own transaction, and the test ping's publication."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from core.db.engine import session_scope
from core.db.models import WebhookDelivery, WebhookEndpoint, utcnow
from core.jobs import execution
from core.jobs.celery_queue import WEBHOOK_TASK_NAME
from core.jobs.state import JobStatus, transition
from tests.api.test_svc_api import assert_problem, body
from tests.conftest import require
from tests.fixtures.webhooks import hosts_entry, hosts_writable

PUBLIC = "https://93.184.216.34/hooks"  # a public address literal: nothing is resolved, nothing is sent


@pytest.fixture
def private_api(service_settings):  # noqa: ANN001, ANN201
    """The API with private addresses allowed (tests reach a loopback receiver)."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.service_fixtures import Api

    s = service_settings.model_copy(update={"webhook_allow_private_addresses": True})
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        yield Api(s, c)


def create(api, headers, **kw):  # noqa: ANN001, ANN003, ANN201
    r = api.client.post("/v1/webhook-endpoints", json={"url": PUBLIC, **kw}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def deliveries(api, tid: str):  # noqa: ANN001, ANN201
    with session_scope(api.settings.db_url) as s:
        return list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.tenant_id == tid)))


def webhook_messages(api) -> list[list]:  # noqa: ANN001
    """Deliver-task messages in the webhook queue (taken off it)."""
    out = []
    with (
        api.client.app.state.queue.app.connection_for_write() as conn,
        conn.SimpleQueue(api.settings.webhooks_queue) as q,
    ):
        while True:
            try:
                m = q.get(timeout=1)
            except q.Empty:
                return out
            m.ack()
            assert m.headers["task"] == WEBHOOK_TASK_NAME
            out.append(m.payload[0])


def test_endpoint_life_and_the_secret_shown_once(api):  # noqa: ANN001
    tid, h = api.tenant()
    created = create(api, h, description="team search", event_types=["job.failed"])
    assert created["secret"].startswith("whsec_") and len(created["secret"]) > 40
    assert created["event_types"] == ["job.failed"] and created["description"] == "team search"
    eid = created["id"]
    got = api.client.get(f"/v1/webhook-endpoints/{eid}", headers=h)
    assert got.status_code == 200 and "secret" not in got.json()
    assert {k: v for k, v in created.items() if k != "secret"} == got.json()
    with session_scope(api.settings.db_url) as s:  # stored encrypted, never in clear
        ep = s.get(WebhookEndpoint, eid)
        assert created["secret"] not in ep.secret_encrypted and created["secret"][6:] not in ep.secret_encrypted
    listed = api.client.get("/v1/webhook-endpoints", headers=h).json()
    assert [e["id"] for e in listed["data"]] == [eid] and "secret" not in listed["data"][0]
    assert create(api, h)["event_types"] == ["job.succeeded", "job.failed", "job.cancelled"]  # the default
    assert api.client.delete(f"/v1/webhook-endpoints/{eid}", headers=h).status_code == 204
    assert_problem(api.client.get(f"/v1/webhook-endpoints/{eid}", headers=h), 404)
    assert_problem(api.client.delete(f"/v1/webhook-endpoints/{eid}", headers=h), 404)


def test_endpoints_are_paginated_and_tenant_scoped(api):  # noqa: ANN001
    _, ha = api.tenant()
    _, hb = api.tenant()
    ids = [create(api, ha)["id"] for _ in range(3)]
    page = api.client.get("/v1/webhook-endpoints", params={"limit": 2}, headers=ha).json()
    assert [e["id"] for e in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    rest = api.client.get("/v1/webhook-endpoints", params={"limit": 2, "after": page["last_id"]}, headers=ha).json()
    assert [e["id"] for e in rest["data"]] == [ids[0]] and rest["has_more"] is False
    assert api.client.get("/v1/webhook-endpoints", headers=hb).json()["data"] == []
    for method, path in (
        ("get", f"/v1/webhook-endpoints/{ids[0]}"),
        ("delete", f"/v1/webhook-endpoints/{ids[0]}"),
        ("post", f"/v1/webhook-endpoints/{ids[0]}/rotate-secret"),
        ("post", f"/v1/webhook-endpoints/{ids[0]}/test"),
        ("get", f"/v1/webhook-endpoints/{ids[0]}/deliveries"),
    ):
        assert_problem(api.client.request(method, path, headers=hb), 404)
    assert api.client.get(f"/v1/webhook-endpoints/{ids[0]}", headers=ha).status_code == 200


def test_endpoints_per_tenant_are_limited(api):  # noqa: ANN001
    api.settings.webhook_max_endpoints_per_tenant = 2
    _, h = api.tenant()
    create(api, h)
    create(api, h)
    p = assert_problem(api.client.post("/v1/webhook-endpoints", json={"url": PUBLIC}, headers=h), 409)
    assert p["code"] == "too_many_endpoints"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"url": "ftp://93.184.216.34/x"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"url": "https://user:pw@93.184.216.34/"}, "url"),
        ({"url": "https://93.184.216.34/", "event_types": ["job.running"]}, "event_types"),
        ({"url": "https://93.184.216.34/", "event_types": []}, "event_types"),
        ({"url": "https://93.184.216.34/", "event_types": ["job.failed", "job.failed"]}, "event_types"),
        ({"url": "https://93.184.216.34/", "description": "x\x00y"}, "description"),
        ({"url": "https://93.184.216.34/", "secret": "whsec_mine"}, "secret"),
        ({}, "url"),
    ],
)
def test_bad_bodies_are_422_naming_the_field(api, payload, field):  # noqa: ANN001
    _, h = api.tenant()
    assert_problem(api.client.post("/v1/webhook-endpoints", json=payload, headers=h), 422, field)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://localhost/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://10.0.0.1/", "private"),
        ("http://192.168.1.10/", "private"),
        ("http://172.16.5.4/", "private"),
        ("http://[fc00::1]/", "private"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://[::ffff:10.0.0.1]/", "private"),
        ("http://2130706433/", "loopback"),  # 127.0.0.1 as one number: the resolved address is what counts
    ],
)
def test_private_addresses_are_refused(api, url, kind):  # noqa: ANN001
    _, h = api.tenant()
    p = assert_problem(api.client.post("/v1/webhook-endpoints", json={"url": url}, headers=h), 422, "url")
    assert f"{kind} address" in p["detail"], p
    assert p["detail"].startswith("url: ")


def test_a_name_resolving_to_a_private_address_is_refused(api):  # noqa: ANN001
    require(hosts_writable(), "/etc/hosts is not writable (needs root)")
    _, h = api.tenant()
    with hosts_entry("10.20.30.40") as name:
        r = api.client.post("/v1/webhook-endpoints", json={"url": f"https://{name}/hook"}, headers=h)
        p = assert_problem(r, 422, "url")
        assert f"{name} resolves to 10.20.30.40, which is a private address" in p["detail"], p
    p = assert_problem(
        api.client.post("/v1/webhook-endpoints", json={"url": f"https://{name}/hook"}, headers=h), 422, "url"
    )
    assert "does not resolve" in p["detail"]


def test_private_addresses_when_allowed_and_https_in_production(private_api, service_settings):  # noqa: ANN001
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.service_fixtures import Api

    _, h = private_api.tenant()
    assert create(private_api, h, url="http://127.0.0.1:9/hook")["url"] == "http://127.0.0.1:9/hook"
    prod = service_settings.model_copy(update={"env": "production"})
    with TestClient(create_app(prod), raise_server_exceptions=False) as c:
        papi = Api(prod, c)
        _, ph = papi.tenant()
        p = assert_problem(c.post("/v1/webhook-endpoints", json={"url": "http://93.184.216.34/"}, headers=ph), 422)
        assert "https" in p["detail"]
        assert c.post("/v1/webhook-endpoints", json={"url": PUBLIC}, headers=ph).status_code == 201


def test_rotation_shows_the_new_secret_once_and_keeps_the_old_for_the_grace_period(api):  # noqa: ANN001
    _, h = api.tenant()
    ep = create(api, h)
    before = utcnow()
    r = api.client.post(f"/v1/webhook-endpoints/{ep['id']}/rotate-secret", headers=h)
    assert r.status_code == 200, r.text
    rot = r.json()
    assert rot["secret"].startswith("whsec_") and rot["secret"] != ep["secret"] and rot["endpoint_id"] == ep["id"]
    from datetime import datetime

    expires = datetime.fromisoformat(rot["previous_secret_expires_at"])
    grace = timedelta(seconds=api.settings.webhook_secret_grace_seconds)
    assert before + grace - timedelta(seconds=5) < expires < utcnow() + grace + timedelta(seconds=5)
    got = api.client.get(f"/v1/webhook-endpoints/{ep['id']}", headers=h).json()
    assert got["rotated_at"] and got["previous_secret_expires_at"] and "secret" not in got


def test_a_terminal_transition_writes_its_deliveries_in_its_own_transaction(api):  # noqa: ANN001
    tid, h = api.tenant()
    every = create(api, h)
    cancels = create(api, h, event_types=["job.cancelled"])
    create(api, h, event_types=["job.succeeded"])
    _, other = api.tenant()
    create(api, other)  # another tenant's endpoint hears nothing of this tenant's jobs
    job = api.client.post("/v1/pruning-jobs", json=body(), headers=h).json()
    webhook_messages(api)
    assert deliveries(api, tid) == []  # queued is no event
    # a transition that rolls back leaves no delivery behind
    with pytest.raises(RuntimeError), session_scope(api.settings.db_url) as s:
        from core.db.repositories import JobRepository

        transition(s, JobRepository(s, tid).get(job["id"], lock=True), JobStatus.cancelled)
        s.flush()
        raise RuntimeError("crash before the commit")
    assert deliveries(api, tid) == []
    r = api.client.post(f"/v1/pruning-jobs/{job['id']}/cancel", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    ds = deliveries(api, tid)
    assert sorted(d.endpoint_id for d in ds) == sorted([every["id"], cancels["id"]])
    assert {d.event_type for d in ds} == {"job.cancelled"} and {d.job_id for d in ds} == {job["id"]}
    assert all(d.status == "pending" and d.attempts == 0 for d in ds)
    import json

    sent = json.loads(ds[0].payload)
    assert sent["type"] == "job.cancelled" and sent["timestamp"].endswith("Z")
    now = api.client.get(f"/v1/pruning-jobs/{job['id']}", headers=h).json()
    assert sent["data"] == now  # the job as the API shows it
    assert sorted(m[1] for m in webhook_messages(api)) == sorted(d.id for d in ds)  # published after the commit
    log = api.client.get(f"/v1/webhook-endpoints/{every['id']}/deliveries", headers=h).json()["data"]
    assert [(d["event_type"], d["job_id"], d["webhook_id"], d["status"]) for d in log] == [
        ("job.cancelled", job["id"], ds[[d.endpoint_id for d in ds].index(every["id"])].id, "pending")
    ]


def test_worker_side_terminal_transitions_write_deliveries(api):  # noqa: ANN001
    tid, h = api.tenant()
    create(api, h)
    ok, bad = (api.client.post("/v1/pruning-jobs", json=body(), headers=h).json()["id"] for _ in range(2))
    with session_scope(api.settings.db_url) as s:
        execution.claim(s, tid, ok, "w", 60)
        execution.claim(s, tid, bad, "w", 60)
    with session_scope(api.settings.db_url) as s:
        execution.finish(s, tid, ok, 1, outcome="succeeded", artifacts=[], metrics={"achieved_sparsity": 0.5})
        execution.finish(s, tid, bad, 1, outcome="failed", error=("out_of_memory", "CUDA out of memory"))
    import json

    by_job = {d.job_id: json.loads(d.payload) for d in deliveries(api, tid)}
    assert by_job[ok]["type"] == "job.succeeded" and by_job[ok]["data"]["metrics"] == {"achieved_sparsity": 0.5}
    assert by_job[bad]["type"] == "job.failed" and by_job[bad]["data"]["error"]["code"] == "out_of_memory"


def test_the_test_ping_is_queued_and_logged(api):  # noqa: ANN001
    tid, h = api.tenant()
    ep = create(api, h)
    webhook_messages(api)
    r = api.client.post(f"/v1/webhook-endpoints/{ep['id']}/test", headers=h)
    assert r.status_code == 202, r.text
    d = r.json()
    assert d["event_type"] == "webhook.test" and d["status"] == "pending" and d["attempts"] == 0
    assert d["webhook_id"] == d["id"] and d["id"].startswith("msg_") and d["job_id"] is None
    assert webhook_messages(api) == [[tid, d["id"]]]
    log = api.client.get(f"/v1/webhook-endpoints/{ep['id']}/deliveries", headers=h).json()
    assert [x["id"] for x in log["data"]] == [d["id"]] and log["has_more"] is False
    for _ in range(2):
        api.client.post(f"/v1/webhook-endpoints/{ep['id']}/test", headers=h)
    page = api.client.get(f"/v1/webhook-endpoints/{ep['id']}/deliveries", params={"limit": 2}, headers=h).json()
    assert len(page["data"]) == 2 and page["has_more"] is True
    assert api.client.delete(f"/v1/webhook-endpoints/{ep['id']}", headers=h).status_code == 204
    assert deliveries(api, tid) == []  # the log goes with the endpoint


def test_progress_events_are_opt_in_and_coalesced(api):  # noqa: ANN001
    import json

    tid, h = api.tenant()
    quiet = create(api, h)  # the default: terminal events only
    loud = create(api, h, event_types=["job.progress", "job.succeeded"])
    jid = api.client.post("/v1/pruning-jobs", json=body(), headers=h).json()["id"]
    with session_scope(api.settings.db_url) as s:
        execution.claim(s, tid, jid, "w", 60)
    webhook_messages(api)

    from core.db.engine import unit_of_work

    def report(block: int) -> None:  # as a worker process would: its outbox publishes after the commit
        with unit_of_work(api.client.app.state.sessions) as s:
            execution.report(s, tid, jid, 1, 60, progress={"stage": "prune", "block": block, "total_blocks": 8})

    report(0)
    (first,) = deliveries(api, tid)
    assert (first.endpoint_id, first.event_type, first.status) == (loud["id"], "job.progress", "pending")
    assert json.loads(first.payload)["data"]["progress"]["block"] == 0
    assert webhook_messages(api) == [[tid, first.id]]  # the first one is due at once
    report(1)
    report(2)  # coalesced into the waiting delivery: one webhook-id, the newest progress
    (same,) = deliveries(api, tid)
    assert same.id == first.id and json.loads(same.payload)["data"]["progress"]["block"] == 2
    with session_scope(api.settings.db_url) as s:  # it was sent; the next report waits for the interval
        s.get(WebhookDelivery, first.id).status = "succeeded"
    report(3)
    later = [d for d in deliveries(api, tid) if d.id != first.id]
    gap = (later[0].next_attempt_at - first.created_at).total_seconds()  # the interval: 10 s by default
    assert len(later) == 1 and gap == pytest.approx(api.settings.webhook_progress_interval_seconds, abs=0.01)
    assert later[0].next_attempt_at > utcnow()
    assert webhook_messages(api) == []  # not due: the sweep publishes it when it is
    with session_scope(api.settings.db_url) as s:
        execution.finish(s, tid, jid, 1, outcome="succeeded", artifacts=[], metrics={})
    final = {(d.endpoint_id, d.event_type, d.status) for d in deliveries(api, tid)}
    assert final == {
        (loud["id"], "job.progress", "succeeded"),  # sent before the end
        (loud["id"], "job.succeeded", "pending"),  # the unsent progress was dropped
        (quiet["id"], "job.succeeded", "pending"),
    }
