"""/v1/pruning-jobs: thin handlers around core.jobs.service."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.deps import PrincipalDep, QueueDep, SessionDep, SettingsDep, bearer_scheme
from api.params import MAX_SEQ, ArtifactName, IdCursor, JobId, SeqCursor
from api.problems import error_responses
from api.schemas import ArtifactList, EventList, JobList, JobOut, artifact_out, event_out, job_out
from core.auth import authenticate
from core.db.models import Job
from core.errors import NotFound, ServiceError
from core.jobs.schemas import JobCreate
from core.jobs.service import JobService, StoredResponse
from core.jobs.state import TERMINAL

router = APIRouter(prefix="/v1/pruning-jobs", tags=["pruning jobs"])


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
        str | None, Header(alias="Idempotency-Key", description="same key + same body returns the stored response")
    ] = None,
) -> JobOut:
    base = _base(request)

    def created(job: Job) -> StoredResponse:
        out = job_out(job, base)
        return StoredResponse(201, out.model_dump(mode="json"), {"Location": out.urls["self"]})

    svc = JobService(session, principal.tenant_id, settings, queue)
    result = svc.submit(body, idempotency_key, created)
    out = JobOut.model_validate(result.response.body)
    response.status_code = result.response.status
    response.headers.update({"ETag": _etag_of(out), **result.response.headers})
    if result.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return out


@router.get("", response_model=JobList, summary="List pruning jobs, newest first", responses=error_responses(401, 422))
def list_jobs(
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    status: Annotated[str | None, Query(description="comma-separated statuses", examples=["running,queued"])] = None,
    after: IdCursor = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    svc = JobService(session, principal.tenant_id, settings)
    statuses = [s.strip() for s in status.split(",") if s.strip()] if status else None
    jobs, has_more = svc.list(statuses=statuses, after=after, limit=limit)
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
    summary="Stream a job's events (Server-Sent Events)",
    description="Each event's `id:` is its sequence number; reconnect with `Last-Event-ID` to resume. "
    "The stream closes after the job's terminal status event.",
    responses={
        200: {
            "content": {
                "text/event-stream": {"example": 'id: 3\nevent: progress\ndata: {"stage": "prune", "block": 0}\n\n'}
            }
        },
        **error_responses(401, 404, 422),
    },
)
async def stream_events(
    request: Request,
    job_id: JobId,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    after: SeqCursor = 0,
) -> StreamingResponse:
    settings = request.app.state.settings
    sessions = request.app.state.sessions

    def auth() -> str:
        # A short session of its own: a request-scoped one would stay open for the whole stream.
        with sessions() as s:
            return authenticate(s, request.headers.get("authorization"), settings.pepper).tenant_id

    tenant_id = await run_in_threadpool(auth)

    def fetch(since: int) -> tuple[list[dict[str, Any]], bool, bool]:
        with sessions() as s:
            svc = JobService(s, tenant_id, settings)
            job = svc.get(job_id)
            evs, more = svc.events(job_id, after=since, limit=500)
            return [event_out(e).model_dump(mode="json") for e in evs], more, job.status in TERMINAL

    try:
        start = int(last_event_id) if last_event_id else after
    except ValueError:
        start = after
    if not 0 <= start <= MAX_SEQ:  # a bad Last-Event-ID is ignored, as an unparsable one is
        start = after
    await run_in_threadpool(fetch, start)  # 404 before the stream starts

    async def gen():  # noqa: ANN202
        since = start
        idle = 0.0
        yield "retry: 2000\n\n"
        while True:
            try:
                evs, more, terminal = await run_in_threadpool(fetch, since)
            except NotFound:
                return
            for e in evs:
                since = e["id"]
                yield f"id: {e['id']}\nevent: {e['type']}\ndata: {json.dumps(e, separators=(',', ':'))}\n\n"
            if terminal and not more:
                return
            if evs:
                idle = 0.0
                continue
            if await request.is_disconnected():
                return
            await asyncio.sleep(settings.sse_poll_seconds)
            idle += settings.sse_poll_seconds
            if idle >= 15:
                idle = 0.0
                yield ": keep-alive\n\n"

    return StreamingResponse(
        gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


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
