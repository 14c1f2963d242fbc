"""/v1/pruning-jobs: thin handlers around core.jobs.service."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.deps import PrincipalDep, QueueDep, SessionDep, SettingsDep, bearer_scheme
from api.params import MAX_SEQ, ArtifactName, IdCursor, JobId, SeqCursor, StatusFilter, status_list
from api.problems import error_responses
from api.schemas import ArtifactList, EventList, JobList, JobOut, artifact_out, event_out, job_out
from api.streams import KEEPALIVE_S, EventStreamResponse, TooManyStreams, job_events
from core.auth import authenticate
from core.db.engine import commit
from core.db.models import Job
from core.errors import ServiceError, TooManyRequests
from core.jobs.schemas import JobCreate
from core.jobs.service import JobService, StoredResponse

router = APIRouter(prefix="/v1/pruning-jobs", tags=["pruning jobs"])
ENQUEUE_HEADER = "Secateurs-Enqueue"


def _base(request: Request) -> str:
    return (request.app.state.settings.public_base_url or "").rstrip("/")


def _etag(body: dict[str, Any]) -> str:
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()
    return '"' + hashlib.sha256(raw).hexdigest()[:32] + '"'


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return etag in tags


def _etag_of(model: BaseModel) -> str:
    return _etag(model.model_dump(mode="json"))


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    summary="Create a pruning job",
    responses={
        201: {
            "description": "Created; `Location` points at the job. A repeat with the same Idempotency-Key and "
            "body returns the stored response with `Idempotent-Replayed: true`.",
            "headers": {
                "Location": {"schema": {"type": "string"}},
                "Idempotent-Replayed": {"schema": {"type": "string"}, "description": "set on replays"},
                ENQUEUE_HEADER: {
                    "schema": {"type": "string", "enum": ["published", "deferred"]},
                    "description": "on a creation: `published` when the job reached the queue; `deferred` when "
                    "the broker could not take it within the enqueue timeout. A deferred job is stored and "
                    "queued, and the workers' sweep publishes it as soon as the broker is back.",
                },
            },
        },
        **error_responses(400, 401, 409, 422),
    },
)
def create_job(
    request: Request,
    response: Response,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
    body: Annotated[
        JobCreate,
        Body(
            openapi_examples={
                "wanda-50": {
                    "summary": "Wanda, 50% unstructured",
                    "value": {
                        "model": "meta-llama/Llama-3.2-1B",
                        "method": "wanda",
                        "sparsity": 0.5,
                        "calibration": {"source": "c4", "nsamples": 128, "seqlen": 2048},
                        "metadata": {"team": "search"},
                    },
                },
                "sparsegpt-24": {
                    "summary": "SparseGPT, 2:4, uploaded calibration set",
                    "value": {
                        "model": "s3://models/llama-3.2-1b/",
                        "method": "sparsegpt",
                        "pattern": "2:4",
                        "calibration": {
                            "calibration_set_id": "cal_0191c5f0a3b2c1d2e3f4a5b6c7",
                            "nsamples": 64,
                            "seqlen": 1024,
                        },
                    },
                },
            }
        ),
    ],
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="1-255 characters; the same key with the same body returns the stored response, with "
            "another body is refused (422)",
            json_schema_extra={"minLength": 1, "maxLength": 255},
        ),
    ] = None,
) -> JobOut:
    base = _base(request)

    def created(job: Job) -> StoredResponse:
        out = job_out(job, base)
        return StoredResponse(201, out.model_dump(mode="json"), {"Location": out.urls["self"]})

    svc = JobService(session, principal.tenant_id, settings, queue)
    result = svc.submit(body, idempotency_key, created)
    # commit now rather than at the request's end, so the publication (after the commit) is known to the response
    commit(session)
    out = JobOut.model_validate(result.response.body)
    response.status_code = result.response.status
    response.headers.update({"ETag": _etag_of(out), **result.response.headers})
    if result.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    elif result.publication is not None:
        response.headers[ENQUEUE_HEADER] = "published" if result.publication.published else "deferred"
    return out


@router.get("", response_model=JobList, summary="List pruning jobs, newest first", responses=error_responses(401, 422))
def list_jobs(
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    status: StatusFilter = None,
    after: IdCursor = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    svc = JobService(session, principal.tenant_id, settings)
    jobs, has_more = svc.list(statuses=status_list(status), after=after, limit=limit)
    base = _base(request)
    data = [job_out(j, base) for j in jobs]
    return JobList(
        data=data, has_more=has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


@router.get(
    "/{job_id}",
    response_model=JobOut,
    summary="Get a pruning job",
    responses={200: {"headers": {"ETag": {"schema": {"type": "string"}}}}, **error_responses(304, 401, 404, 422)},
)
def get_job(
    request: Request,
    response: Response,
    job_id: JobId,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> JobOut | Response:
    out = job_out(JobService(session, principal.tenant_id, settings).get(job_id), _base(request))
    etag = _etag_of(out)
    if _matches(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    response.headers["ETag"] = etag
    return out


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a pruning job",
    description="queued -> cancelled at once; running -> cancelling, then cancelled between blocks. "
    "Idempotent; 409 once the job succeeded or failed.",
    responses=error_responses(401, 404, 409, 422),
)
def cancel_job(
    request: Request,
    response: Response,
    job_id: JobId,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
) -> JobOut:
    out = job_out(JobService(session, principal.tenant_id, settings).cancel(job_id), _base(request))
    response.headers["ETag"] = _etag_of(out)
    return out


@router.get(
    "/{job_id}/events",
    response_model=EventList,
    summary="List a job's events",
    responses=error_responses(401, 404, 422),
)
def list_events(
    job_id: JobId,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    after: SeqCursor = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventList:
    events, has_more = JobService(session, principal.tenant_id, settings).events(job_id, after=after, limit=limit)
    data = [event_out(e) for e in events]
    return EventList(data=data, has_more=has_more, last_id=data[-1].id if data else None)


@router.get(
    "/{job_id}/events/stream",
    dependencies=[Depends(bearer_scheme)],
    response_class=StreamingResponse,
    summary="Stream a job's events (Server-Sent Events)",
    description="Each event's `id:` is its sequence number; reconnect with `Last-Event-ID` to resume. "
    "The stream closes after the job's terminal status event. On Postgres events are pushed as they commit; "
    "a tenant may hold `SECATEURS_SSE_MAX_STREAMS_PER_TENANT` open streams per API process (429 beyond, with "
    "`Retry-After`).",
    responses={
        200: {
            "content": {
                "text/event-stream": {"example": 'id: 3\nevent: progress\ndata: {"stage": "prune", "block": 0}\n\n'}
            }
        },
        **error_responses(401, 404, 422, 429),
    },
)
async def stream_events(
    request: Request,
    job_id: JobId,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    after: SeqCursor = 0,
) -> StreamingResponse:
    settings, sessions = request.app.state.settings, request.app.state.sessions
    streams, hub = request.state.streams, request.state.hub  # the lifespan's (api.app.lifespan)

    def auth() -> str:
        # A short session of its own: a request-scoped one would stay open for the whole stream.
        with sessions() as s:
            tenant_id = authenticate(s, request.headers.get("authorization"), settings.pepper).tenant_id
            JobService(s, tenant_id, settings).get(job_id)  # 404 before the stream starts
            return tenant_id

    tenant_id = await run_in_threadpool(auth)
    try:
        start = int(last_event_id) if last_event_id else after
    except ValueError:
        start = after
    if not 0 <= start <= MAX_SEQ:  # a bad Last-Event-ID is ignored, as an unparsable one is
        start = after
    try:
        streams.open(tenant_id)
    except TooManyStreams as e:
        raise TooManyRequests(str(e), retry_after=KEEPALIVE_S) from None
    events = job_events(streams, hub, sessions, tenant_id, job_id, start, settings.sse_poll_seconds)
    return EventStreamResponse(events, on_end=lambda: streams.close(tenant_id))


@router.get(
    "/{job_id}/artifacts",
    response_model=ArtifactList,
    summary="List a job's published artifacts",
    responses=error_responses(401, 404, 422),
)
def list_artifacts(
    request: Request, job_id: JobId, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> ArtifactList:
    arts = JobService(session, principal.tenant_id, settings).artifacts(job_id)
    base = _base(request)
    return ArtifactList(data=[artifact_out(a, base) for a in arts])


@router.get(
    "/{job_id}/artifacts/{name:path}",
    summary="Download an artifact",
    description="Local storage: streamed, with HTTP Range support. S3: 307 to a short-lived presigned URL.",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "Partial content"},
        **error_responses(307, 401, 404, 416, 422),
    },
)
def download_artifact(
    request: Request,
    job_id: JobId,
    name: ArtifactName,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
) -> Response:
    art = JobService(session, principal.tenant_id, settings).artifact(job_id, name)
    storage = request.app.state.storage
    filename = name.rsplit("/", 1)[-1]
    url = storage.presigned_url(art.storage_key, filename=filename, expires=settings.presign_expires_seconds)
    if url:
        return RedirectResponse(url, status_code=307)
    path = storage.local_path(art.storage_key)
    if path is None:
        raise ServiceError("artifact is recorded but its file is missing")
    return FileResponse(
        path,
        filename=filename,
        media_type="application/octet-stream",
        headers={"ETag": f'"{art.sha256}"', "X-Checksum-SHA256": art.sha256},
    )
