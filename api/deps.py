"""Request-scoped dependencies: settings, a database session, the authenticated principal."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from core.auth import Principal, authenticate
from core.settings import Settings

bearer_scheme = _bearer = HTTPBearer(auto_error=False, description="API key: sct_<id>_<secret>")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request. Routes commit explicitly (before enqueueing); anything left is rolled back."""
    session: Session = request.app.state.sessions()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


def get_principal(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
) -> Principal:
    header = f"Bearer {creds.credentials}" if creds else request.headers.get("authorization")
    p = authenticate(session, header, request.app.state.settings.pepper)
    request.state.tenant_id = p.tenant_id
    return p


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
