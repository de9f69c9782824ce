"""Typed dependencies for route handlers: ``SessionDep``, ``ReadSessionDep``, ``SettingsDep``,
``CurrentTenant``.

``CurrentTenant`` is on every authenticated request's path, so its common case costs no database
round trip: keys that authenticated in the last ``API_KEY_CACHE_TTL_S`` seconds are served from
the app's ``ApiKeyCache`` (see ``service.security``; a revocation takes effect within that TTL).
It also applies the per-key rate limit (``service.ratelimit``: 429 with ``Retry-After``), so every
authenticated route is limited and the unauthenticated ones (/healthz, /readyz, /metrics) are not.
Failed authentications are limited per client address (``check_auth_failures``): every lookup of
an unknown key is a database query, so an address past ``KT_AUTH_FAILURES_PER_MIN`` gets 429 before
any lookup, whatever key it sends, until its bucket refills.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session, make_transient_to_detached, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.db.models import ApiKey, Tenant, utcnow
from service.db.session import make_session_factory
from service.ratelimit import RateLimiter
from service.security import ApiKeyCache, api_key_matches, api_key_prefix, hash_api_key
from service.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer kt_...`")
# A write per request would make every status poll a transaction; a minute's precision is enough.
LAST_USED_PRECISION = timedelta(minutes=1)


def get_db(request: Request) -> Iterator[Session]:
    """One session per request from the app's session factory, closed afterwards."""
    with request.app.state.session_factory() as session:
        yield session


def read_session_factory(app: FastAPI) -> sessionmaker[Session]:
    """The app's session factory for read-only requests: same engine and pool, but AUTOCOMMIT, so
    a read is one round trip (no BEGIN before it, no ROLLBACK when the session closes)."""
    factory: sessionmaker[Session] | None = getattr(app.state, "read_session_factory", None)
    if factory is None:
        engine = app.state.session_factory.kw.get("bind") or app.state.engine
        factory = make_session_factory(engine.execution_options(isolation_level="AUTOCOMMIT"))
        app.state.read_session_factory = factory
    return factory


async def get_read_db(request: Request) -> AsyncIterator[Session]:
    """A read-only session (see ``read_session_factory``). Opening it does no I/O; closing it
    returns an idle autocommit connection to the pool, which sends nothing to the server either,
    so neither needs a threadpool hop. Only for handlers that do not write."""
    session = read_session_factory(request.app)()
    try:
        yield session
    finally:
        session.close()


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SessionDep = Annotated[Session, Depends(get_db)]
ReadSessionDep = Annotated[Session, Depends(get_read_db)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED, detail=message, headers={"WWW-Authenticate": "Bearer"}
    )


@dataclass(frozen=True)
class TenantSnapshot:
    """What the key cache keeps of a tenant: its column values, not an ORM object, so no
    instance is shared between requests (each gets its own detached ``Tenant``)."""

    id: str
    name: str
    created_at: datetime

    @classmethod
    def of(cls, tenant: Tenant) -> TenantSnapshot:
        return cls(id=tenant.id, name=tenant.name, created_at=tenant.created_at)

    def tenant(self) -> Tenant:
        tenant = Tenant(id=self.id, name=self.name, created_at=self.created_at)
        make_transient_to_detached(tenant)  # as if loaded by a session that has since closed
        return tenant


def api_key_cache(app: FastAPI) -> ApiKeyCache[TenantSnapshot]:
    """The app's key cache (created on first use; one per app, so per API process)."""
    cache: ApiKeyCache[TenantSnapshot] | None = getattr(app.state, "api_key_cache", None)
    if cache is None:
        cache = ApiKeyCache()
        app.state.api_key_cache = cache
    return cache


def rate_limiter(app: FastAPI) -> RateLimiter:
    """The app's per-key rate limiter (created on first use from its settings; one per process)."""
    limiter: RateLimiter | None = getattr(app.state, "rate_limiter", None)
    if limiter is None:
        settings: Settings = app.state.settings
        limiter = RateLimiter(settings.rate_limit_per_min, settings.rate_limit_burst)
        app.state.rate_limiter = limiter
    return limiter


def check_rate_limit(app: FastAPI, key: str) -> None:
    """Count one request of ``key``; 429 with ``Retry-After`` (seconds) when its bucket is empty."""
    check_rate_limit_of_hash(app, hash_api_key(key))


