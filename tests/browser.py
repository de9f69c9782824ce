"""Headless Chromium for tests that look at HTML the way a person would (reports, the service's web UI).

Uses Debian's ``chromium`` + ``chromium-driver`` packages (``bash .ci/setup`` installs them) through
selenium, always with an explicit driver path so selenium-manager never goes to the network. A missing
browser is a test *failure* naming the fix, not a skip: a skipped browser test is a test nobody runs.

    from ..browser import chromium

    def test_page(tmp_path):
        with chromium() as driver:
            driver.get(path.as_uri())
            ...

or, one browser for a whole module::

    @pytest.fixture(scope="module")
    def browser():
        with chromium() as driver:
            yield driver
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from selenium.webdriver import Chrome

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",  # tests run as root in containers, where the sandbox cannot start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",  # a small /dev/shm in containers crashes tabs
    "--no-first-run",
    "--hide-scrollbars",
)
SETUP_HINT = (
    "run `bash .ci/setup` (it installs the Debian packages chromium and chromium-driver, and selenium)"
)


def require_chromium() -> None:
    """Fail the calling test, naming the fix, when the browser, its driver or selenium is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not (p.is_file() and shutil.which(str(p)))]
    if missing:
        pytest.fail(f"headless browser test: {', '.join(missing)} not found; {SETUP_HINT}", pytrace=False)
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail(
            f"headless browser test: the selenium package is not installed; {SETUP_HINT}", pytrace=False
        )


@contextmanager
def chromium(width: int = 1280, height: int = 1000, page_load_timeout_s: float = 30) -> Iterator[Chrome]:
    """A headless Chromium driven by selenium; quit on exit (also when the test fails)."""
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(page_load_timeout_s)
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Chrome, path: Path, full_page: bool = True) -> Path:
    """Save a PNG of the current page; ``full_page`` first grows the window to the document's height."""
    driver.execute_script("window.scrollTo(0, 0)")
    if full_page:
        size = driver.get_window_size()
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(size["width"], min(int(height) + 100, 16000))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(path)):
        raise AssertionError(f"the browser could not write a screenshot to {path}")
    return path
