"""The published OpenAPI document: FastAPI's, with every error response stated as the server sends it, an
RFC 9457 problem (application/problem+json), including the 422 FastAPI adds on its own."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from api.problems import PROBLEM, PROBLEM_REF, Problem

# FastAPI's own 422 body, which this server never sends (its validation errors are problems)
FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def install(app: FastAPI) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            errors_as_problems(build())  # FastAPI keeps the document on the app; it is finished here, once
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def errors_as_problems(spec: dict[str, Any]) -> None:
    """Every 4xx/5xx response of every operation: problem+json with the Problem schema (its example kept)."""
    for path_item in spec.get("paths", {}).values():
        for operation in path_item.values():
            for status, response in operation.get("responses", {}).items():
                if str(status)[0] in "45":
                    documented = response.get("content", {}).get(PROBLEM, {})
                    media = {"schema": {"$ref": PROBLEM_REF}}
                    if "example" in documented:
                        media["example"] = documented["example"]
                    response["content"] = {PROBLEM: media}
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in FASTAPI_VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    _, problem_defs = models_json_schema([(Problem, "serialization")], ref_template="#/components/schemas/{model}")
    schemas.update(problem_defs["$defs"])
