"""/v1/webhook-endpoints: thin handlers around core.webhooks.service."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query, Response

from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.params import EndpointId, IdCursor
from api.problems import error_responses
from api.schemas import (
    WebhookDeliveryList,
    WebhookDeliveryOut,
    WebhookEndpointCreated,
    WebhookEndpointList,
    WebhookEndpointOut,
    WebhookSecretOut,
    webhook_delivery_out,
    webhook_endpoint_out,
)
from core.webhooks.schemas import WebhookEndpointCreate
from core.webhooks.service import WebhookService

router = APIRouter(prefix="/v1/webhook-endpoints", tags=["webhooks"])

SIGNING = """Each delivery is a `POST` of `{"type", "timestamp", "data"}` (for `job.*` events `data` is the job as
`GET /v1/pruning-jobs/{id}` shows it), signed per Standard Webhooks: headers `webhook-id` (the same on every
retry of one delivery), `webhook-timestamp` and `webhook-signature` (`v1,<base64 HMAC-SHA256>`; two of them,
space separated, while a rotated secret's grace period lasts). A 2xx answer ends the delivery; anything else
(another status, a redirect, no answer within the timeout) is retried with exponential backoff for about a day.
"""


def _service(principal: PrincipalDep, session: SessionDep, settings: SettingsDep) -> WebhookService:
    return WebhookService(session, principal.tenant_id, settings)


ServiceDep = Annotated[WebhookService, Depends(_service)]


def _base(settings: SettingsDep) -> str:
    return (settings.public_base_url or "").rstrip("/")


BaseDep = Annotated[str, Depends(_base)]


@router.post(
    "",
    status_code=201,
    response_model=WebhookEndpointCreated,
    summary="Register a webhook endpoint",
    description="Returns the endpoint's signing secret (`whsec_...`): the only time it is shown. The URL's host "
    "is resolved now: every address must be public (unless the service allows private ones).\n\n" + SIGNING,
    responses={201: {"headers": {"Location": {"schema": {"type": "string"}}}}, **error_responses(400, 401, 409, 422)},
)
def create_endpoint(
    response: Response,
    svc: ServiceDep,
    base: BaseDep,
    body: Annotated[
        WebhookEndpointCreate,
        Body(
            openapi_examples={
                "all-job-events": {
                    "summary": "every terminal job event",
                    "value": {"url": "https://example.com/hooks/secateurs", "description": "search team"},
                },
                "failures-only": {
                    "summary": "failed and cancelled jobs only",
                    "value": {
                        "url": "https://example.com/hooks/alerts",
                        "event_types": ["job.failed", "job.cancelled"],
                    },
                },
            }
        ),
    ],
) -> WebhookEndpointCreated:
    ep, secret = svc.create(body)
    out = webhook_endpoint_out(ep, base)
    response.headers["Location"] = out.urls["self"]
    return WebhookEndpointCreated(**out.model_dump(), secret=secret)


@router.get(
    "",
    response_model=WebhookEndpointList,
    summary="List webhook endpoints, newest first",
    responses=error_responses(401, 422),
)
def list_endpoints(
    svc: ServiceDep, base: BaseDep, after: IdCursor = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> WebhookEndpointList:
    rows, has_more = svc.list(after=after, limit=limit)
    data = [webhook_endpoint_out(e, base) for e in rows]
    return WebhookEndpointList(
        data=data, has_more=has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


@router.get(
    "/{endpoint_id}",
    response_model=WebhookEndpointOut,
    summary="Get a webhook endpoint",
    responses=error_responses(401, 404, 422),
)
def get_endpoint(endpoint_id: EndpointId, svc: ServiceDep, base: BaseDep) -> WebhookEndpointOut:
    return webhook_endpoint_out(svc.get(endpoint_id), base)


@router.delete(
    "/{endpoint_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a webhook endpoint",
    description="Its deliveries log goes with it, and deliveries not yet made are never made.",
    responses={204: {"description": "Deleted"}, **error_responses(401, 404, 422)},
)
def delete_endpoint(endpoint_id: EndpointId, svc: ServiceDep) -> Response:
    svc.delete(endpoint_id)
    return Response(status_code=204)


@router.post(
    "/{endpoint_id}/rotate-secret",
    response_model=WebhookSecretOut,
    summary="Rotate an endpoint's signing secret",
    description="Returns the new secret, shown only here. For `SECATEURS_WEBHOOK_SECRET_GRACE_SECONDS` "
    "(default 24 h) every delivery carries two signatures, with the new and the previous secret, so the "
    "receiver can switch secrets without missing one.",
    responses=error_responses(401, 404, 422),
)
def rotate_secret(endpoint_id: EndpointId, svc: ServiceDep) -> WebhookSecretOut:
    ep, secret = svc.rotate_secret(endpoint_id)
    return WebhookSecretOut(endpoint_id=ep.id, secret=secret, previous_secret_expires_at=ep.previous_secret_expires_at)


@router.post(
    "/{endpoint_id}/test",
    status_code=202,
    response_model=WebhookDeliveryOut,
    summary="Send a test event",
    description="Queues a `webhook.test` delivery to the endpoint, sent and retried like any other; follow it "
    "in the deliveries log.",
    responses=error_responses(401, 404, 422),
)
def send_test(endpoint_id: EndpointId, svc: ServiceDep) -> WebhookDeliveryOut:
    return webhook_delivery_out(svc.ping(endpoint_id))


@router.get(
    "/{endpoint_id}/deliveries",
    response_model=WebhookDeliveryList,
    summary="An endpoint's deliveries log, newest first",
    description="Each delivery: its event, `webhook-id`, status, attempts, the last answer's status code, error "
    "and the start of its body (at most 1 KiB is kept), and when a pending one is attempted next.",
    responses=error_responses(401, 404, 422),
)
def list_deliveries(
    endpoint_id: EndpointId,
    svc: ServiceDep,
    after: IdCursor = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> WebhookDeliveryList:
    rows, has_more = svc.deliveries(endpoint_id, after=after, limit=limit)
    data = [webhook_delivery_out(d) for d in rows]
    return WebhookDeliveryList(data=data, has_more=has_more, last_id=data[-1].id if data else None)
