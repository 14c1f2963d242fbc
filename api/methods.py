"""The methods a path answers, asked of the app's own routes: OPTIONS lists them in `Allow`, a method the path
lacks is a 405 problem with the same `Allow`, and HEAD is answered wherever GET is. The router alone answers
from the first route whose path matches, so a path that two routes serve (GET and POST on /v1/pruning-jobs)
would advertise only one of them."""

from __future__ import annotations

from http import HTTPStatus

from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import problem

# what a route may declare (CONNECT and TRACE are never routed here)
PROBED = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class _HeadAnswered(Exception):
    """Raised into a GET handler answering a HEAD once its headers are out: the rest of its body is not sent."""


class AllowedMethods:
    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method")
        if scope["type"] != "http" or self._answers(scope, method):
            await self.app(scope, receive, send)
            return
        allowed = self._allowed(scope)
        if not allowed:  # no route has this path: the router's 404 (or its trailing-slash redirect)
            await self.app(scope, receive, send)
        elif method == "OPTIONS":
            await send({"type": "http.response.start", "status": 204, "headers": [(b"allow", _allow(allowed))]})
            await send({"type": "http.response.body", "body": b""})
        elif method == "HEAD" and "GET" in allowed:
            await self._head(scope, receive, send)
        else:
            response = problem(
                405,
                HTTPStatus.METHOD_NOT_ALLOWED.phrase,
                f"{method} is not one of {_allow(allowed).decode()}",
                instance=scope["path"],
                code="method_not_allowed",
                headers={"Allow": _allow(allowed).decode()},
            )
            await response(scope, receive, send)

    def _answers(self, scope: Scope, method: str | None) -> bool:
        """Whether a route takes this path with this method (asked on a copy: matching writes to the scope)."""
        probe = {**scope, "method": method}
        return any(route.matches(probe)[0] is Match.FULL for route in self.router.routes)

    def _allowed(self, scope: Scope) -> set[str]:
        """Every method some route takes this path with, OPTIONS and, with GET, HEAD; empty when none."""
        methods = {m for m in PROBED if self._answers(scope, m)}
        if methods:
            methods.add("OPTIONS")
        if "GET" in methods:
            methods.add("HEAD")
        return methods

    async def _head(self, scope: Scope, receive: Receive, send: Send) -> None:
        """HEAD is GET without the body: the GET handler answers, its status and headers go out, its body not."""
        answered = False

        async def headers_only(message: Message) -> None:
            nonlocal answered
            if answered:
                raise _HeadAnswered
            if message["type"] == "http.response.body":
                answered = True
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        async def then_disconnected() -> Message:
            return {"type": "http.disconnect"} if answered else await receive()

        try:
            await self.app({**scope, "method": "GET"}, then_disconnected, headers_only)
        except _HeadAnswered:
            pass


def _allow(methods: set[str]) -> bytes:
    return ", ".join(sorted(methods)).encode()
