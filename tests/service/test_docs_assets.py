"""``/docs`` and ``/redoc`` work without internet access: every script, style and icon they load is
served by the API itself (FastAPI's pages load them from a CDN, so an offline deployment showed a
blank page). Checked on the HTML, on each file, and in headless Chromium with every other host
blocked, through a real uvicorn server."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.settings import Settings
from tests.browser import chromium
from tests.service.test_api import serve

PAGES = ("/docs", "/redoc")
# what a page must not reach in the browser test: any other host, the CDN and fonts FastAPI uses
BLOCKED = ["https://*", "*cdn.jsdelivr.net*", "*fonts.googleapis.com*", "*fastapi.tiangolo.com*"]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    settings = Settings(data_dir=tmp_path_factory.mktemp("docs") / "data")  # type: ignore[call-arg]
    with serve(create_app(settings)) as base:
        yield base


def loaded_urls(html: str) -> list[str]:
    """Every URL the page loads by itself: scripts, styles, icons, and the schema it fetches."""
    urls = re.findall(r"""<(?:script|link)[^>]*?(?:src|href)=["']([^"']+)["']""", html)
    urls += re.findall(r"""url:\s*['"]([^'"]+)['"]""", html)  # Swagger UI's schema URL
    urls += re.findall(r"""spec-url=["']([^"']+)["']""", html)  # ReDoc's
    return urls


@pytest.mark.parametrize("page", PAGES)
def test_the_page_loads_only_files_this_server_serves(url: str, page: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        html = client.get(page)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        urls = loaded_urls(html.text)
        assert len(urls) >= 3, urls  # a script, an icon, the schema (and Swagger UI's stylesheet)
        external = [u for u in urls if "//" in u]
        assert external == [], f"{page} loads files from elsewhere: {external}"
        for path in urls:
            response = client.get(path)
            assert response.status_code == 200, (page, path)
            assert len(response.content) > 1000, (page, path)
            if path.endswith(".js"):
                assert "javascript" in response.headers["content-type"], path
                assert b"function" in response.content[:2000], path


def wait_for(driver, script: str, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(f"return ({script});")
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_both_pages_render_the_api_in_a_browser_with_other_hosts_blocked(url: str, tmp_path: Path) -> None:
    with chromium() as driver:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": BLOCKED})
        driver.get(f"{url}/docs")
        operations = wait_for(driver, "document.querySelectorAll('.opblock').length")
        assert operations and operations >= 20, "Swagger UI did not render the API's operations"
        assert "vfm-kt" in driver.find_element("css selector", ".info .title").text

        driver.get(f"{url}/redoc")
        rendered = wait_for(
            driver, "document.querySelector('redoc h1') && document.querySelector('redoc h1').textContent"
        )
        assert rendered and "vfm-kt" in rendered, "ReDoc did not render the API"
        assert wait_for(driver, "document.querySelectorAll('[data-section-id^=\"operation/\"]').length") >= 20
