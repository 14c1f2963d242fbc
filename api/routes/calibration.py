"""/v1/calibration-sets: upload (.txt/.jsonl, size-limited) and read."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import JSONResponse

from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.problems import error_responses
from api.schemas import CalibrationSetList, CalibrationSetOut, calibration_dict
from core.errors import TooLarge
from core.jobs.calibration import CalibrationSetService

router = APIRouter(prefix="/v1/calibration-sets", tags=["calibration sets"])


@router.post("", status_code=201, response_model=CalibrationSetOut, summary="Upload a calibration set",
             description="A .txt file (paragraphs separated by blank lines) or .jsonl (one {\"text\": ...} per line).",
             responses=error_responses(401, 413, 422))
def upload(request: Request, principal: PrincipalDep, session: SessionDep, settings: SettingsDep,
           file: Annotated[UploadFile, File(description=".txt or .jsonl")]) -> JSONResponse:
    cl = request.headers.get("content-length")
    if cl and cl.isdigit() and int(cl) > settings.calibration_max_bytes + 64 * 1024:
        raise TooLarge(f"calibration uploads are limited to {settings.calibration_max_bytes} bytes")
    svc = CalibrationSetService(session, principal.tenant_id, request.app.state.storage, settings.calibration_max_bytes)
    cs = svc.upload(file.file, file.filename)
    session.commit()
    return JSONResponse(calibration_dict(cs), status_code=201, headers={"Location": f"/v1/calibration-sets/{cs.id}"})


@router.get("", response_model=CalibrationSetList, summary="List calibration sets", responses=error_responses(401, 422))
def list_sets(request: Request, principal: PrincipalDep, session: SessionDep, settings: SettingsDep,
              after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JSONResponse:
    svc = CalibrationSetService(session, principal.tenant_id, request.app.state.storage, settings.calibration_max_bytes)
    rows, more = svc.list(after=after, limit=limit)
    data = [calibration_dict(c) for c in rows]
    return JSONResponse({"object": "list", "data": data, "has_more": more, "last_id": data[-1]["id"] if data else None})


@router.get("/{set_id}", response_model=CalibrationSetOut, summary="Get a calibration set", responses=error_responses(401, 404))
def get_set(request: Request, set_id: str, principal: PrincipalDep, session: SessionDep, settings: SettingsDep) -> JSONResponse:
    svc = CalibrationSetService(session, principal.tenant_id, request.app.state.storage, settings.calibration_max_bytes)
    return JSONResponse(calibration_dict(svc.get(set_id)))
