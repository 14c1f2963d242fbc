"""/v1/calibration-sets: upload (.txt/.jsonl, size-limited) and read."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, Request, Response, UploadFile

from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.params import IdCursor, SetId
from api.problems import PROBLEM, error_responses
from api.schemas import CalibrationSetList, CalibrationSetOut, calibration_out
from core.jobs.calibration import FORMATS, MAX_NAME, CalibrationSetService
from core.schema_rules import CONTROL, NON_BLANK

router = APIRouter(prefix="/v1/calibration-sets", tags=["calibration sets"])


def _service(
    request: Request, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> CalibrationSetService:
    return CalibrationSetService(
        session, principal.tenant_id, request.app.state.storage, settings.calibration_max_bytes
    )


ServiceDep = Annotated[CalibrationSetService, Depends(_service)]


def _any_case(text: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in text)


# the file name the upload takes: a .txt or .jsonl extension (any case), at most MAX_NAME characters in all, no
# control characters (nor quotes, backslashes or slashes, which the header's quoted form or a path would read)
_NAME = "|".join(f'[^{CONTROL}"\\\\/]{{1,{MAX_NAME - len(ext)}}}\\{_any_case(ext)}' for ext in FORMATS)
UPLOAD_ENCODING = {
    "file": {
        "contentType": "text/plain, application/jsonl, application/octet-stream",
        "headers": {
            "Content-Disposition": {
                "description": f"names the file: its name ends in {' or '.join(FORMATS)} (any case), is at most "
                f"{MAX_NAME} characters and holds no control characters",
                "required": True,
                "schema": {"type": "string", "pattern": f'filename="(?:{_NAME})"'},
                "example": 'form-data; name="file"; filename="calibration.txt"',
            }
        },
    }
}
UPLOAD_ERRORS = error_responses(400, 401, 413, 422)
UPLOAD_ERRORS[400]["content"][PROBLEM]["example"]["detail"] = "Invalid multipart data."
UPLOAD_ERRORS[422]["content"][PROBLEM]["example"].update(
    detail="file: must be a .txt or .jsonl file",
    errors=[{"loc": ["body", "file"], "msg": "must be a .txt or .jsonl file", "type": "value_error"}],
)
FILE_DESCRIPTION = (
    "UTF-8 text, not blank. .txt: documents separated by blank lines; .jsonl: one JSON string or "
    '{"text": "..."} object per line, at least one text not blank. At most the server\'s upload limit '
    "(20 MiB unless configured), 413 beyond."
)


@router.post(
    "",
    status_code=201,
    response_model=CalibrationSetOut,
    summary="Upload a calibration set",
    description='A .txt file (paragraphs separated by blank lines) or .jsonl (one {"text": ...} per line), sent '
    "as the multipart part `file` with its file name. A multipart body that cannot be parsed is a 400; a "
    "missing part, or a file name, encoding or content the upload does not take, a 422.",
    responses={201: {"headers": {"Location": {"schema": {"type": "string"}}}}, **UPLOAD_ERRORS},
    openapi_extra={"requestBody": {"content": {"multipart/form-data": {"encoding": UPLOAD_ENCODING}}}},
)
def upload(
    response: Response,
    svc: ServiceDep,
    file: Annotated[
        UploadFile,
        File(description=FILE_DESCRIPTION, json_schema_extra={"minLength": 1, "pattern": NON_BLANK}),
    ],
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
