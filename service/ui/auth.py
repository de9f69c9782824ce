"""Session authentication for the web pages.

The login form takes an API key; once it authenticates (the same lookup as ``Authorization: Bearer``,
``service.api.deps``: the key cache, revocation, the per-key rate limit, the per-address limit on
failed authentications), the server opens a session: a row in ``ui_sessions`` keyed by the sha256 of
a random token, and the token (never the key) goes into a ``Secure``, ``HttpOnly``,
``SameSite=Strict`` cookie scoped to ``/ui``. Every page looks the session up (one query, no cache,
so a logout or a revocation is seen at once by every API process), checks its key is not revoked and
charges the key's rate limit. Logging out deletes the row, so a copied cookie is dead too; a session
ends by itself after ``COOKIE_MAX_AGE_S``.

A missing or ended session raises ``LoginRequired`` (a redirect to the login page); another tenant's
or an unknown id raises ``PageNotFound`` (a 404 page that says no more than the API's 404 does).
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy import delete, select
from starlette.concurrency import run_in_threadpool

from service.api.deps import (
    TenantSnapshot,
    check_auth_failures,
    check_rate_limit,
    check_rate_limit_of_hash,
    count_auth_failure,
    read_session_factory,
    resolve_key,
)
from service.db.models import ApiKey, Tenant, UiSession, utcnow
from service.security import hash_api_key

COOKIE_NAME = "kt_ui_session"
# what the cookie was called when it held the API key itself: cleared at login and logout
LEGACY_COOKIE_NAME = "kt_ui_key"
COOKIE_PATH = "/ui"
COOKIE_MAX_AGE_S = 8 * 3600
MAX_TOKEN_CHARS = 100  # a longer cookie is no token of ours: refused without a lookup
SESSION_ENDED = "Your session ended (you logged out, it expired, or its API key was revoked); log in again."


class LoginRequired(Exception):
    """No live session in the cookie: the page redirects to the login form (and back afterwards)."""

    def __init__(self, next_path: str, message: str = "") -> None:
        super().__init__(message or "log in")
        self.next_path = next_path
        self.message = message


class PageNotFound(Exception):
    """An unknown id, or one of another tenant (never distinguished)."""


class FormRefused(Exception):
    """A form post that is not this session's own (another site's, or a stale page's): 403."""


FORM_TOKEN_FIELD = "csrf"


def form_token(session_token: str) -> str:
    """The hidden field every form of the pages carries, bound to the session: a page of another
    site can neither read it (the cookie is HttpOnly, the pages are same-origin) nor guess it.
    Not the session's row id (``_token_hash``), so a leaked form token opens no session."""
    return hashlib.sha256(f"kt-ui-form:{session_token}".encode()).hexdigest()


def form_token_matches(request: Request, value: str | None) -> bool:
    token = request.cookies.get(COOKIE_NAME) or ""
    return bool(token and value) and secrets.compare_digest(str(value), form_token(token))


class TooManyRequests(Exception):
    def __init__(self, message: str, retry_after: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def login_url(next_path: str = "") -> str:
    if next_path.startswith("/ui/") and not next_path.startswith("/ui/login"):
        return f"/ui/login?next={quote(next_path, safe='/')}"
    return "/ui/login"


def safe_next(next_path: str | None) -> str:
    """Where to go after logging in: only a page of this UI (never another site)."""
    if next_path and next_path.startswith("/ui/") and not next_path.startswith("//"):
        return next_path
    return "/ui/jobs"


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def open_session(session_factory: Any, key: str) -> str:
    """Open a session for ``key`` (already authenticated); its token, for the cookie. Sessions that
    expired (of anyone) are removed on the way, so the table does not grow with old logins."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    with session_factory() as session:
        api_key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key)))
        if api_key is None:  # deleted since it authenticated
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "Invalid API key: no such key; check it.")
        session.execute(delete(UiSession).where(UiSession.expires_at < now))
        session.add(
            UiSession(
                id=_token_hash(token),
                api_key_id=api_key.id,
                created_at=now,
                expires_at=now + timedelta(seconds=COOKIE_MAX_AGE_S),
            )
        )
        session.commit()
    return token


def lookup_session(session_factory: Any, token: str) -> tuple[TenantSnapshot, str] | None:
    """The tenant and the key hash (for its rate limit) of a live session, or ``None`` when the
    token is unknown, logged out, expired, or its API key was revoked."""
    if len(token) > MAX_TOKEN_CHARS:
        return None
    with session_factory() as session:
        row = session.execute(
            select(UiSession, ApiKey, Tenant)
            .join(ApiKey, UiSession.api_key_id == ApiKey.id)
            .join(Tenant, ApiKey.tenant_id == Tenant.id)
            .where(UiSession.id == _token_hash(token))
        ).first()
        if row is None:
            return None
        ui_session, api_key, tenant = row
        if ui_session.expires_at <= utcnow() or api_key.revoked_at is not None:
            return None
        return TenantSnapshot.of(tenant), api_key.key_hash


def close_session(session_factory: Any, token: str) -> None:
    """Log out: the session's row is deleted, so its token (wherever the cookie was copied) is dead."""
    with session_factory() as session:
        session.execute(delete(UiSession).where(UiSession.id == _token_hash(token)))
        session.commit()


async def authenticate(request: Request, key: str) -> Tenant:
    """The tenant owning ``key``, as ``get_current_tenant`` decides it; ``HTTPException`` 401/429."""
    snapshot = await resolve_key(request, key)
    check_rate_limit(request.app, key)
    return snapshot.tenant()


def _too_many(err: HTTPException) -> TooManyRequests:
    return TooManyRequests(str(err.detail), (err.headers or {}).get("Retry-After", "1"))


async def get_ui_tenant(request: Request) -> Tenant:
    """The tenant of the session in the cookie, or ``LoginRequired``."""
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    token = request.cookies.get(COOKIE_NAME)
    if not token:
        raise LoginRequired(path)
    try:
        check_auth_failures(request)
    except HTTPException as err:
        raise _too_many(err) from err
    found = await run_in_threadpool(lookup_session, read_session_factory(request.app), token)
    if found is None:
        count_auth_failure(request)
        raise LoginRequired(path, SESSION_ENDED)
    snapshot, key_hash = found
    try:
        check_rate_limit_of_hash(request.app, key_hash)
    except HTTPException as err:
        raise _too_many(err) from err
    return snapshot.tenant()


UiTenant = Annotated[Tenant, Depends(get_ui_tenant)]
