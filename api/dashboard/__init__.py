"""The web dashboard: static files (``static/``, shipped as package data, no build step) served at
``/dashboard/``, and the security headers of its responses.

The page talks to the API from the browser with the API key the user enters (kept in the tab's
``sessionStorage``) in an ``Authorization`` header: event streams are read with ``fetch()`` rather than
``EventSource`` (which cannot send that header), and artifacts are downloaded with ``fetch()`` into a Blob, so
the key never appears in a URL."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.responses import RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.settings import Settings

PATH = "/dashboard"
STATIC = Path(__file__).resolve().parent / "static"


def _origin(url: str | None) -> str | None:
    if not url:
        return None
    u = urlsplit(url)
    return f"{u.scheme}://{u.netloc}" if u.scheme in ("http", "https") and u.netloc else None


def content_security_policy(settings: Settings) -> str:
    """Scripts and styles only from our own files (no inline code, no eval), no plugins, no framing, DOM sinks
    that parse HTML refused (Trusted Types with no policy). ``connect-src`` adds the S3 endpoint that presigned
    artifact URLs point at: a download the API answers with 307 is followed there by ``fetch()`` (the bucket's
    CORS rules must allow the dashboard's origin)."""
    connect = ["'self'"]
    if settings.storage_backend == "s3":
        s3 = _origin(settings.s3_public_endpoint_url or settings.s3_endpoint_url)
        connect.append(s3 or "https://*.amazonaws.com")
    return "; ".join(
        [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data: blob:",
            f"connect-src {' '.join(connect)}",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
            "require-trusted-types-for 'script'",
            "trusted-types 'none'",
        ]
    )


class SecurityHeaders:
    """Adds the dashboard's security headers to every response under ``/dashboard``."""

    def __init__(self, app: ASGIApp, csp: str) -> None:
        self.app = app
        self.headers = [
            (b"content-security-policy", csp.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"DENY"),
            (b"cross-origin-opener-policy", b"same-origin"),
            (b"cache-control", b"no-cache"),
        ]
        self.names = {name for name, _ in self.headers}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != PATH and not path.startswith(PATH + "/"):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in self.names]
                message = {**message, "headers": kept + self.headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the dashboard at ``/dashboard/`` (``/dashboard`` redirects there); not part of the API schema."""

    @app.get(PATH, include_in_schema=False)
    def _dashboard_root() -> RedirectResponse:
        # relative, so that it holds behind a reverse proxy that serves the API under a path prefix
        return RedirectResponse("dashboard/", status_code=308)

    app.mount(PATH, StaticFiles(directory=STATIC, html=True), name="dashboard")
    app.add_middleware(SecurityHeaders, csp=content_security_policy(settings))
