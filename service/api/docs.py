"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) served with their scripts and styles from this
server, never a CDN: FastAPI's pages load them from cdn.jsdelivr.net, so a deployment without
internet access showed a blank page. The files come from the ``fastapi-offline`` package (Swagger UI
5, ReDoc 2, a favicon), mounted at ``DOCS_ASSETS``; ReDoc's Google fonts are left out (the page
falls back to the browser's fonts).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
DOCS_ASSETS = "/docs-assets"
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def install_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve the two documentation pages and their files (the app must be made with
    ``docs_url=None, redoc_url=None``, so FastAPI's CDN pages are not there too)."""
    missing = [name for name in ASSET_FILES if not (ASSETS_DIR / name).is_file()]
    if missing:
        raise RuntimeError(
            f"fastapi-offline ships no {', '.join(missing)} in {ASSETS_DIR}; reinstall it "
            "(`pip install --force-reinstall fastapi-offline`)."
        )
    app.mount(DOCS_ASSETS, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get(docs_url, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
        )

    @app.get(redoc_url, include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )


def _root(request: Request) -> str:
    """The prefix a proxy serves the app under (``--root-path``), as FastAPI's own pages use it."""
    return str(request.scope.get("root_path", "")).rstrip("/")
