"""The FastAPI application.

Run it with ``uvicorn --factory service.app:create_app`` (settings from ``KT_*`` variables).
``create_app(settings)`` builds an independent app (own engine, own metrics registry), which is
what the tests use.

Startup never dies of a database that is down (a supervisor would restart the process in a loop):
the app starts anyway, answers 503 on everything but ``/healthz`` and ``/metrics`` (``/readyz``
says why), and migrates in the background as soon as the database answers. At startup and then
every ``service.cleanup.SWEEP_INTERVAL_S`` it removes what killed uploads left behind. A thread
sends the job-finished webhooks that are due (``service.webhooks``).
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import cleanup, ingest, storage, webhooks
from service.api.docs import install_docs
from service.api.errors import DATABASE_RETRY_AFTER_S, install_error_handlers
from service.api.openapi import install_openapi
from service.api.routes import api_router, health
from service.api.routes.health import check_database
from service.db.session import init_db, make_engine, make_session_factory
from service.redact import RedactPaths
from service.settings import Settings, get_settings
from service.ui import install_ui

API_PREFIX = "/v1"
log = logging.getLogger("service")
MIGRATE_RETRY_S = 2.0
# answered while the schema is not migrated yet (everything else waits for the database)
UNGATED_PATHS = frozenset({"/healthz", "/metrics"})


class SchemaState:
    """Whether the database schema is known to be migrated; until then, why not."""

    def __init__(self, ready: bool) -> None:
        self.ready = ready
        self.problem = ""


class SchemaGate:
    """503 for every request but ``UNGATED_PATHS`` while the schema is not migrated (the database
    was unreachable at startup). Costs one attribute read per request once it is."""

    def __init__(self, app: ASGIApp, state: SchemaState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.state.ready or scope["type"] != "http" or scope["path"] in UNGATED_PATHS:
            await self.app(scope, receive, send)
            return
        why = f"not migrated yet: {self.state.problem or 'waiting for the database'}"
        detail = (
            f"The service is not ready: database {why}. It migrates as soon as the database answers; "
            "try again in a few seconds."
        )
        content: dict[str, Any] = {"detail": detail}
        if scope["path"] == "/readyz":
            content = {"status": "unavailable", "detail": detail, "failed": {"database": why}}
        response = JSONResponse(
            status_code=503, content=content, headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)}
        )
        await response(scope, receive, send)


NUL_IN_URL = (
    "The URL holds a NUL character (%00) in its path or query, and no id or name has one: remove it "
    "(check the link, or the id you pasted)."
)


class RejectNulInUrl:
    """422 for a request whose path or query holds a NUL character, before routing, authentication
    or any other work: PostgreSQL text cannot hold one, so an id such as ``/v1/jobs/a%00b`` would
    otherwise reach the database and fail there. One check for every path parameter of ``/v1`` and
    ``/ui``; NUL in JSON bodies is refused by the request schemas, in upload fields by
    ``service.uploads``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and ("\x00" in scope["path"] or b"%00" in scope["query_string"]):
            response = JSONResponse(status_code=422, content={"detail": NUL_IN_URL})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _migrate_when_reachable(url: str, state: SchemaState, stop: threading.Event) -> None:
    """Retry ``init_db`` every ``MIGRATE_RETRY_S`` until it works (background thread)."""
    while not stop.wait(MIGRATE_RETRY_S):
        try:
            init_db(url)
        except (OperationalError, InterfaceError) as err:
            state.problem = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            continue
        except Exception as err:  # a broken migration: say so on /readyz, keep the process up
            log.exception("migrating the database failed")
            state.problem = f"migration failed: {type(err).__name__}: {err}"[:300]
            continue
        state.ready = True
        log.info("database reachable again: schema migrated, serving requests")
        return


def _sweep_periodically(data_dir: Path, stop: threading.Event) -> None:
    while True:
        try:
            cleanup.sweep(data_dir)
        except Exception:  # never let housekeeping take the API down
            log.exception("cleanup of leftover uploads failed")
        if stop.wait(cleanup.SWEEP_INTERVAL_S):
            return


