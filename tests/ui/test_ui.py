"""The web pages under ``/ui``: page by page through FastAPI's TestClient (auth redirect, the
cookie's flags, another tenant's ids are 404 pages, the numbers on the pages are the job's), then a
person's walk through them in headless Chromium against a real uvicorn server on 127.0.0.1, with
screenshots saved under ``docs/img/``."""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import update

from service.admin import create_tenant_key, revoke_key
from service.api.routes.transfer_sets import curate_dir
from service.app import create_app
from service.db.models import Job
from service.db.session import make_engine, make_session_factory
from service.ui.auth import COOKIE_NAME
from tests.browser import chromium, screenshot
from tests.service.test_api import serve
from tests.ui.conftest import World

REPO = Path(__file__).resolve().parents[2]
# The committed screenshots are rewritten only on request (KT_UPDATE_SCREENSHOTS=1); a plain test run
# takes them into a temp folder, so running the suite leaves the working tree clean.
SCREENSHOTS = (
    REPO / "docs" / "img"
    if os.environ.get("KT_UPDATE_SCREENSHOTS") == "1"
    else Path(tempfile.mkdtemp(prefix="kt-ui-shots-"))
)


@pytest.fixture(scope="module")
def app_client(world: World) -> Iterator[TestClient]:
    # https: the cookie is Secure, so a client only sends it back over https
    with TestClient(create_app(world.settings), base_url="https://testserver") as client:
        yield client


