"""/v1/calibration-sets: upload (.txt/.jsonl, size-limited) and read."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, Request, Response, UploadFile

from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.params import IdCursor, SetId
from api.problems import error_responses
from api.schemas import CalibrationSetList, CalibrationSetOut, calibration_out
from core.jobs.calibration import CalibrationSetService

router = APIRouter(prefix="/v1/calibration-sets", tags=["calibration sets"])


def _service(
    request: Request, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> CalibrationSetService:
    return CalibrationSetService(
        session, principal.tenant_id, request.app.state.storage, settings.calibration_max_bytes
    )


ServiceDep = Annotated[CalibrationSetService, Depends(_service)]


@router.post(
    "",
    status_code=201,
    response_model=CalibrationSetOut,
    summary="Upload a calibration set",
    description='A .txt file (paragraphs separated by blank lines) or .jsonl (one {"text": ...} per line).',
    responses={201: {"headers": {"Location": {"schema": {"type": "string"}}}}, **error_responses(400, 401, 413, 422)},
)
def upload(
    response: Response, svc: ServiceDep, file: Annotated[UploadFile, File(description=".txt or .jsonl")]
) -> CalibrationSetOut:
    cs = svc.upload(file.file, file.filename)
    response.headers["Location"] = f"/v1/calibration-sets/{cs.id}"
    return calibration_out(cs)


@router.get("", response_model=CalibrationSetList, summary="List calibration sets", responses=error_responses(401, 422))
def list_sets(
    svc: ServiceDep, after: IdCursor = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> CalibrationSetList:
    rows, more = svc.list(after=after, limit=limit)
    data = [calibration_out(c) for c in rows]
    return CalibrationSetList(data=data, has_more=more, last_id=data[-1].id if data else None)


@router.get(
    "/{set_id}",
    response_model=CalibrationSetOut,
    summary="Get a calibration set",
    responses=error_responses(401, 404, 422),
)
def get_set(set_id: SetId, svc: ServiceDep) -> CalibrationSetOut:
    return calibration_out(svc.get(set_id))
