"""The FastAPI application.

Run it with ``uvicorn --factory service.app:create_app`` (settings from ``KT_*`` variables).
``create_app(settings)`` builds an independent app (own engine, own metrics registry), which is
what the tests use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy.engine import make_url
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import install_error_handlers
from service.api.routes import api_router, health
from service.db.session import init_db, make_engine, make_session_factory
from service.settings import Settings, get_settings

API_PREFIX = "/v1"
log = logging.getLogger("service")


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


def create_app(settings: Settings | None = None, *, migrate: bool = True) -> FastAPI:
    """A new application. ``migrate`` runs ``alembic upgrade head`` at startup (off when the
    schema is managed separately, or to serve ``/readyz`` while the database is down)."""
    settings = settings or get_settings()
    connect_args: dict[str, Any] = {}
    if make_url(settings.database_url).get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = 5  # readiness checks must not hang on a dead server
    engine = make_engine(settings.database_url, connect_args=connect_args)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if migrate:
            init_db(settings.database_url)
        yield
        engine.dispose()

    app = FastAPI(
        title="vfm-kt",
        summary="Distill a vision foundation model into a small model for your labeled images.",
        version="0.1.0",
        docs_url="/docs",
        openapi_url=f"{API_PREFIX}/openapi.json",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.metrics_registry = CollectorRegistry()
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, registry=app.state.metrics_registry)
    app.include_router(health.router)
    app.include_router(api_router, prefix=API_PREFIX)
    return app