def check_rate_limit_of_hash(app: FastAPI, key_hash: str) -> None:
    """``check_rate_limit`` for a key known by its stored hash (a ``/ui`` session's key)."""
    limiter = rate_limiter(app)
    if not limiter.enabled:
        return
    decision = limiter.hit(key_hash)
    if not decision.allowed:
        wait = decision.retry_after_header
        raise HTTPException(
            status_code=status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"Too many requests with this API key: the limit is {limiter.describe()}. "
            f"Retry in {wait} s (the Retry-After header), and poll less often.",
            headers={"Retry-After": wait},
        )


def auth_failure_limiter(app: FastAPI) -> RateLimiter:
    """The app's limiter of failed authentications, keyed by client address (one per process)."""
    limiter: RateLimiter | None = getattr(app.state, "auth_failure_limiter", None)
    if limiter is None:
        settings: Settings = app.state.settings
        limiter = RateLimiter(settings.auth_failures_per_min, settings.auth_failures_burst)
        app.state.auth_failure_limiter = limiter
    return limiter


def client_address(request: Request) -> str:
    """The client's address as uvicorn reports it (behind a proxy, the one its ``X-Forwarded-For``
    names when uvicorn trusts the proxy: ``--forwarded-allow-ips``)."""
    return request.client.host if request.client else "unknown"


def check_auth_failures(request: Request) -> None:
    """429 with ``Retry-After`` when the client's address failed authentication more often than
    its limit allows, before any lookup (so a stream of unknown keys costs no database queries)."""
    limiter = auth_failure_limiter(request.app)
    decision = limiter.peek(client_address(request))
    if not decision.allowed:
        wait = decision.retry_after_header
        raise HTTPException(
            status_code=status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"Too many failed authentications from this address: the limit is "
            f"{limiter.per_min:g} a minute, in bursts of at most {limiter.burst}. Check the API key "
            f"(a revoked or mistyped key fails every time) and retry in {wait} s (the Retry-After header).",
            headers={"Retry-After": wait},
        )


def count_auth_failure(request: Request) -> None:
    """Charge one failed authentication to the client's address."""
    auth_failure_limiter(request.app).hit(client_address(request))


async def resolve_key(request: Request, key: str) -> TenantSnapshot:
    """The tenant of ``key``: from the key cache, else looked up in the threadpool (unless the
    client's address is past its failed-authentication limit: 429). 401 when the key is malformed,
    unknown or revoked, and that failure is charged to the address."""
    cache = api_key_cache(request.app)
    snapshot = cache.get(key)
    if snapshot is None:
        check_auth_failures(request)
        try:
            snapshot = await run_in_threadpool(lookup_tenant, request.app.state.session_factory, key)
        except HTTPException as err:
            if err.status_code == status.HTTP_401_UNAUTHORIZED:
                count_auth_failure(request)
            raise
        cache.put(key, snapshot)
    return snapshot


def lookup_tenant(session_factory: Any, key: str) -> TenantSnapshot:
    """The database half of authentication: the tenant owning ``key``; 401 when the key is
    malformed, unknown or revoked. Also records ``last_used_at`` (at most once a minute)."""
    prefix = api_key_prefix(key)
    if prefix is None:
        raise _unauthorized("Invalid API key: expected the form `kt_<prefix>_<secret>`.")
    with session_factory() as session:
        candidates = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).all()
        match = next((row for row in candidates if api_key_matches(key, row.key_hash)), None)
        if match is None:
            raise _unauthorized("Invalid API key: no such key; check it or ask for a new one.")
        if match.revoked_at is not None:
            raise _unauthorized("This API key was revoked; ask for a new one.")
        tenant = session.get(Tenant, match.tenant_id)
        if tenant is None:  # the tenant was deleted between the two reads
            raise _unauthorized("Invalid API key: its tenant no longer exists.")
        snapshot = TenantSnapshot.of(tenant)
        now = utcnow()
        if match.last_used_at is None or now - match.last_used_at > LAST_USED_PRECISION:
            match.last_used_at = now
            session.commit()
    return snapshot


async def get_current_tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Tenant:
    """The tenant owning the request's API key; 401 when the key is missing, unknown or revoked.

    A key seen in the last ``API_KEY_CACHE_TTL_S`` seconds is answered from the cache, on the event
    loop, with no database access; otherwise the lookup runs in the threadpool, in its own session.
    Then the key's rate limit: 429 with ``Retry-After`` once it is spent (see ``check_rate_limit``);
    failed lookups are limited per client address (``resolve_key``)."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized("Missing API key: send `Authorization: Bearer <key>`.")
    key = credentials.credentials
    snapshot = await resolve_key(request, key)
    check_rate_limit(request.app, key)
    return snapshot.tenant()


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]
