"""RFC 9457 problem details for every error, including request validation errors."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.db.outage import DATABASE_UNAVAILABLE
from core.errors import ServiceError, TooManyRequests

log = logging.getLogger("secateurs.api")
PROBLEM = "application/problem+json"
TYPE_BASE = "urn:secateurs:problem:"
RETRY_AFTER_S = 5  # what a client should wait after a 503: a database restart or failover takes seconds


class ProblemError(BaseModel):
    loc: list[str | int] = Field(examples=[["body", "sparsity"]])
    msg: str = Field(examples=["Input should be less than 1"])
    type: str = Field(examples=["less_than"])


class Problem(BaseModel):
    """An RFC 9457 problem document (served as application/problem+json)."""

    type: str = Field("about:blank", examples=["urn:secateurs:problem:validation-error"])
    title: str = Field(examples=["Invalid request"])
    status: int = Field(examples=[422])
    detail: str | None = Field(None, examples=["sparsity: Input should be less than 1"])
    instance: str | None = Field(None, examples=["/v1/pruning-jobs"])
    code: str | None = Field(None, description="machine-readable reason", examples=["validation_error"])
    errors: list[ProblemError] | None = None


def problem(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    type_: str = "about:blank",
    instance: str | None = None,
    code: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": type_ if type_ == "about:blank" or ":" in type_ else TYPE_BASE + type_,
        "title": title,
        "status": status,
    }
    if detail is not None:
        body["detail"] = detail
    if instance is not None:
        body["instance"] = instance
    if code is not None:
        body["code"] = code
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _jsonable_loc(loc: Any) -> list[str | int]:
    return [x if isinstance(x, (str, int)) else str(x) for x in loc]


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if isinstance(exc, TooManyRequests):
            headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
        code = exc.code or exc.type_.replace("-", "_")
        return problem(
            exc.status,
            exc.title,
            exc.detail,
            type_=exc.type_,
            instance=request.url.path,
            code=code,
            errors=exc.errors,
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for e in exc.errors():
            msg = str(e.get("msg", "")).removeprefix("Value error, ")
            errors.append({"loc": _jsonable_loc(e.get("loc", ())), "msg": msg, "type": str(e.get("type", ""))})
        first: dict[str, Any] = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        loc = [x for x in first["loc"] if x not in ("body", "query", "path", "header")]
        where = ".".join(str(x) for x in loc)
        detail = f"{where}: {first['msg']}" if where else str(first["msg"])
        return problem(
            422,
            "Invalid request",
            detail,
            type_="validation-error",
            instance=request.url.path,
            code="validation_error",
            errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        from http import HTTPStatus

        try:
            title = HTTPStatus(exc.status_code).phrase
        except ValueError:
            title = "Error"
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title else None
        return problem(exc.status_code, title, detail, instance=request.url.path, headers=getattr(exc, "headers", None))

    async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc.__class__.__name__)
        return problem(
            503,
            "Service Unavailable",
            "the database cannot be reached; retry later",
            type_="service-unavailable",
            instance=request.url.path,
            code="database_unavailable",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    for error in DATABASE_UNAVAILABLE:
        app.add_exception_handler(error, _database_unavailable)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _internal_error(request.url.path)


def _internal_error(path: str) -> JSONResponse:
    return problem(
        500,
        "Internal Server Error",
        "an unexpected error occurred; it has been logged",
        instance=path,
        code="internal_error",
    )


class UnhandledErrors:
    """Answers an unhandled error with the 500 problem inside the app. Starlette's outermost middleware re-raises
    after its own handler has answered, and uvicorn then closes the client's keep-alive connection, so the
    client's next request on it fails with a reset."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:  # half a response is out: only closing the connection can tell the client
                raise
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            await _internal_error(scope["path"])(scope, receive, send)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting problem+json errors with examples (and their headers)."""
    out: dict[int | str, dict[str, Any]] = {}
    for s in statuses:
        if s in (304, 307):
            out[s] = {"description": TITLES[s]}
            continue
        example: dict[str, Any] = {"type": "about:blank", "title": TITLES.get(s, "Error"), "status": s}
        example.update(EXAMPLES.get(s, {}))
        out[s] = {
            "description": TITLES.get(s, "Error"),
            "content": {PROBLEM: {"schema": {"$ref": PROBLEM_REF}, "example": example}},
        }
        if s in HEADERS:
            out[s]["headers"] = HEADERS[s]
    return out


PROBLEM_REF = "#/components/schemas/Problem"
TITLES = {
    304: "Not Modified",
    307: "Temporary Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content too large",
    416: "Range Not Satisfiable",
    422: "Invalid request",
    429: "Too many requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
EXAMPLES: dict[int, dict[str, Any]] = {
    400: {"detail": "There was an error parsing the body"},
    401: {
        "type": TYPE_BASE + "unauthorized",
        "detail": "missing Authorization: Bearer <api key>",
        "code": "unauthorized",
    },
    404: {
        "type": TYPE_BASE + "not-found",
        "detail": "no pruning job 'job_0191c5f0a3b2ffffffffffffff'",
        "code": "not_found",
    },
    409: {
        "type": TYPE_BASE + "conflict",
        "detail": "job 'job_0191c5f0a3b2ffffffffffffff' already succeeded",
        "code": "job_finished",
    },
    413: {
        "type": TYPE_BASE + "too-large",
        "detail": "calibration uploads are limited to 20971520 bytes",
        "code": "too_large",
    },
    422: {
        "type": TYPE_BASE + "validation-error",
        "detail": "sparsity: Input should be less than 1",
        "code": "validation_error",
        "errors": [{"loc": ["body", "sparsity"], "msg": "Input should be less than 1", "type": "less_than"}],
    },
    429: {
        "type": TYPE_BASE + "too-many-requests",
        "detail": "at most 100 open event streams per tenant",
        "code": "too_many_requests",
    },
    500: {"detail": "an unexpected error occurred; it has been logged", "code": "internal_error"},
    503: {
        "type": TYPE_BASE + "service-unavailable",
        "detail": "the database cannot be reached; retry later",
        "code": "database_unavailable",
    },
}
HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "always `Bearer`", "schema": {"type": "string"}}},
    429: {
        "Retry-After": {
            "description": "seconds to wait before retrying",
            "schema": {"type": "integer", "minimum": 0},
        }
    },
    503: {
        "Retry-After": {
            "description": "seconds to wait before retrying",
            "schema": {"type": "integer", "minimum": 0},
        }
    },
}
