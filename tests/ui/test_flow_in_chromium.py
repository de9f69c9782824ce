"""The browser flow end to end ("review before you spend GPU"), in headless Chromium against a real
server and a real worker (``python -m service.serve``: uvicorn, a supervised Celery worker, SQLite
database and broker): upload a labeled zip and a test zip, curate a transfer set from a gallery,
review its report, train on exactly that set with tiny random-init models (the estimated time on the
form), watch the job finish, test the model with the model page's ``kt predict`` lines as printed,
then cancel and retry a second job from its page."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from service.admin import create_tenant_key, register_gallery
from service.db.models import Job
from service.db.session import init_db, make_engine, make_session_factory
from service.demo import CLASSES, embedded_server, free_port, write_zip
from tests.browser import chromium
from tests.conftest import VENV_BIN
from tests.ui.conftest import GALLERY_ENCODER
from tests.ui.test_ui import ALL_IMAGES_LOADED, save_screenshot, wait_for

TEACHER, STUDENT = "timm:test_vit", "timm:test_efficientnet"
JOB_TIMEOUT_S = 420  # a 2-core machine that is busy with other work


def _database_url(data_dir: Path) -> str:
    """The embedded server's database: its data dir's SQLite file. Named here, not read from
    ``Settings()``, which would take a ``KT_DATABASE_URL`` left in this process's environment by
    another test, while the server (whose KT_ variables are stripped) uses the data dir's."""
    return f"sqlite:///{data_dir.resolve() / 'kt.db'}"


def _prepare(root: Path) -> tuple[Path, str, str]:
    """A data dir whose database has a tenant's key and a registered gallery (as an operator sets
    them up: `kt admin create-key`, `kt admin register-gallery`); (data dir, key, gallery name)."""
    from kt_train.demo import make_demo_data
    from kt_train.gallery import build_gallery

    data_dir = root / "data"
    data_dir.mkdir(parents=True)
    unlabeled = make_demo_data(root / "unlabeled", per_class=1, test_per_class=1, unlabeled=120, size=32)
    gallery_dir = root / "gallery"
    build_gallery(
        [unlabeled["transfer"]], gallery_dir, encoder=GALLERY_ENCODER, image_size=32, index_kind="flat"
    )
    url = _database_url(data_dir)
    init_db(url)
    engine = make_engine(url)
    with make_session_factory(engine)() as s:
        key = create_tenant_key(s, "browser")
        gallery = register_gallery(s, gallery_dir, name="shapes-web")
        name = gallery.name
    engine.dispose()
    return data_dir, key, name


def _job_status(data_dir: Path, job_id: str) -> str:
    engine = make_engine(_database_url(data_dir))
    try:
        with make_session_factory(engine)() as s:
            job = s.get(Job, job_id)
            assert job is not None
            return job.status
    finally:
        engine.dispose()


