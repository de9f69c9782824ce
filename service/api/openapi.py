"""The OpenAPI schema as the API really answers (checked by tests/reliability/test_fuzz.py).

FastAPI's generated schema is adjusted in three ways:
- error bodies: every 4xx/5xx response is ``{"detail": "<what to fix>"}`` (``ErrorDetail``); the
  422 of a request that fails validation also carries FastAPI's list under ``errors``
  (``HTTPValidationError``, whose ``detail`` is a message here, not FastAPI's list);
- every operation that needs an API key documents 401 (missing, unknown or revoked key) and 429
  (the key's rate limit, with ``Retry-After``), which the auth dependency answers on any route;
- the ``/v1`` operations declare the bearer scheme they need (``HTTPBearer``);
- an operation with a body documents 400 (FastAPI answers it for a body it cannot parse at all).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

ERROR_DETAIL = "ErrorDetail"
JSON = "application/json"

_ERROR_DETAIL_SCHEMA: dict[str, Any] = {
    "title": ERROR_DETAIL,
    "type": "object",
    "properties": {
        "detail": {"title": "Detail", "type": "string", "description": "What went wrong and what to do."}
    },
    "required": ["detail"],
}
_VALIDATION_ERROR_SCHEMA: dict[str, Any] = {
    "title": "HTTPValidationError",
    "type": "object",
    "properties": {
        "detail": {"title": "Detail", "type": "string", "description": "Every problem, and what to do."},
        "errors": {
            "title": "Errors",
            "type": "array",
            "items": {"type": "object"},
            "description": "FastAPI's list of validation errors (loc, msg, type), for programs.",
        },
    },
    "required": ["detail"],
}
_UNAUTHORIZED: dict[str, Any] = {
    "description": "Missing, unknown or revoked API key (`Authorization: Bearer kt_...`).",
    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "`Bearer`"}},
}
_TOO_MANY: dict[str, Any] = {
    "description": "This API key's rate limit is spent (`KT_RATE_LIMIT_PER_MIN`); retry after the wait.",
    "headers": {
        "Retry-After": {"schema": {"type": "integer", "minimum": 1}, "description": "Seconds to wait."}
    },
}


def _error_content(component: str) -> dict[str, Any]:
    return {JSON: {"schema": {"$ref": f"#/components/schemas/{component}"}}}


def fix_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """Adjust a generated schema in place (see the module docstring); returns it."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components[ERROR_DETAIL] = _ERROR_DETAIL_SCHEMA
    components["HTTPValidationError"] = _VALIDATION_ERROR_SCHEMA
    bearer = [
        name
        for name, s in schema["components"].get("securitySchemes", {}).items()
        if s.get("scheme") == "bearer"
    ]
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses: dict[str, Any] = operation["responses"]
            if "requestBody" in operation:  # a body that is not even text (FastAPI's own 400)
                responses.setdefault("400", {"description": "The body could not be read."})
            if path.startswith("/v1/"):
                responses.setdefault("401", {}).update(_UNAUTHORIZED)
                responses.setdefault("429", {}).update(_TOO_MANY)
                if bearer and "security" not in operation:
                    operation["security"] = [{bearer[0]: []}]
            for code, response in responses.items():
                if code == "422":  # FastAPI's, or a route's own 422 (``{"detail"}`` fits it too)
                    response["content"] = _error_content("HTTPValidationError")
                elif code[0] in "45":
                    response.setdefault("description", "Error")
                    response["content"] = _error_content(ERROR_DETAIL)
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve ``fix_openapi`` of FastAPI's schema at the app's openapi URL (built once, cached)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = fix_openapi(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
