"""What the client raises. Every error the API answers is an :class:`ApiError` carrying the problem+json
fields (``status``, ``title``, ``detail``, ``code``, ``errors``); the subclasses name the common statuses."""

from __future__ import annotations

from typing import Any


class SecateursError(Exception):
    """Base of everything this client raises."""


class ApiError(SecateursError):
    """An error response of the API (an RFC 9457 problem, or a bare status from something in front of it)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        code: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        type: str = "about:blank",
        instance: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.code = code
        self.errors = errors or []
        self.type = type
        self.instance = instance
        self.headers = headers or {}
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.status} {self.title}" + (f": {self.detail}" if self.detail else "")

    def to_dict(self) -> dict[str, Any]:
        """The problem document."""
        out: dict[str, Any] = {"type": self.type, "title": self.title, "status": self.status}
        for k in ("detail", "instance", "code"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        if self.errors:
            out["errors"] = self.errors
        return out


class BadRequest(ApiError):
    """400 and 422: the request was refused as invalid; ``errors`` names each offending field."""


class AuthenticationError(ApiError):
    """401: missing or unknown API key."""


class NotFound(ApiError):
    """404."""


class Conflict(ApiError):
    """409: e.g. cancelling a job that already succeeded (``code="job_finished"``)."""


class TooLarge(ApiError):
    """413: an upload over the server's limit."""


class RateLimited(ApiError):
    """429 after every retry."""


class ServiceUnavailable(ApiError):
    """503 after every retry (the database, broker or storage is unreachable)."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: AuthenticationError,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    422: BadRequest,
    429: RateLimited,
    503: ServiceUnavailable,
}


def api_error(status: int, body: Any, headers: dict[str, str] | None = None) -> ApiError:
    """The exception for an error response: its problem fields when the body is one, else the bare status."""
    from http import HTTPStatus

    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    cls = _BY_STATUS.get(status, ApiError)
    if not isinstance(body, dict):
        detail = body.strip()[:500] if isinstance(body, str) and body.strip() else None
        return cls(status, phrase, detail, headers=headers)
    errors = body.get("errors")
    return cls(
        int(body.get("status") or status),
        str(body.get("title") or phrase),
        body.get("detail"),
        code=body.get("code"),
        errors=errors if isinstance(errors, list) else None,
        type=str(body.get("type") or "about:blank"),
        instance=body.get("instance"),
        headers=headers,
    )


class ConnectionFailed(SecateursError):
    """The server could not be reached (or kept dropping the connection) through every retry. ``maybe_sent``:
    the request may have reached the server before the connection failed."""

    def __init__(self, message: str, *, maybe_sent: bool = False) -> None:
        super().__init__(message)
        self.maybe_sent = maybe_sent


class StreamUnavailable(SecateursError):
    """The event stream cannot be used here (refused, or not answered as Server-Sent Events): poll instead."""


class WaitTimeout(SecateursError):
    """``wait`` gave up before the job reached a terminal status."""


class DownloadError(SecateursError):
    """A download could not complete (no artifacts, destination in the way, a transfer that kept failing)."""


class ChecksumMismatch(DownloadError):
    """A downloaded file's size or sha256 is not what the artifact list (or the manifest) says."""

    def __init__(self, name: str, expected: str, actual: str, what: str = "sha256") -> None:
        self.name, self.expected, self.actual, self.what = name, expected, actual, what
        super().__init__(f"{name}: {what} {actual} does not match the expected {expected}")
