"""Request-scoped dependencies: settings, the request's unit of work, the authenticated principal, the queue."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from core.auth import Principal, authenticate
from core.db.engine import unit_of_work
from core.jobs.queue import JobQueue
from core.settings import Settings

bearer_scheme = _bearer = HTTPBearer(auto_error=False, description="API key: sct_<id>_<secret>")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


def get_session(request: Request) -> Iterator[Session]:
    """One unit of work per request: committed once the endpoint has returned (and its response is built),
    before the response is sent, then the after-commit hooks run (publishing new jobs); rolled back on error."""
    with unit_of_work(request.app.state.sessions) as session:
        yield session


# scope="function": leave the dependency right after the endpoint, so a failed commit is the response
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_principal(
    request: Request,
    session: SessionDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
) -> Principal:
    header = f"Bearer {creds.credentials}" if creds else request.headers.get("authorization")
    p = authenticate(session, header, request.app.state.settings.pepper)
    request.state.tenant_id = p.tenant_id
    return p


SettingsDep = Annotated[Settings, Depends(get_settings)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
