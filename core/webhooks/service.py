"""API-facing webhook logic: endpoints (create, list, get, delete, rotate the secret, ping) and their
deliveries log. Services never commit: the request owns the transaction boundary."""

from __future__ import annotations

import builtins
from datetime import timedelta

from sqlalchemy.orm import Session

from core.db.ids import new_id
from core.db.models import WebhookDelivery, WebhookEndpoint, utcnow
from core.db.repositories import WebhookRepository
from core.errors import Conflict, InvalidInput, NotFound
from core.settings import Settings
from core.webhooks.addresses import AddressRefused, check_url
from core.webhooks.outbox import TEST_EVENT, add_delivery, payload
from core.webhooks.schemas import WebhookEndpointCreate
from core.webhooks.signing import SecretBox, new_secret


class WebhookService:
    def __init__(self, session: Session, tenant_id: str, settings: Settings) -> None:
        self.session = session
        self.tenant_id = tenant_id
        self.settings = settings
        self.repo = WebhookRepository(session, tenant_id)
        self.box = SecretBox(settings.pepper)

    def check_url(self, url: str) -> None:
        """Every URL rule, the resolved addresses included; InvalidInput naming ``url``."""
        try:
            check_url(
                url,
                require_https=self.settings.env == "production",
                allow_private=self.settings.webhook_allow_private_addresses,
            )
        except AddressRefused as e:
            raise InvalidInput.field(["url"], str(e), "url_refused") from None

    def create(self, body: WebhookEndpointCreate) -> tuple[WebhookEndpoint, str]:
        """A new endpoint and its signing secret (the only time the secret is shown)."""
        self.check_url(body.url)
        limit = self.settings.webhook_max_endpoints_per_tenant
        if self.repo.count_endpoints() >= limit:
            raise Conflict(f"a tenant may register at most {limit} webhook endpoints", code="too_many_endpoints")
        secret = new_secret()
        ep = WebhookEndpoint(
            id=new_id("whe"),
            tenant_id=self.tenant_id,
            url=body.url,
            description=body.description,
            event_types=list(body.event_types),
            secret_encrypted=self.box.seal(secret),
            created_at=utcnow(),
        )
        self.repo.add_endpoint(ep)
        return ep, secret

    def get(self, endpoint_id: str, *, lock: bool = False) -> WebhookEndpoint:
        ep = self.repo.endpoint(endpoint_id, lock=lock)
        if ep is None:
            raise NotFound(f"no webhook endpoint {endpoint_id!r}")
        return ep

    def list(self, *, after: str | None, limit: int) -> tuple[builtins.list[WebhookEndpoint], bool]:
        return self.repo.endpoints(after=after, limit=limit)

    def delete(self, endpoint_id: str) -> None:
        """The endpoint goes with its deliveries log; deliveries not yet made are never made."""
        self.repo.delete_endpoint(self.get(endpoint_id, lock=True))

    def rotate_secret(self, endpoint_id: str) -> tuple[WebhookEndpoint, str]:
        """A new secret (shown this once). For ``webhook_secret_grace_seconds`` deliveries are signed with the
        previous one too, so receivers can switch without missing a delivery; an earlier previous secret
        still in its grace period is dropped."""
        ep = self.get(endpoint_id, lock=True)
        now = utcnow()
        grace = self.settings.webhook_secret_grace_seconds
        if grace > 0:
            ep.previous_secret_encrypted = ep.secret_encrypted
            ep.previous_secret_expires_at = now + timedelta(seconds=grace)
        else:
            ep.previous_secret_encrypted = ep.previous_secret_expires_at = None
        secret = new_secret()
        ep.secret_encrypted = self.box.seal(secret)
        ep.rotated_at = now
        return ep, secret

    def ping(self, endpoint_id: str) -> WebhookDelivery:
        """A ``webhook.test`` delivery to the endpoint, sent like any other (after the caller commits)."""
        ep = self.get(endpoint_id)
        now = utcnow()
        body = payload(TEST_EVENT, now, {"endpoint_id": ep.id, "message": "a test event from secateurs"})
        d = add_delivery(self.session, ep, TEST_EVENT, body, now=now, job_id=None)
        self.session.flush()
        return d

    def deliveries(
        self, endpoint_id: str, *, after: str | None, limit: int
    ) -> tuple[builtins.list[WebhookDelivery], bool]:
        self.get(endpoint_id)
        return self.repo.deliveries(endpoint_id, after=after, limit=limit)