def _wait_page(driver, script: str, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    """Wait for a page that updates itself (the job and transfer-set pages poll and reload)."""
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if driver.execute_script(f"return ({script});"):
                return
        except WebDriverException:  # the page reloaded between two looks: look again
            pass
        time.sleep(0.5)
    pytest.fail(
        f"{what} within {timeout:g} s; the page says: {driver.find_element('tag name', 'main').text[:1500]}"
    )


def _text(driver, element_id: str) -> str:  # type: ignore[no-untyped-def]
    return str(driver.find_element("id", element_id).text)


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_upload_curate_review_train_predict_cancel_retry_in_chromium(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    data_dir, key, gallery_name = _prepare(tmp_path)
    train_zip = write_zip(tmp_path / "zips" / "shapes.zip", per_class=6, seed=1, size=32)
    test_zip = write_zip(tmp_path / "zips" / "shapes-test.zip", per_class=3, seed=2, size=32)
    with embedded_server(data_dir, free_port()) as url, chromium(width=1280, height=1000) as driver:
        driver.get(f"{url}/ui/datasets")
        driver.find_element(By.ID, "api_key").send_keys(key)
        driver.find_element(By.ID, "login").click()
        # a page load on a loaded 2-core machine (the whole suite beside it) can take seconds
        assert wait_for(driver, "location.pathname === '/ui/datasets'", timeout=60), (
            driver.current_url,
            driver.find_element(By.TAG_NAME, "body").text[:500],
        )

        # 1. upload: a refused zip first (the page says why), then the two real ones
        bad = tmp_path / "zips" / "notes.zip"
        bad.write_bytes(b"not a zip")
        driver.find_element(By.ID, "upload-file").send_keys(str(bad))
        driver.find_element(By.ID, "upload").click()
        assert wait_for(driver, "document.getElementById('upload-error') !== null")
        assert "zip" in _text(driver, "upload-error")
        ids = {}
        for name, path, n in (("shapes", train_zip, 6), ("shapes-test", test_zip, 3)):
            driver.find_element(By.ID, "upload-name").clear()
            driver.find_element(By.ID, "upload-name").send_keys(name)
            driver.find_element(By.ID, "upload-file").send_keys(str(path))
            driver.find_element(By.ID, "upload").click()
            assert wait_for(driver, "location.pathname.indexOf('/ui/datasets/') === 0", timeout=60)
            assert _text(driver, "ds-images") == str(n * len(CLASSES))
            ids[name] = driver.current_url.rsplit("/", 1)[-1]
            if name == "shapes-test":
                break
            driver.get(f"{url}/ui/datasets")

        # 2. curate from the dataset's page
        driver.get(f"{url}/ui/datasets/{ids['shapes']}")
        gallery = Select(driver.find_element(By.ID, "curate-gallery"))
        assert gallery.first_selected_option.text.startswith(gallery_name)
        size = driver.find_element(By.ID, "curate-size")
        size.clear()
        size.send_keys("48")
        save_screenshot(driver, "curate-form")
        driver.find_element(By.ID, "curate-submit").click()
        assert wait_for(driver, "location.pathname.indexOf('/ui/transfer-sets/') === 0", timeout=60)
        ts_id = driver.current_url.rsplit("/", 1)[-1]
        # the page reloads itself once the curation is done, then offers to train on the set
        _wait_page(
            driver,
            "document.getElementById('train-form') !== null",
            JOB_TIMEOUT_S,
            "the curation did not finish",
        )

        # 3. review: the report's images load inside the page; the set is what was asked
        assert 0 < int(_text(driver, "ts-size").split()[0]) <= 48
        driver.switch_to.frame(driver.find_element(By.ID, "report"))
        assert wait_for(driver, ALL_IMAGES_LOADED, timeout=30), "the report's images did not load"
        assert driver.execute_script("return document.images.length") >= len(CLASSES) * 6
        driver.switch_to.default_content()

        # 4. the train form: no finished job yet, so no time, only the steps; they follow the budget
        estimate = driver.find_element(By.ID, "train-estimate")
        assert (
            estimate.text.startswith("no measurement yet: ")
            and "8,000 distillation steps of 64" in estimate.text
        )

        def fill(field_id: str, value: str) -> None:
            box = driver.find_element(By.ID, field_id)
            box.clear()
            box.send_keys(value)

        fill("train-teacher", TEACHER)
        fill("train-student", STUDENT)
        Select(driver.find_element(By.ID, "train-budget")).select_by_value("fast")
        assert wait_for(
            driver, "document.getElementById('train-estimate').textContent.indexOf('1,000 distillation') > 0"
        )
        Select(driver.find_element(By.ID, "train-test")).select_by_value(ids["shapes-test"])
        driver.find_element(By.CSS_SELECTOR, "#train-form details summary").click()
        fill("train-distill-steps", "20")
        fill("train-teacher-steps", "20")
        fill("train-full-steps", "0")
        fill("train-image-size", "32")
        driver.find_element(By.ID, "train-image-size").click()  # leaves the steps field: its change event
        assert wait_for(
            driver,
            "document.getElementById('train-estimate').textContent.indexOf(' 20 distillation steps of 64') > 0",
        )
        save_screenshot(driver, "train-form")
        driver.find_element(By.ID, "train-submit").click()
        assert wait_for(driver, "location.pathname.indexOf('/ui/jobs/') === 0", timeout=60)
        job_id = driver.current_url.rsplit("/", 1)[-1]
        assert _text(driver, "job-teacher") == TEACHER and _text(driver, "job-student") == STUDENT
        assert (
            _text(driver, "job-budget") == "fast" and _text(driver, "job-distill-steps") == "20 of 64 images"
        )
        assert driver.find_element(By.ID, "job-trained-on").text == f"transfer set {ts_id[:8]}"

        # 5. it finishes: the page reloads itself into the finished job, with test metrics
        _wait_page(
            driver,
            "document.getElementById('job-status').textContent === 'succeeded'",
            JOB_TIMEOUT_S,
            "the training job did not succeed",
        )
        assert driver.find_elements(By.CSS_SELECTOR, 'section[data-role="student"] .top1')
        assert not driver.find_elements(By.ID, "job-cancel") and not driver.find_elements(By.ID, "job-retry")

        # 6. the model: listed with its student; the page's kt lines, run as printed, predict images
        driver.find_element(By.CSS_SELECTOR, "a.model-link").click()
        assert wait_for(driver, "location.pathname.indexOf('/ui/models/') === 0", timeout=60)
        model_id = driver.current_url.rsplit("/", 1)[-1]
        assert _text(driver, "model-student") == STUDENT
        lines = _text(driver, "predict-commands").strip().splitlines()
        assert len(lines) == 3 and lines[0] == f"kt login {url} --key YOUR_API_KEY"
        work = tmp_path / "predict"
        (work / "images").mkdir(parents=True)
        env = {**os.environ, "KT_CONFIG_DIR": str(tmp_path / "kt-config"), "HF_HUB_OFFLINE": "1"}
        for name in ("KT_API_URL", "KT_API_KEY"):
            env.pop(name, None)
        with zipfile.ZipFile(test_zip) as zf:
            zf.extractall(work / "images")
        outputs = []
        for line in lines:
            line = line.replace("YOUR_API_KEY", key).replace("IMAGES...", "images")
            argv = shlex.split(line)
            assert argv[0] == "kt", line
            extra = ["--json"] if argv[1] == "predict" else []
            proc = subprocess.run(
                [str(VENV_BIN / "kt"), *argv[1:], *extra],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 0, (line, proc.stdout[-2000:], proc.stderr[-2000:])
            outputs.append(proc.stdout)
        predictions = json.loads(outputs[-1])
        assert len(predictions) == 3 * len(CLASSES)
        assert {p["label"] for p in predictions} <= set(CLASSES)
        assert (work / f"model-{model_id}.model_card.json").is_file()
        driver.get(f"{url}/ui/models")
        row = driver.find_element(By.CSS_SELECTOR, f'tr[data-model="{model_id}"] .model-student')
        assert row.text == STUDENT

        # 7. a second job on the same set: now the form has a measured time for the same models
        driver.get(f"{url}/ui/transfer-sets/{ts_id}")
        fill("train-teacher", TEACHER)
        fill("train-student", STUDENT)
        Select(driver.find_element(By.ID, "train-budget")).select_by_value("fast")
        assert wait_for(
            driver,
            "document.getElementById('train-estimate').textContent.indexOf('with the same teacher and student') > 0",
        ), driver.find_element(By.ID, "train-estimate").text
        assert driver.find_element(By.ID, "train-estimate").text.startswith("about ")
        assert float(driver.find_element(By.ID, "train-estimate").get_attribute("data-seconds")) > 0
        driver.find_element(By.ID, "train-submit").click()  # fast: 1,000 distillation steps, canceled below
        assert wait_for(driver, "location.pathname.indexOf('/ui/jobs/') === 0", timeout=60)
        second = driver.current_url.rsplit("/", 1)[-1]
        assert second != job_id

        # 8. cancel it, retry it (queued again), cancel it again
        driver.find_element(By.ID, "job-cancel").click()
        _wait_page(
            driver,
            "document.getElementById('job-status').textContent === 'canceled'",
            120,
            "the cancel did not take",
        )
        assert _job_status(data_dir, second) == "canceled"
        driver.find_element(By.ID, "job-retry").click()
        assert wait_for(driver, "document.getElementById('job-cancel') !== null", timeout=10)
        assert _job_status(data_dir, second) in ("queued", "running")
        driver.find_element(By.ID, "job-cancel").click()
        _wait_page(
            driver,
            "document.getElementById('job-status').textContent === 'canceled'",
            120,
            "the second cancel did not take",
        )
        assert _job_status(data_dir, second) == "canceled"
        assert _job_status(data_dir, job_id) == "succeeded"
