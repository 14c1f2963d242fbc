"""Service-level failures; the API renders each as an RFC 9457 problem."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status = 400
    type_ = "about:blank"
    title = "Bad request"

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.code = code


class NotFound(ServiceError):
    status, title, type_ = 404, "Not found", "not-found"


class Conflict(ServiceError):
    status, title, type_ = 409, "Conflict", "conflict"


class InvalidInput(ServiceError):
    status, title, type_ = 422, "Invalid request", "validation-error"

    @classmethod
    def field(cls, loc: list[str | int], msg: str, type_: str = "value_error") -> InvalidInput:
        where = ".".join(str(x) for x in loc)
        return cls(f"{where}: {msg}", errors=[{"loc": ["body", *loc], "msg": msg, "type": type_}])


class TooLarge(ServiceError):
    status, title, type_ = 413, "Content too large", "too-large"


class Unauthorized(ServiceError):
    status, title, type_ = 401, "Unauthorized", "unauthorized"


class TooManyRequests(ServiceError):
    status, title, type_ = 429, "Too many requests", "too-many-requests"

    def __init__(self, detail: str, *, retry_after: float) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
