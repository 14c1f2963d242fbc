"""Deliveries against a real receiver on loopback, on SQLite and Postgres: signatures, the atomic claim, retries
and their schedule, the 1 KiB answer prefix, timeouts, rotation's two signatures, address rules at delivery
time (DNS rebinding included) and the sweep's publication of due deliveries on the real broker."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest

from core.db.engine import session_scope
from core.db.models import WebhookDelivery, WebhookEndpoint, utcnow
from core.jobs.celery_queue import celery_client
from core.settings import Settings
from core.webhooks import delivery
from core.webhooks.celery_queue import CeleryDeliveryQueue
from core.webhooks.schemas import WebhookEndpointCreate
from core.webhooks.service import WebhookService
from tests.conftest import require
from tests.fixtures.webhooks import Receiver, hosts_entry, hosts_writable


@pytest.fixture
def wh(service_settings):  # noqa: ANN001, ANN201
    from core.auth import create_tenant

    s = service_settings.model_copy(
        update={
            "webhook_allow_private_addresses": True,
            "webhook_backoff_base_seconds": 10.0,
            "webhook_timeout_seconds": 1.0,
            "webhook_connect_timeout_seconds": 1.0,
            "webhook_max_attempts": 3,
        }
    )
    s.ensure_dirs()
    with session_scope(s.db_url) as sess:
        tid = create_tenant(sess, "wh").id
    return s, tid


def endpoint(s: Settings, tid: str, url: str) -> tuple[str, str]:
    with session_scope(s.db_url) as sess:
        ep, secret = WebhookService(sess, tid, s).create(WebhookEndpointCreate(url=url))
        return ep.id, secret


def ping(s: Settings, tid: str, eid: str) -> str:
    with session_scope(s.db_url) as sess:
        return WebhookService(sess, tid, s).ping(eid).id


def row(s: Settings, did: str) -> WebhookDelivery:
    with session_scope(s.db_url) as sess:
        return sess.get(WebhookDelivery, did)


def update(s: Settings, did: str, **values) -> None:  # noqa: ANN003
    with session_scope(s.db_url) as sess:
        d = sess.get(WebhookDelivery, did)
        for k, v in values.items():
            setattr(d, k, v)


def test_a_delivery_is_signed_sent_once_and_never_again(wh):  # noqa: ANN001
    s, tid = wh
    with Receiver() as rx:
        eid, secret = endpoint(s, tid, rx.url())
        did = ping(s, tid, eid)
        assert delivery.deliver(s, tid, did) == "succeeded"
        (got,) = rx.received()
        assert got.path == "/hook" and got.webhook_id == did
        assert got.headers["content-type"] == "application/json" and len(got.signatures) == 1
        sent = got.verify(secret)  # standardwebhooks.Webhook(secret).verify
        assert sent["type"] == "webhook.test" and sent["data"]["endpoint_id"] == eid
        assert got.body == row(s, did).payload.encode()
        assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 5
        d = row(s, did)
        assert (d.status, d.attempts, d.last_status_code, d.response_body, d.last_error) == (
            "succeeded",
            1,
            200,
            "ok",
            None,
        )
        assert d.finished_at is not None and d.next_attempt_at is None
        update(s, did, next_attempt_at=utcnow() - timedelta(seconds=1))
        assert delivery.deliver(s, tid, did) == "skipped"  # a duplicate task: a success is never sent again
        assert delivery.deliver(s, tid, "msg_nope") == "skipped"
        assert len(rx.received()) == 1


def test_failures_are_retried_later_with_the_same_webhook_id(wh):  # noqa: ANN001
    s, tid = wh

    def respond(_req, seen):  # noqa: ANN001, ANN202
        return (500, b"E" * 5000, 0) if seen < 2 else (200, "fine \u00e9".encode(), 0)

    with Receiver(respond) as rx:
        eid, secret = endpoint(s, tid, rx.url())
        did = ping(s, tid, eid)
        t0 = utcnow()
        assert delivery.deliver(s, tid, did) == "pending"
        d = row(s, did)
        assert (d.attempts, d.last_status_code, d.last_error) == (1, 500, "HTTP 500")
        assert d.response_body == "E" * 1024  # the first KiB only
        wait = (d.next_attempt_at - t0).total_seconds()
        assert 10 * 0.8 - 1 <= wait <= 10 * 1.2 + 1, wait
        assert delivery.deliver(s, tid, did) == "skipped"  # not due yet (no ETA task: the sweep publishes it)
        update(s, did, next_attempt_at=utcnow())
        assert delivery.deliver(s, tid, did) == "pending"
        d = row(s, did)
        wait2 = (d.next_attempt_at - d.last_attempt_at).total_seconds()
        assert 20 * 0.8 - 1 <= wait2 <= 20 * 1.2 + 1, wait2  # doubled
        update(s, did, next_attempt_at=utcnow())
        assert delivery.deliver(s, tid, did) == "succeeded"
        got = rx.received()
        assert [r.webhook_id for r in got] == [did] * 3
        assert len({r.headers["webhook-timestamp"] for r in got}) >= 1 and all(r.verify(secret) for r in got)
        assert len({r.body for r in got}) == 1  # the same body every time
        d = row(s, did)
        assert (d.status, d.attempts, d.last_status_code, d.response_body) == ("succeeded", 3, 200, "fine \u00e9")


def test_a_timeout_is_a_failed_attempt_and_the_last_one_gives_up(wh):  # noqa: ANN001
    s, tid = wh
    with Receiver(lambda _r, _n: (200, b"late", 3.0)) as rx:
        eid, _ = endpoint(s, tid, rx.url())
        did = ping(s, tid, eid)
        for n in range(1, 4):
            t = time.monotonic()
            status = delivery.deliver(s, tid, did)
            took = time.monotonic() - t
            assert took < s.webhook_timeout_seconds + 1.0, took
            d = row(s, did)
            assert d.attempts == n and d.last_error.startswith("timeout") and d.last_status_code is None
            assert status == ("failed" if n == 3 else "pending")
            update(s, did, next_attempt_at=utcnow())
        assert row(s, did).finished_at is not None
        assert delivery.deliver(s, tid, did) == "skipped"
        assert len(rx.received()) == 3


def test_the_claim_is_atomic_and_a_dead_attempt_is_fenced_off(wh):  # noqa: ANN001
    s, tid = wh
    with Receiver() as rx:
        eid, _ = endpoint(s, tid, rx.url())
        did = ping(s, tid, eid)
        with session_scope(s.db_url) as sess:
            first = delivery.claim(sess, s, tid, did)
        assert first is not None and first.number == 1
        with session_scope(s.db_url) as sess:  # in flight: a duplicate task takes nothing
            assert delivery.claim(sess, s, tid, did) is None
        if s.db_url.startswith("postgresql"):  # a claim holding the row lock makes another skip it at once
            from core.db.engine import session_factory

            holder = session_factory(s.db_url)()
            try:
                update(s, did, lease_until=utcnow() - timedelta(seconds=1))
                assert delivery.claim(holder, s, tid, did) is not None  # locked, not committed
                t = time.monotonic()
                with session_scope(s.db_url) as sess:
                    assert delivery.claim(sess, s, tid, did) is None
                assert time.monotonic() - t < 1
            finally:
                holder.rollback()
                holder.close()
        update(s, did, lease_until=utcnow() - timedelta(seconds=1))  # the first attempt's worker died
        with session_scope(s.db_url) as sess:
            second = delivery.claim(sess, s, tid, did)
        assert second is not None and second.number == 2
        from core.webhooks.transport import Answer

        with session_scope(s.db_url) as sess:  # the dead attempt comes back: it may not write
            assert delivery.record(sess, s, first, Answer(status=500)) is None
        with session_scope(s.db_url) as sess:
            assert delivery.record(sess, s, second, Answer(status=204)) == "succeeded"
        assert row(s, did).status == "succeeded"


def test_a_worker_with_another_secret_key_never_sends_unsigned(wh):  # noqa: ANN001
    s, tid = wh
    with Receiver() as rx:
        eid, _ = endpoint(s, tid, rx.url())
        did = ping(s, tid, eid)
        from pydantic import SecretStr

        other = s.model_copy(update={"secret_key": SecretStr("not-the-key-that-sealed-it")})
        assert delivery.deliver(other, tid, did) == "skipped"
        d = row(s, did)
        assert (d.status, d.attempts) == ("pending", 1) and "SECATEURS_SECRET_KEY" in d.last_error
        assert rx.received() == []
        update(s, did, next_attempt_at=utcnow())
        assert delivery.deliver(s, tid, did) == "succeeded"


def test_rotation_signs_with_both_secrets_during_the_grace_period(wh):  # noqa: ANN001
    s, tid = wh
    from standardwebhooks import Webhook
    from standardwebhooks.webhooks import WebhookVerificationError

    with Receiver() as rx:
        eid, old = endpoint(s, tid, rx.url())
        with session_scope(s.db_url) as sess:
            _, new = WebhookService(sess, tid, s).rotate_secret(eid)
        delivery.deliver(s, tid, ping(s, tid, eid))
        got = rx.received()[-1]
        assert len(got.signatures) == 2
        got.verify(new)
        got.verify(old)
        for sig in got.signatures:  # one signature per secret
            only = {**got.headers, "webhook-signature": sig}
            ok = []
            for secret in (new, old):
                try:
                    Webhook(secret).verify(got.body, only)
                    ok.append(secret)
                except WebhookVerificationError:
                    pass
            assert len(ok) == 1
        with session_scope(s.db_url) as sess:  # the grace period is over
            sess.get(WebhookEndpoint, eid).previous_secret_expires_at = utcnow() - timedelta(seconds=1)
        delivery.deliver(s, tid, ping(s, tid, eid))
        got = rx.received()[-1]
        assert len(got.signatures) == 1
        got.verify(new)
        with pytest.raises(WebhookVerificationError):
            got.verify(old)


def test_addresses_are_checked_again_at_delivery_time(wh):  # noqa: ANN001
    """A name that resolved to a public address when the endpoint was made and resolves to loopback when the
    delivery is made (DNS rebinding) is refused; the connection goes to checked addresses only."""
    require(hosts_writable(), "/etc/hosts is not writable (needs root)")
    s, tid = wh
    strict = s.model_copy(update={"webhook_allow_private_addresses": False})
    with Receiver() as rx:
        with hosts_entry("93.184.216.34") as name:
            eid, _ = endpoint(strict, tid, f"http://{name}:{rx.port}/hook")  # public when checked
        with hosts_entry("127.0.0.1", name):
            did = ping(s, tid, eid)
            assert delivery.deliver(strict, tid, did) == "pending"
            d = row(s, did)
            assert d.last_error.startswith("address refused:") and "127.0.0.1" in d.last_error, d.last_error
            assert "loopback" in d.last_error and rx.received() == []
            update(s, did, next_attempt_at=utcnow())
            assert delivery.deliver(s, tid, did) == "succeeded"  # allowed: it reaches the receiver
            (got,) = rx.received()
            assert got.headers["host"] == f"{name}:{rx.port}"  # the Host header keeps the name


def test_the_sweep_publishes_due_deliveries_once(wh):  # noqa: ANN001
    s, tid = wh
    s = s.model_copy(update={"webhook_redeliver_after_seconds": 30.0})
    app = celery_client(s)
    queue = CeleryDeliveryQueue(app)

    def take_all() -> list[str]:
        ids = []
        with app.connection_for_write() as conn, conn.SimpleQueue(s.webhooks_queue) as q:
            while True:
                try:
                    m = q.get(timeout=1)
                except q.Empty:
                    return ids
                m.ack()
                ids.append(m.payload[0][1])

    eid, _ = endpoint(s, tid, "https://93.184.216.34/hook")
    did = ping(s, tid, eid)  # written without an outbox queue: only the sweep publishes it
    assert row(s, did).lease_until is None
    assert delivery.publish_due(s, queue) == 1
    assert delivery.publish_due(s, queue) == 0  # leased: a second sweep does not publish it again
    lease = row(s, did).lease_until
    assert 25 < (lease - utcnow()).total_seconds() <= 30
    update(s, did, lease_until=utcnow() - timedelta(seconds=1))
    assert delivery.publish_due(s, queue) == 0  # its message still waits in the broker: leased again only
    assert row(s, did).lease_until > utcnow()
    assert take_all() == [did]
    update(s, did, lease_until=utcnow() - timedelta(seconds=1))
    assert delivery.publish_due(s, queue) == 1  # the message is gone and nobody attempted it: published again
    assert take_all() == [did]
    # a retry that is due, and an attempt that died in flight, are published; a future retry is not
    update(s, did, status="pending", lease_until=None, next_attempt_at=utcnow() + timedelta(hours=1))
    assert delivery.publish_due(s, queue) == 0
    update(s, did, status="sending", lease_until=utcnow() - timedelta(seconds=1), attempts=1)
    assert delivery.publish_due(s, queue) == 1
    assert row(s, did).status == "pending" and take_all() == [did]
    update(s, did, status="succeeded", lease_until=None, next_attempt_at=None)
    assert delivery.publish_due(s, queue) == 0


def test_the_retry_schedule_spans_about_a_day():
    s = Settings(_env_file=None)
    waits = [delivery.backoff_seconds(n, s, rand=lambda: 0.5) for n in range(1, s.webhook_max_attempts)]
    assert waits[:3] == [10, 20, 40] and max(waits) == s.webhook_backoff_max_seconds
    assert 20 * 3600 < sum(waits) < 26 * 3600, sum(waits) / 3600
    lo = delivery.backoff_seconds(3, s, rand=lambda: 0.0)
    hi = delivery.backoff_seconds(3, s, rand=lambda: 0.999999)
    assert lo == pytest.approx(32) and hi == pytest.approx(48, rel=1e-3)


def test_the_payload_is_compact_json_with_a_utc_timestamp():
    from core.webhooks.outbox import payload

    body = payload("webhook.test", utcnow(), {"a": 1})
    assert json.loads(body)["timestamp"].endswith("Z") and " " not in body
