"""Errors a user can cause, and the handlers that turn them into JSON ``{"detail": "..."}``.

Code anywhere in the service raises a ``UserError`` subclass with a message that says what to fix;
the API answers with the subclass's status code and that message. A database that can't be reached
(connection refused or lost, timeouts, the pool exhausted) answers 503 with ``Retry-After``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("service")

DATABASE_UNAVAILABLE = (
    "The database is unreachable right now; try again in a few seconds (GET /readyz answers 200 once "
    "the service is ready again)."
)
DATABASE_RETRY_AFTER_S = 5


class UserError(Exception):
    """A request the user can fix. ``str(error)`` is the message returned to them."""

    status_code = 400


class BadRequest(UserError):
    """The request is malformed or unsafe (e.g. a zip entry with ``..``)."""

    status_code = 400


class NotFound(UserError):
    """The resource does not exist, or belongs to another tenant (never 403: ids don't leak)."""

    status_code = 404


class TooLarge(UserError):
    """The request exceeds a size or count limit."""

    status_code = 413


class TimedOut(UserError):
    """The client stopped sending the request's body (an upload that sent nothing for a while)."""

    status_code = 408


class Conflict(UserError):
    """The resource is not in a state that allows this (a job already finished, a set not ready)."""

    status_code = 409


class QuotaExceeded(UserError):
    """The tenant has as many queued jobs as its quota allows (``service.quotas``): 429 with
    ``Retry-After``, since waiting (for jobs to start) is one fix; the message names the others."""

    status_code = 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, int(retry_after_s)))}


class Unavailable(UserError):
    """A dependency (the job queue) is unreachable; the request may be retried later."""

    status_code = 503


class Overloaded(Unavailable):
    """This API process has as much of this kind of work as it takes at once (uploads:
    ``service.uploads.UploadGate``): 503 with ``Retry-After``. Nothing was done, so the same
    request may be sent again after the wait."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, int(retry_after_s)))}


class Invalid(UserError):
    """The request is well-formed but its content is unusable (corrupt images, one class, ...)."""

    status_code = 422


def _user_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UserError)
    headers = getattr(exc, "headers", None)  # e.g. QuotaExceeded's Retry-After
    return JSONResponse(status_code=exc.status_code, content={"detail": str(exc)}, headers=headers)


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc) or "request"


def _readable(err: dict[str, Any]) -> str:
    """One validation error as a person reads it: where, and what to do about it (pydantic's own
    wording for the checks that already say so, e.g. "Input should be greater than 0")."""
    where = _location(err.get("loc", ()))
    kind = err.get("type")
    if kind == "json_invalid":
        reason = (err.get("ctx") or {}).get("error") or "malformed"
        return f"the body is not valid JSON ({reason}); send a JSON object"
    if kind == "missing":
        return f"{where}: required; add it"
    if kind == "extra_forbidden":
        return f"{where}: unknown field; remove it (the schema at /docs lists the fields)"
    return f"{where}: {err.get('msg', 'invalid')}"


def readable_errors(errors: Any) -> str:
    """A list of validation errors (FastAPI's or pydantic's) as one line a person reads."""
    return "; ".join(_readable(err) for err in errors)


def _finite(obj: Any) -> Any:
    """JSON has no NaN or Infinity: a rejected input that held one (``1e400``, ``NaN``) is echoed
    back as its string, instead of failing to encode (a 500)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _validation_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    readable = readable_errors(errors)
    # FastAPI's list of errors stays available under "errors" for programs; "detail" is for people
    return JSONResponse(
        status_code=422,
        content={"detail": f"Invalid request: {readable}", "errors": _finite(jsonable_encoder(errors))},
    )


def _http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """HTTP errors as ``{"detail": ...}``; the router's bare "Not Found" / "Method Not Allowed"
    (a path or method no route serves) say where the endpoints are listed."""
    assert isinstance(exc, StarletteHTTPException)
    detail: Any = exc.detail
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"No endpoint {where}; check the path: the endpoints are listed at /docs."
    elif exc.status_code == 405 and detail == "Method Not Allowed":
        detail = (
            f"{request.method} is not allowed on {request.url.path}; use one of the methods listed at /docs."
        )
    elif exc.status_code == 400 and detail == "There was an error parsing the body":  # FastAPI's own
        detail = "The body could not be read; send UTF-8 JSON with `Content-Type: application/json`."
    return JSONResponse(status_code=exc.status_code, content={"detail": detail}, headers=exc.headers)


def _database_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Database connection errors (``OperationalError``: refused, dropped, timed out, server
    shutting down; ``InterfaceError``; the pool's timeout): 503, never a 500 with a traceback."""
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    log.warning("%s %s: database unavailable: %s", request.method, request.url.path, first_line)
    return JSONResponse(
        status_code=503,
        content={"detail": DATABASE_UNAVAILABLE},
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    )


CONCURRENT_CHANGE = (
    "The request conflicted with a concurrent change (a row it refers to was removed or changed "
    "meanwhile); check that what it names still exists (e.g. `GET /v1/datasets`) and send it again."
)
UNSTORABLE_VALUE = (
    "The request holds a value the database cannot store (e.g. a NUL character or an out-of-range "
    "number); remove it and send the request again."
)


def _integrity_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A constraint the routes' own checks did not foresee (a row removed by a concurrent request
    between the check and the write): 409 with a message, never a plain-text 500."""
    log.warning(
        "%s %s: integrity error: %s", request.method, request.url.path, str(exc).splitlines()[0][:300]
    )
    return JSONResponse(status_code=409, content={"detail": CONCURRENT_CHANGE})


def _data_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A value the database refused (the schemas' checks should have refused it first): 422."""
    log.warning("%s %s: data error: %s", request.method, request.url.path, str(exc).splitlines()[0][:300])
    return JSONResponse(status_code=422, content={"detail": UNSTORABLE_VALUE})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(UserError, _user_error_handler)
    for error in (OperationalError, InterfaceError, PoolTimeoutError):
        app.add_exception_handler(error, _database_error_handler)
    app.add_exception_handler(IntegrityError, _integrity_error_handler)
    app.add_exception_handler(DataError, _data_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