def login(client: TestClient, key: str) -> None:
    client.cookies.clear()
    r = client.post("/ui/login", data={"api_key": key, "next": "/ui/jobs"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/ui/jobs"


def pages(w: World) -> list[str]:
    """Every page and file route of the UI that shows one of the tenant's things."""
    ds_class = w.classes[0]
    thumb = sorted(
        (
            w.settings.data_dir / "tenants" / w.tenant_id / "datasets" / w.dataset_id / "images" / ds_class
        ).iterdir()
    )[0].name
    return [
        "/ui/jobs",
        "/ui/jobs/rows",
        f"/ui/jobs/{w.job_id}",
        f"/ui/jobs/{w.job_id}/status.json",
        f"/ui/jobs/{w.job_id}/transfer-set",
        f"/ui/jobs/{w.job_id}/transfer-set/report",
        "/ui/transfer-sets",
        f"/ui/transfer-sets/{w.transfer_set_id}",
        f"/ui/transfer-sets/{w.transfer_set_id}/report",
        "/ui/models",
        f"/ui/models/{w.model_id}",
        f"/ui/models/{w.model_id}/download?format=onnx",
        "/ui/datasets",
        f"/ui/datasets/{w.dataset_id}",
        f"/ui/datasets/{w.dataset_id}/thumbs/{ds_class}/{thumb}",
    ]


def own_pages(w: World) -> list[str]:
    return [
        p for p in pages(w) if not p.endswith(("/jobs", "/rows", "/transfer-sets", "/models", "/datasets"))
    ]


def test_every_page_redirects_to_the_login_without_a_cookie(world: World, app_client: TestClient) -> None:
    app_client.cookies.clear()
    for path in pages(world):
        r = app_client.get(path, follow_redirects=False)
        assert r.status_code == 303, path
        assert r.headers["location"].startswith("/ui/login?next=/ui/"), (path, r.headers["location"])
    # a Bearer header is the API's way in, not the pages'
    r = app_client.get("/ui/jobs", headers={"Authorization": f"Bearer {world.key}"}, follow_redirects=False)
    assert r.status_code == 303
    # a forged or garbled cookie is no better than none
    app_client.cookies.set(COOKIE_NAME, "kt_0123abcd_not-a-key", domain="testserver", path="/ui")
    assert app_client.get("/ui/jobs", follow_redirects=False).status_code == 303
    app_client.cookies.clear()


def test_login_sets_a_secure_httponly_strict_cookie_and_logout_clears_it(
    world: World, app_client: TestClient
) -> None:
    app_client.cookies.clear()
    page = app_client.get("/ui/login?next=/ui/models")
    assert page.status_code == 200 and 'name="api_key"' in page.text and 'value="/ui/models"' in page.text

    wrong = app_client.post("/ui/login", data={"api_key": "kt_00000000_nope"}, follow_redirects=False)
    assert wrong.status_code == 401 and "no such key" in wrong.text
    assert "set-cookie" not in wrong.headers

    r = app_client.post(
        "/ui/login", data={"api_key": world.key, "next": "/ui/models"}, follow_redirects=False
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui/models"
    cookie = r.headers["set-cookie"]
    flags = {part.strip().lower() for part in cookie.split(";")}
    assert {"httponly", "secure", "samesite=strict", "path=/ui"} <= flags, cookie
    assert app_client.get("/ui/models").status_code == 200

    out = app_client.post("/ui/logout", follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    assert (
        f'{COOKIE_NAME}=""' in out.headers["set-cookie"] and "max-age=0" in out.headers["set-cookie"].lower()
    )
    assert app_client.get("/ui/models", follow_redirects=False).status_code == 303

    # the forms refuse a post from another site (login CSRF); a same-origin post is fine
    for path, data in (("/ui/login", {"api_key": world.key}), ("/ui/logout", {})):
        r = app_client.post(
            path, data=data, headers={"Origin": "https://evil.example"}, follow_redirects=False
        )
        assert r.status_code == 403 and "another site" in r.text and "set-cookie" not in r.headers, path
    ok = app_client.post(
        "/ui/login",
        data={"api_key": world.key},
        headers={"Origin": "https://testserver"},
        follow_redirects=False,
    )
    assert ok.status_code == 303

    # after logging in, only a page of this UI is a destination: never another site
    for evil in ("https://evil.example/", "//evil.example/ui/jobs", "/v1/jobs"):
        r = app_client.post("/ui/login", data={"api_key": world.key, "next": evil}, follow_redirects=False)
        assert r.headers["location"] == "/ui/jobs", evil


def test_the_login_page_warns_when_the_cookie_cannot_be_kept(world: World) -> None:
    with TestClient(create_app(world.settings), base_url="http://kt.example.com") as plain:
        assert 'id="insecure"' in plain.get("/ui/login").text
        proxied = plain.get("/ui/login", headers={"X-Forwarded-Proto": "https"})
        assert 'id="insecure"' not in proxied.text
    with TestClient(create_app(world.settings), base_url="http://127.0.0.1") as loopback:
        assert 'id="insecure"' not in loopback.get("/ui/login").text


def test_the_pages_share_the_keys_rate_limit(world: World) -> None:
    settings = world.settings.model_copy(update={"rate_limit_per_min": 1.0, "rate_limit_burst": 3})
    with TestClient(create_app(settings), base_url="https://testserver") as client:
        assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/jobs"
        login(client, world.key)  # one request of the key
        assert client.get("/ui/jobs").status_code == 200
        assert client.get("/ui/models").status_code == 200
        limited = client.get("/ui/datasets")
        assert limited.status_code == 429 and "Too many requests" in limited.text
        assert int(limited.headers["retry-after"]) >= 1


def test_a_revoked_key_ends_the_session(world: World, app_client: TestClient) -> None:
    engine = make_engine(world.settings.database_url)
    with make_session_factory(engine)() as s:
        key = create_tenant_key(s, "acme")
    login(app_client, key)
    assert app_client.get("/ui/jobs").status_code == 200
    with make_session_factory(engine)() as s:
        assert revoke_key(s, key.split("_")[1]) == 1
    engine.dispose()
    app_client.app.state.api_key_cache.clear()  # type: ignore[attr-defined]  # else: within its TTL
    r = app_client.get("/ui/jobs", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")
    assert "max-age=0" in r.headers.get("set-cookie", "").lower()


def test_another_tenants_ids_are_404_pages(world: World, app_client: TestClient) -> None:
    login(app_client, world.other_key)
    for path in own_pages(world):
        r = app_client.get(path, follow_redirects=False)
        assert r.status_code == 404, path
        assert "Not found" in r.text and world.job_id not in r.text, path
    for listing in ("/ui/jobs", "/ui/transfer-sets", "/ui/models", "/ui/datasets"):
        r = app_client.get(listing)
        assert r.status_code == 200
        assert world.job_id[:8] not in r.text and world.dataset_id[:8] not in r.text, listing
    # unknown ids, and paths that try to leave the dataset's folder
    login(app_client, world.key)
    cls = world.classes[0]
    for path in (
        "/ui/jobs/0123456789abcdef0123456789abcdef",
        f"/ui/datasets/{world.dataset_id}/thumbs/{cls}/..%2F..%2F..%2Fkt.db",
        f"/ui/datasets/{world.dataset_id}/thumbs/{cls}/.hidden.png",
        f"/ui/datasets/{world.dataset_id}/thumbs/nope/x.png",
        f"/ui/models/{world.model_id}/download?format=torchscript",
    ):
        assert app_client.get(path).status_code == 404, path


def test_jobs_page_shows_the_finished_job_and_its_fragment_polls(
    world: World, app_client: TestClient
) -> None:
    login(app_client, world.key)
    page = app_client.get("/ui/jobs")
    assert page.status_code == 200
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    row = re.search(rf'<tr data-job="{world.job_id}" data-status="(\w+)">(.*?)</tr>', page.text, re.S)
    assert row and row.group(1) == "succeeded" and "100%" in row.group(2)
    assert 'fetch("/ui/jobs/rows"' in page.text
    rows = app_client.get("/ui/jobs/rows")
    assert rows.headers["x-jobs-live"] == "0" and f'data-job="{world.job_id}"' in rows.text
    status = app_client.get(f"/ui/jobs/{world.job_id}/status.json").json()
    assert status == {
        "status": "succeeded",
        "stage": "export",  # evaluate runs before export
        "progress": 1.0,
        "eta_s": None,
        "final": True,
    }


def test_running_and_failed_jobs_render_their_state(world: World, app_client: TestClient) -> None:
    engine = make_engine(world.settings.database_url)
    with make_session_factory(engine)() as s:
        running = Job(
            tenant_id=world.tenant_id,
            kind="pipeline",
            status="running",
            stage="distill",
            progress=0.4,
            eta_s=95.0,
            stage_timings={"finetune_teacher": 12.5, "curate": 3.0},
        )
        failed = Job(
            tenant_id=world.tenant_id,
            kind="curate",
            status="failed",
            stage="curate",
            progress=0.1,
            params={"config": {"stages": ["curate"]}},
            error="curate.gallery: no such gallery <script>",
        )
        s.add_all([running, failed])
        s.commit()
        running_id, failed_id = running.id, failed.id
    engine.dispose()
    login(app_client, world.key)
    rows = app_client.get("/ui/jobs/rows")
    assert rows.headers["x-jobs-live"] == "1"
    assert re.search(rf'data-job="{running_id}" data-status="running">.*?40%.*?95 s', rows.text, re.S)
    text = app_client.get(f"/ui/jobs/{running_id}").text
    states = dict(
        (stage, state) for state, stage in re.findall(r'<li class="(\w+)" data-stage="(\w+)">', text)
    )
    assert states == {
        "finetune_teacher": "done",
        "curate": "done",
        "distill": "running",
        "finetune_student": "pending",
        "export": "pending",
        "evaluate": "pending",
    }
    assert f"/ui/jobs/{running_id}/status.json" in text and "Training curves" not in text
    text = app_client.get(f"/ui/jobs/{failed_id}").text
    assert re.findall(r'<li class="(\w+)" data-stage="(\w+)">', text) == [("failed", "curate")]
    assert "no such gallery &lt;script&gt;" in text and "status.json" not in text


def test_job_page_shows_timeline_curves_and_the_test_metrics(world: World, app_client: TestClient) -> None:
    login(app_client, world.key)
    text = app_client.get(f"/ui/jobs/{world.job_id}").text
    stages = re.findall(r'<li class="(\w+)" data-stage="(\w+)">', text)
    assert [s for _, s in stages] == [
        "finetune_teacher",
        "curate",
        "distill",
        "finetune_student",
        "export",
        "evaluate",
    ]
    assert {state for state, _ in stages} == {"done"}
    history = json.loads(
        (world.settings.data_dir / "jobs" / world.job_id / "run" / "distill" / "history.json").read_text()
    )
    for stage in ("finetune_teacher", "distill", "finetune_student"):
        section = re.search(rf'<section class="curves" data-stage="{stage}">(.*?)</section>', text, re.S)
        assert section, stage
        paths = re.findall(r'data-series="([^"]+)" data-points="(\d+)" d="([^"]+)"', section.group(1))
        assert paths, stage
        for _, n, d in paths:
            assert int(n) >= 2 and d.count("L") == int(n) - 1, (stage, d)
    loss_points = [p for p in re.findall(r'data-series="distill" data-points="(\d+)"', text)]
    assert int(loss_points[0]) == len(history["distill"])
    student = re.search(r'data-role="student">(.*?)</section>', text, re.S)
    assert student
    block = student.group(1)
    assert f'<span class="top1">{world.student_top1:.1f}</span>' in block
    for i, cls in enumerate(world.classes):
        row = re.search(rf'<tr data-class="{cls}">(.*?)</tr>', block, re.S)
        assert row, cls
        cells = [
            int(n) for n in re.findall(r"<td class=\"(?:diag)?\" style=\"[^\"]*\">(\d+)</td>", row.group(1))
        ]
        assert cells == world.confusion[i], cls
        acc = re.search(r'per-class-acc">([\d.]+)<', row.group(1))
        assert acc and acc.group(1) == f"{world.student_per_class[cls]:.1f}", cls
    # links to what the job made and used
    for link in (
        f"/ui/models/{world.model_id}",
        f"/ui/transfer-sets/{world.transfer_set_id}",
        f"/ui/datasets/{world.dataset_id}",
    ):
        assert f'href="{link}"' in text, link


def test_transfer_set_viewer_serves_the_curation_report(world: World, app_client: TestClient) -> None:
    login(app_client, world.key)
    summary = json.loads((curate_dir(world.settings, world.job_id) / "summary.json").read_text())
    for page_url, report_url in (
        (f"/ui/transfer-sets/{world.transfer_set_id}", f"/ui/transfer-sets/{world.transfer_set_id}/report"),
        (f"/ui/jobs/{world.job_id}/transfer-set", f"/ui/jobs/{world.job_id}/transfer-set/report"),
    ):
        page = app_client.get(page_url).text
        assert f'<iframe class="report" id="report" src="{report_url}"' in page
        assert f'<dd id="ts-size">{summary["size"]} of' in page
        for cls, n in summary["per_class"].items():
            assert f'<tr><td>{cls}</td><td class="num">{n}</td></tr>' in page
        report = app_client.get(report_url)
        assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
        assert report.headers["content-security-policy"].startswith("default-src 'none'; img-src data:")
        assert report.text.count("data:image/jpeg;base64,") >= summary["size"]


def test_model_card_and_its_downloads(world: World, app_client: TestClient) -> None:
    login(app_client, world.key)
    text = app_client.get(f"/ui/models/{world.model_id}").text
    assert re.findall(r'data-format="(\w+)"', text) == ["safetensors", "onnx"]
    assert f'<dd id="model-classes">{", ".join(world.classes)}</dd>' in text
    assert f'<span class="top1" data-role="student">{world.student_top1:.1f}</span>' in text
    for cls, acc in world.student_per_class.items():
        assert re.search(
            rf'<tr data-class="{cls}"><td>{cls}</td><td class="num">\d+</td><td class="num">{acc:.1f}</td>',
            text,
        )
    onnx = app_client.get(f"/ui/models/{world.model_id}/download?format=onnx")
    assert onnx.status_code == 200 and onnx.headers["content-type"] == "application/octet-stream"
    stored = world.settings.data_dir / "jobs" / world.job_id / "run" / "export"
    assert onnx.content == next(stored.glob("*.onnx")).read_bytes()
    assert f'filename="model-{world.model_id}.onnx"' in onnx.headers["content-disposition"]


def test_dataset_page_shows_per_class_counts_and_thumbnails(world: World, app_client: TestClient) -> None:
    login(app_client, world.key)
    text = app_client.get(f"/ui/datasets/{world.dataset_id}").text
    assert f'<dd id="ds-images">{sum(world.class_counts.values())}</dd>' in text
    for cls, n in world.class_counts.items():
        row = re.search(rf'<tr data-class="{cls}">(.*?)</tr>', text, re.S)
        assert row and f'<td class="num count">{n}</td>' in row.group(1), cls
        srcs = re.findall(r'<img loading="lazy" src="([^"]+)"', row.group(1))
        assert len(srcs) == min(n, 8), cls
    thumb = app_client.get(srcs[0])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as img:
        assert img.format == "JPEG" and max(img.size) <= 96


MAX_SCREENSHOT_BYTES = 300_000


def save_screenshot(driver, name: str) -> Path:  # type: ignore[no-untyped-def]
    """A full-page PNG (docs/img/ with KT_UPDATE_SCREENSHOTS=1), quantized to a palette when it would
    pass 300 KB."""
    path = screenshot(driver, SCREENSHOTS / f"ui-{name}.png")
    if path.stat().st_size > MAX_SCREENSHOT_BYTES:
        with Image.open(path) as img:
            small = img.convert("RGB").quantize(colors=128)
        small.save(path, optimize=True)
    assert path.stat().st_size <= MAX_SCREENSHOT_BYTES, (path, path.stat().st_size)
    driver.set_window_size(1280, 900)
    return path


def wait_for(driver, script: str, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    """Poll a JavaScript expression until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(f"return ({script});")
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


ALL_IMAGES_LOADED = (
    "Array.from(document.images).length > 0 && "
    "Array.from(document.images).every(function (i) { return i.complete && i.naturalWidth > 0; })"
)


def test_a_person_walks_through_the_finished_job_in_chromium(world: World) -> None:
    from selenium.webdriver.common.by import By

    app = create_app(world.settings)
    with serve(app) as url, chromium(width=1280, height=900) as driver:
        assert url.startswith("http://127.0.0.1:")
        driver.get(f"{url}/ui/jobs/{world.job_id}")
        assert "/ui/login" in driver.current_url  # no cookie: the login form, and back afterwards
        save_screenshot(driver, "login")
        driver.find_element(By.ID, "api_key").send_keys(world.key)
        driver.find_element(By.ID, "login").click()
        assert wait_for(driver, f"location.pathname === '/ui/jobs/{world.job_id}'")
        cookie = driver.get_cookie(COOKIE_NAME)
        assert cookie and cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
        assert COOKIE_NAME not in driver.execute_script("return document.cookie")  # HttpOnly

        # the jobs list, then the finished job from it
        driver.get(f"{url}/ui/jobs")
        row = driver.find_element(By.CSS_SELECTOR, f'tr[data-job="{world.job_id}"]')
        assert row.get_attribute("data-status") == "succeeded" and "100%" in row.text
        save_screenshot(driver, "jobs")
        row.find_element(By.TAG_NAME, "a").click()
        assert wait_for(driver, f"location.pathname === '/ui/jobs/{world.job_id}'")

        # the curves: every training stage has SVG paths with several points, drawn at a real size
        for stage in ("finetune_teacher", "distill", "finetune_student"):
            paths = driver.find_elements(By.CSS_SELECTOR, f'section.curves[data-stage="{stage}"] path.series')
            assert paths, stage
            for path in paths:
                assert int(path.get_attribute("data-points")) >= 2
                assert driver.execute_script("return arguments[0].getTotalLength()", path) > 20
        top1 = driver.find_element(By.CSS_SELECTOR, 'section[data-role="student"] .top1').text
        assert top1 == f"{world.student_top1:.1f}"
        save_screenshot(driver, "job")

        # the transfer-set viewer: the report's images load inside the page's frame
        driver.find_element(By.CSS_SELECTOR, "a.transfer-set-link").click()
        assert wait_for(driver, "location.pathname.indexOf('/ui/transfer-sets/') === 0")
        driver.switch_to.frame(driver.find_element(By.ID, "report"))
        assert wait_for(driver, ALL_IMAGES_LOADED), "the transfer-set report's images did not load"
        assert driver.execute_script("return document.images.length") >= 72
        # its filters work inside the frame: one class shows only that class's queries and items
        from selenium.webdriver.support.ui import Select

        summary = json.loads((curate_dir(world.settings, world.job_id) / "summary.json").read_text())
        cls = world.classes[0]
        Select(driver.find_element(By.ID, "class-filter")).select_by_value(cls)
        shown = driver.execute_script(
            "return Array.from(document.querySelectorAll('#grid .query-row'))"
            ".filter(function (r) { return !r.hidden; }).map(function (r) { return r.dataset.class; })"
        )
        assert shown and set(shown) == {cls}
        assert driver.find_element(By.ID, "shown-count").text == str(summary["per_class"][cls])
        Select(driver.find_element(By.ID, "class-filter")).select_by_value("")
        driver.execute_script("document.getElementById('grid-section').scrollIntoView()")
        driver.switch_to.default_content()
        save_screenshot(driver, "transfer-set")

        # the model card, from the job page
        driver.get(f"{url}/ui/jobs/{world.job_id}")
        driver.find_element(By.CSS_SELECTOR, "a.model-link").click()
        assert wait_for(driver, "location.pathname.indexOf('/ui/models/') === 0")
        formats = [
            a.get_attribute("data-format") for a in driver.find_elements(By.CSS_SELECTOR, "a.download")
        ]
        assert formats == ["safetensors", "onnx"]
        save_screenshot(driver, "model")

        # the dataset, its thumbnails served through the authenticated route
        driver.get(f"{url}/ui/datasets/{world.dataset_id}")
        assert wait_for(driver, ALL_IMAGES_LOADED), "the dataset's thumbnails did not load"
        shown = driver.execute_script("return document.images.length")
        assert shown == sum(min(n, 8) for n in world.class_counts.values())
        save_screenshot(driver, "dataset")

        # live refresh: a running job's progress changes on the open jobs list without a reload
        engine = make_engine(world.settings.database_url)
        factory = make_session_factory(engine)
        with factory() as s:
            live = Job(
                tenant_id=world.tenant_id, kind="pipeline", status="running", stage="distill", progress=0.25
            )
            s.add(live)
            s.commit()
            live_id = live.id
        try:
            driver.get(f"{url}/ui/jobs")
            marker = driver.execute_script("window.__same_page = true; return 1")
            assert marker == 1
            with factory() as s:
                s.execute(
                    update(Job).where(Job.id == live_id).values(progress=0.75, stage="finetune_student")
                )
                s.commit()
            progressed = wait_for(
                driver,
                f"document.querySelector('tr[data-job=\"{live_id}\"] .progress').textContent === '75%'",
                timeout=8,
            )
            assert progressed, "the jobs list did not refresh the running job's progress"
            assert driver.execute_script("return window.__same_page === true")  # no reload: a fragment
        finally:
            with factory() as s:
                s.execute(update(Job).where(Job.id == live_id).values(status="canceled"))
                s.commit()
            engine.dispose()

        # logging out clears the cookie; the pages ask for the key again
        driver.find_element(By.ID, "logout").click()
        assert wait_for(driver, "location.pathname === '/ui/login'")
        assert driver.get_cookie(COOKIE_NAME) is None
        driver.get(f"{url}/ui/jobs")
        assert "/ui/login" in driver.current_url
