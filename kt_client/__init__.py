"""vfm-kt clients: the ``kt`` command line (``kt_client.cli``) and the HTTP client of the service.

    from kt_client import Client, AsyncClient, APIError

The HTTP client (httpx) is imported on first use, so ``kt --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kt_client.errors import (
    APIError,
    AuthenticationError,
    BadRequest,
    Conflict,
    DownloadFailed,
    KTError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    ServerError,
    ServerUnreachable,
    ValidationError,
)

if TYPE_CHECKING:
    from kt_client.client import AsyncClient, Client

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequest",
    "Client",
    "Conflict",
    "DownloadFailed",
    "KTError",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "RateLimited",
    "ServerError",
    "ServerUnreachable",
    "ValidationError",
]


def __getattr__(name: str) -> Any:
    if name in ("Client", "AsyncClient"):
        from kt_client import client

        return getattr(client, name)
    raise AttributeError(f"module 'kt_client' has no attribute {name!r}")