class MetricsMiddleware:
    """Counts requests and times them, labelled by route template (``/v1/datasets/{dataset_id}``),
    never by raw path, so label cardinality stays bounded."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "kt_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=registry
        )
        self.latency = Histogram(
            "kt_http_request_duration_seconds", "HTTP request latency", ["method", "route"], registry=registry
        )

    @staticmethod
    def _route(scope: Scope) -> str:
        """The matched route's template, rebuilt from the path and its parameters (this works
        however routers are nested); ``unmatched`` for paths no route answered."""
        if "endpoint" not in scope:
            return "unmatched"
        names = {str(value): name for name, value in scope.get("path_params", {}).items()}
        segments = scope["path"].split("/")
        return "/".join(f"{{{names[seg]}}}" if seg in names else seg for seg in segments)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = self._route(scope)
            self.requests.labels(scope["method"], route, str(status)).inc()
            self.latency.labels(scope["method"], route).observe(time.perf_counter() - start)


_startup_frozen = False


def freeze_startup_objects() -> None:
    """Once per process, at the first app's startup: what exists then (imported modules, the app
    and its routes) lives as long as the process, so it is frozen out of the collector's sight
    (``gc.freeze``); a full collection then no longer scans ~100k objects, which paused every
    request in flight for 30-100 ms (the status poll's max latency)."""
    global _startup_frozen
    if not _startup_frozen:
        _startup_frozen = True
        gc.collect()
        gc.freeze()


def create_app(settings: Settings | None = None, *, migrate: bool = True) -> FastAPI:
    """A new application. ``migrate`` runs ``alembic upgrade head`` at startup (off when the
    schema is managed separately, or to serve ``/readyz`` while the database is down)."""
    settings = settings or get_settings()
    if settings.gil_switch_interval_ms is not None:
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    # PostgreSQL: connect timeout, keepalives and a gate after failures (service.db.session)
    engine = make_engine(
        settings.database_url,
        **(
            {"pool_size": settings.db_pool_size, "max_overflow": settings.db_max_overflow}
            if settings.database_url.startswith("postgresql")
            else {}
        ),
    )
    schema = SchemaState(ready=not migrate)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        storage.secure_data_dir(settings.data_dir)  # umask 077, the data dir 0700
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=_sweep_periodically,
                args=(settings.data_dir, stop),
                name="kt-cleanup",
                daemon=True,
            )
        ]
        if settings.webhook_poll_interval_s > 0:  # job-finished notifications (service.webhooks)
            threads.append(
                threading.Thread(
                    target=webhooks.dispatch_periodically,
                    args=(settings, stop),
                    name="kt-webhooks",
                    daemon=True,
                )
            )
        if migrate:
            problem = check_database(engine)
            if problem is None:
                try:
                    init_db(settings.database_url)
                    schema.ready = True
                except (OperationalError, InterfaceError) as err:  # it went away meanwhile
                    problem = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            if problem is not None:
                log.warning("database unreachable at startup (%s): answering 503 until it is back", problem)
                schema.problem = problem
                threads.append(
                    threading.Thread(
                        target=_migrate_when_reachable,
                        args=(settings.database_url, schema, stop),
                        name="kt-migrate",
                        daemon=True,
                    )
                )
        for thread in threads:
            thread.start()
        await ingest.warm_up(settings)  # the upload processes (service.ingest), from this thread
        freeze_startup_objects()
        try:
            yield
        finally:
            stop.set()
            try:
                await run_in_threadpool(ingest.shutdown)  # no ingest process outlives the app
            finally:
                engine.dispose()

    app = FastAPI(
        title="vfm-kt",
        summary="Distill a vision foundation model into a small model for your labeled images.",
        version="0.1.0",
        docs_url=None,  # served by install_docs, with local files instead of a CDN's
        redoc_url=None,
        openapi_url=f"{API_PREFIX}/openapi.json",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.metrics_registry = CollectorRegistry()
    app.state.schema = schema
    install_error_handlers(app)
    install_openapi(app)
    install_docs(app)  # /docs and /redoc
    app.add_middleware(SchemaGate, state=schema)
    app.add_middleware(RejectNulInUrl)  # outside the gate: answered while the database is down too
    # what a tenant reads never names a server path (service.redact)
    app.add_middleware(RedactPaths, settings=settings, session_factory=app.state.session_factory)
    app.add_middleware(MetricsMiddleware, registry=app.state.metrics_registry)
    app.include_router(health.router)
    app.include_router(api_router, prefix=API_PREFIX)
    install_ui(app)  # the web pages under /ui
    return app
