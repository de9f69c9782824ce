"""Unversioned operational endpoints: ``/healthz`` (alive), ``/readyz`` (dependencies and workers),
``/metrics``."""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from service.settings import Settings
from service.workers import readiness

router = APIRouter(tags=["health"])

BROKER_TIMEOUT_S = 1.0


def check_database(engine: Engine) -> str | None:
    """``None`` when ``SELECT 1`` works, else why not."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as err:  # any driver error means "not ready"; the message says which
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return None


def _redis_ping(url: str) -> str | None:
    parts = urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or 6379
    try:
        with socket.create_connection((host, port), timeout=BROKER_TIMEOUT_S) as raw:
            sock: socket.socket = raw
            if parts.scheme == "rediss":
                sock = ssl.create_default_context().wrap_socket(raw, server_hostname=host)
            sock.settimeout(BROKER_TIMEOUT_S)
            if parts.password:
                user = unquote(parts.username) if parts.username else None
                args = [b"AUTH", *([user.encode()] if user else []), unquote(parts.password).encode()]
                sock.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
                if not sock.recv(256).startswith(b"+OK"):
                    return f"redis at {host}:{port} refused the credentials"
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = sock.recv(256)
    except OSError as err:
        return f"redis at {host}:{port} unreachable ({err})"
    if not reply.startswith(b"+PONG"):
        return f"redis at {host}:{port} answered {reply[:80]!r} to PING"
    return None


def check_broker(url: str) -> str | None:
    """``None`` when the Celery broker looks usable, else why not."""
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss"):
        return _redis_ping(url)
    if scheme.startswith("sqla+sqlite"):
        db_path = Path(url.split("///", 1)[1]) if "///" in url else None
        if db_path is None:
            return f"can't read a file path from broker URL {url!r}"
        directory = db_path.parent
        if not directory.is_dir():
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                return f"broker directory {directory} can't be created ({err})"
        if not os.access(directory, os.W_OK):
            return f"broker directory {directory} is not writable"
        return None
    parts = urlsplit(url)  # other brokers (amqp, ...): can we open a TCP connection?
    if not parts.hostname:
        return None
    try:
        socket.create_connection((parts.hostname, parts.port or 5672), timeout=BROKER_TIMEOUT_S).close()
    except OSError as err:
        return f"broker at {parts.hostname}:{parts.port} unreachable ({err})"
    return None


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


def check_workers(engine: Engine, settings: Settings) -> tuple[int | None, str | None]:
    """(workers alive, ``None`` or why too few are for ``KT_READY_MIN_WORKERS``), from the
    workers' heartbeats in the shared database (``service.workers``), so workers on other
    machines count as much as local ones."""
    try:
        with Session(engine) as session:
            return readiness(session, settings)
    except Exception as err:  # e.g. the schema predates the workers table
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        return None, f"worker heartbeats unreadable ({type(err).__name__}: {first_line})"


@router.get(
    "/readyz", responses={503: {"description": "a dependency is not reachable, or no worker is alive"}}
)
def readyz(request: Request) -> JSONResponse:
    """The database answers, the broker is reachable and enough workers are alive (see
    ``KT_READY_MIN_WORKERS``); 503 names what failed. The body says how many workers are alive."""
    failures: dict[str, str] = {}
    settings = request.app.state.settings
    alive: int | None = None
    if problem := check_database(request.app.state.engine):
        failures["database"] = problem
    else:
        alive, problem = check_workers(request.app.state.engine, settings)
        if problem:
            failures["workers"] = problem
    if problem := check_broker(settings.broker_url):
        failures["broker"] = problem
    if failures:
        detail = "Not ready: " + "; ".join(f"{name}: {why}" for name, why in failures.items())
        content = {"status": "unavailable", "detail": detail, "failed": failures, "workers_alive": alive}
        return JSONResponse(status_code=503, content=content)
    return JSONResponse(content={"status": "ok", "workers_alive": alive})


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
