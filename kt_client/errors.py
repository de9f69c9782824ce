"""Errors of the client: the server said no (``APIError`` and its subclasses, one per status), or
it could not be reached (``ServerUnreachable``; ``DownloadFailed`` when it stopped mid-download)."""

from __future__ import annotations

import json
from typing import Any


class KTError(Exception):
    """Any error of ``kt_client``."""


class ServerUnreachable(KTError):
    """No answer from the server: connection refused, DNS, a timeout."""


class DownloadFailed(ServerUnreachable):
    """A download broke off after it started (the connection dropped mid-stream); nothing was saved."""


class APIError(KTError):
    """The server answered with an error status. ``detail`` is the server's own message, verbatim."""

    def __init__(self, status_code: int, detail: str, *, method: str = "", url: str = "", body: Any = None):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.method = method
        self.url = url
        self.body = body

    def __str__(self) -> str:
        return self.detail


class BadRequest(APIError):
    """400: the request is malformed or unsafe."""


class AuthenticationError(APIError):
    """401: no API key, or one the server does not know (revoked?)."""


class PermissionDenied(APIError):
    """403: the key may not do this (e.g. /v1/admin without an admin key)."""


class NotFound(APIError):
    """404: no such resource (or it belongs to another tenant)."""


class Conflict(APIError):
    """409: the resource is not in a state that allows this."""


class PayloadTooLarge(APIError):
    """413: an upload over the server's limits."""


class ValidationError(APIError):
    """422: the request's content is unusable (bad parameters, corrupt images, ...)."""


class RateLimited(APIError):
    """429: too many requests, still after the client's bounded retries."""


class ServerError(APIError):
    """5xx: the server failed (503: a dependency is unreachable; try again later)."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationError,
    429: RateLimited,
}


def error_for(status_code: int, content: bytes, *, method: str = "", url: str = "") -> APIError:
    """The ``APIError`` for a response: the server's ``{"detail": ...}`` message when it sent one."""
    body: Any = None
    detail = ""
    try:
        body = json.loads(content)
    except ValueError:
        detail = content.decode("utf-8", "replace").strip()
    if isinstance(body, dict) and "detail" in body:
        raw = body["detail"]
        detail = raw if isinstance(raw, str) else json.dumps(raw)
    elif body is not None and not detail:
        detail = json.dumps(body)
    if not detail:
        detail = f"HTTP {status_code} from {method} {url}".strip()
    cls = _BY_STATUS.get(status_code, ServerError if status_code >= 500 else APIError)
    return cls(status_code, detail, method=method, url=url, body=body)
