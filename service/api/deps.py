"""Typed dependencies for route handlers: ``SessionDep``, ``SettingsDep``, ``CurrentTenant``."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import ApiKey, Tenant, utcnow
from service.security import api_key_matches, api_key_prefix
from service.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer kt_...`")


def get_db(request: Request) -> Iterator[Session]:
    """One session per request from the app's session factory, closed afterwards."""
    with request.app.state.session_factory() as session:
        yield session


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED, detail=message, headers={"WWW-Authenticate": "Bearer"}
    )


def get_current_tenant(
    session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Tenant:
    """The tenant owning the request's API key; 401 when the key is missing, unknown or revoked."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized("Missing API key: send `Authorization: Bearer <key>`.")
    key = credentials.credentials
    prefix = api_key_prefix(key)
    if prefix is None:
        raise _unauthorized("Invalid API key: expected the form `kt_<prefix>_<secret>`.")
    candidates = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).all()
    match = next((row for row in candidates if api_key_matches(key, row.key_hash)), None)
    if match is None:
        raise _unauthorized("Invalid API key: no such key; check it or ask for a new one.")
    if match.revoked_at is not None:
        raise _unauthorized("This API key was revoked; ask for a new one.")
    tenant = session.get(Tenant, match.tenant_id)
    if tenant is None:  # the tenant was deleted between the two reads
        raise _unauthorized("Invalid API key: its tenant no longer exists.")
    # A write per request would make every status poll a transaction; a minute's precision is enough.
    now = utcnow()
    if match.last_used_at is None or now - match.last_used_at > LAST_USED_PRECISION:
        match.last_used_at = now
        session.commit()
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]
LAST_USED_PRECISION = timedelta(minutes=1)
