"""Cookie authentication for the web pages.

The login form takes an API key; once it authenticates (the same lookup as ``Authorization: Bearer``,
``service.api.deps``), the key is kept in a ``Secure``, ``HttpOnly``, ``SameSite=Strict`` cookie
scoped to ``/ui``, and every page authenticates it again exactly like the API does (the key cache,
the database lookup, revocation, the per-key rate limit). Nothing else is stored: logging out clears
the cookie, revoking the key ends the session within the key cache's TTL.

A missing or invalid cookie raises ``LoginRequired`` (a redirect to the login page); another tenant's
or an unknown id raises ``PageNotFound`` (a 404 page that says no more than the API's 404 does).
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from service.api.deps import api_key_cache, check_rate_limit, lookup_tenant
from service.db.models import Tenant

COOKIE_NAME = "kt_ui_key"
COOKIE_PATH = "/ui"
COOKIE_MAX_AGE_S = 8 * 3600


class LoginRequired(Exception):
    """No valid key in the cookie: the page redirects to the login form (and back afterwards)."""

    def __init__(self, next_path: str, message: str = "") -> None:
        super().__init__(message or "log in")
        self.next_path = next_path
        self.message = message


class PageNotFound(Exception):
    """An unknown id, or one of another tenant (never distinguished)."""


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


async def authenticate(request: Request, key: str) -> Tenant:
    """The tenant owning ``key``, as ``get_current_tenant`` decides it; ``HTTPException`` 401/429."""
    cache = api_key_cache(request.app)
    snapshot = cache.get(key)
    if snapshot is None:
        snapshot = await run_in_threadpool(lookup_tenant, request.app.state.session_factory, key)
        cache.put(key, snapshot)
    check_rate_limit(request.app, key)
    return snapshot.tenant()


async def get_ui_tenant(request: Request) -> Tenant:
    """The tenant of the key in the cookie, or ``LoginRequired``."""
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    key = request.cookies.get(COOKIE_NAME)
    if not key:
        raise LoginRequired(path)
    try:
        return await authenticate(request, key)
    except HTTPException as err:
        if err.status_code == 429:
            raise TooManyRequests(str(err.detail), (err.headers or {}).get("Retry-After", "1")) from err
        raise LoginRequired(path, str(err.detail)) from err


UiTenant = Annotated[Tenant, Depends(get_ui_tenant)]
