"""The forms of ``/ui`` through FastAPI's TestClient: upload a dataset, curate a transfer set from a
dataset's page, train on a reviewed transfer set (with the estimated time), cancel and retry a job,
the models list's student and the model page's ``kt predict`` instructions, run as printed. Every
form is refused from another site or without the session's form token, and another tenant's ids
are 404s. The whole flow, in Chromium against a real server and worker: test_flow_in_chromium.py."""

from __future__ import annotations

import html
import io
import json
import re
import shlex
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service import estimates
from service.app import create_app
from service.db.models import Dataset, Gallery, Job, TransferSet
from service.db.session import make_engine, make_session_factory
from tests.conftest import VENV_BIN
from tests.ui.conftest import World
from tests.ui.test_ui import login

CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')


@pytest.fixture(scope="module")
def client(world: World) -> Iterator[TestClient]:
    with TestClient(create_app(world.settings), base_url="https://testserver") as c:
        yield c


@pytest.fixture(scope="module")
def db(world: World) -> Iterator[object]:
    engine = make_engine(world.settings.database_url)
    factory = make_session_factory(engine)
    yield factory
    engine.dispose()


def form_token(client: TestClient, page: str) -> str:
    r = client.get(page)
    assert r.status_code == 200, r.text
    match = CSRF.search(r.text)
    assert match, f"no form token on {page}"
    return match.group(1)


def error_on(text: str, element_id: str) -> str:
    match = re.search(rf'<p class="error" id="{element_id}">(.*?)</p>', text, re.S)
    assert match, f"no #{element_id} on the page"
    return html.unescape(match.group(1))


def labeled_zip(world: World, per_class: int = 3) -> bytes:
    """A zip of ``<class>/<image>`` folders, from the world's stored training images."""
    images = world.settings.data_dir / "tenants" / world.tenant_id / "datasets" / world.dataset_id / "images"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for cls in world.classes:
            for path in sorted((images / cls).iterdir())[:per_class]:
                zf.writestr(f"{cls}/{path.name}", path.read_bytes())
    return buf.getvalue()


def jobs_of(db: object, world: World) -> set[str]:
    with db() as s:  # type: ignore[operator]
        return set(s.scalars(select(Job.id).where(Job.tenant_id == world.tenant_id)))


def cancel_left_over(db: object, world: World, before: set[str]) -> None:
    """Jobs a test queued (no worker runs them here) end canceled, so the world stays finished."""
    with db() as s:  # type: ignore[operator]
        for job in s.scalars(select(Job).where(Job.tenant_id == world.tenant_id)):
            if job.id not in before and job.status in ("queued", "running"):
                job.status = "canceled"
        s.commit()


def test_upload_form_takes_a_segmentation_dataset(world: World, client: TestClient, db: object) -> None:
    from tests.service.test_api import make_zip
    from tests.service.test_segmentation_uploads import CLASSES, seg_files

    login(client, world.key)
    token = form_token(client, "/ui/datasets")
    assert '<option value="segmentation">' in client.get("/ui/datasets").text
    r = client.post(
        "/ui/datasets",
        data={"csrf": token, "name": "scenes", "task": "segmentation"},
        files={"file": ("scenes.zip", make_zip(seg_files(2)), "application/zip")},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    dataset_id = r.headers["location"].rsplit("/", 1)[-1]
    with db() as s:  # type: ignore[operator]
        ds = s.get(Dataset, dataset_id)
        assert ds is not None and ds.task == "segmentation" and ds.classes == CLASSES and ds.num_images == 2
    row = re.search(rf'<tr data-dataset="{dataset_id}">.*?</tr>', client.get("/ui/datasets").text, re.S)
    assert row is not None and '<span class="badge">segmentation</span>' in row.group(0)
    page = client.get(r.headers["location"])
    assert page.status_code == 200 and '<dd id="ds-images">2</dd>' in page.text, page.text[:500]


def test_upload_form_stores_the_dataset_as_the_api_does(world: World, client: TestClient, db: object) -> None:
    login(client, world.key)
    token = form_token(client, "/ui/datasets")
    page = client.get("/ui/datasets").text
    assert 'enctype="multipart/form-data"' in page and 'name="file"' in page

    r = client.post(
        "/ui/datasets",
        data={"csrf": token, "name": "from the browser"},
        files={"file": ("shapes.zip", labeled_zip(world), "application/zip")},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    dataset_id = r.headers["location"].rsplit("/", 1)[-1]
    with db() as s:  # type: ignore[operator]
        ds = s.get(Dataset, dataset_id)
        assert ds is not None and ds.tenant_id == world.tenant_id and ds.name == "from the browser"
        assert ds.num_images == 3 * len(world.classes) and ds.classes == world.classes
    # the API sees the very dataset, its images stored where uploads go
    api = client.get(f"/v1/datasets/{dataset_id}", headers={"Authorization": f"Bearer {world.key}"}).json()
    assert api["class_counts"] == {cls: 3 for cls in world.classes}
    assert f'<dd id="ds-images">{3 * len(world.classes)}</dd>' in client.get(r.headers["location"]).text

    # refused uploads: the page again, with the reason, never a 500 and nothing stored
    with db() as s:  # type: ignore[operator]
        count = len(s.scalars(select(Dataset.id).where(Dataset.tenant_id == world.tenant_id)).all())
    refused = [
        ({"csrf": token}, None, 422, "no `file` field"),
        ({"csrf": token}, {"file": ("", b"", "application/octet-stream")}, 422, "Choose a zip file"),
        ({"csrf": token}, {"file": ("notes.zip", b"not a zip at all", "application/zip")}, 400, "zip"),
        ({"csrf": token, "name": "x" * 201}, {"file": ("s.zip", labeled_zip(world, 1), "application/zip")}, 422,
         "longer than 200 characters"),
    ]  # fmt: skip
    for data, files, code, reason in refused:
        if files is None:  # a multipart body without the file field
            files = {"other": ("a.txt", b"x", "text/plain")}
        r = client.post("/ui/datasets", data=data, files=files, follow_redirects=False)
        assert r.status_code == code, (reason, r.status_code, r.text[:300])
        assert reason in error_on(r.text, "upload-error"), reason
        assert 'id="upload-form"' in r.text
    with db() as s:  # type: ignore[operator]
        assert len(s.scalars(select(Dataset.id).where(Dataset.tenant_id == world.tenant_id)).all()) == count

    # another site's form, or one without this session's token: 403, nothing stored
    upload = {"file": ("s.zip", labeled_zip(world, 1), "application/zip")}
    for data, headers in (
        ({"csrf": "0" * 64}, {}),
        ({}, {}),
        ({"csrf": token}, {"Origin": "https://evil.example"}),
    ):
        r = client.post("/ui/datasets", data=data, files=upload, headers=headers, follow_redirects=False)
        assert r.status_code == 403 and "Forbidden" in r.text, (data, headers)
    with db() as s:  # type: ignore[operator]
        assert len(s.scalars(select(Dataset.id).where(Dataset.tenant_id == world.tenant_id)).all()) == count
    # a token is the session's own: after logging in again, the old page's token is stale
    login(client, world.key)
    r = client.post("/ui/datasets", data={"csrf": token}, files=upload, follow_redirects=False)
    assert r.status_code == 403 and "reload the page" in r.text
    assert (
        client.delete(
            f"/v1/datasets/{dataset_id}", headers={"Authorization": f"Bearer {world.key}"}
        ).status_code
        == 204
    )


def test_curate_form_queues_a_transfer_set_and_the_cancel_button_stops_it(
    world: World, client: TestClient, db: object
) -> None:
    before = jobs_of(db, world)
    with db() as s:  # type: ignore[operator]
        gallery = s.scalars(select(Gallery)).first()
        assert gallery is not None
        gallery_id = gallery.id
    try:
        login(client, world.key)
        page = client.get(f"/ui/datasets/{world.dataset_id}").text
        assert f'<option value="{gallery_id}"' in page and 'id="curate-form"' in page
        token = CSRF.search(page).group(1)  # type: ignore[union-attr]
        r = client.post(
            f"/ui/datasets/{world.dataset_id}/curate",
            data={"csrf": token, "gallery_id": gallery_id, "size": "12", "teacher": ""},
            follow_redirects=False,
        )
        assert r.status_code == 303, r.text
        ts_id = r.headers["location"].rsplit("/", 1)[-1]
        with db() as s:  # type: ignore[operator]
            ts = s.get(TransferSet, ts_id)
            assert ts is not None and ts.tenant_id == world.tenant_id and ts.dataset_id == world.dataset_id
            assert (ts.gallery_id, ts.size, ts.status) == (gallery_id, 12, "queued")
            job = s.get(Job, ts.job_id)
            assert job is not None and job.kind == "curate" and job.status == "queued"
            assert job.params["request"]["size"] == 12 and job.params["config"]["curate"]["size"] == 12
            job_id = job.id
        ts_page = client.get(f"/ui/transfer-sets/{ts_id}").text
        assert 'id="ts-waiting"' in ts_page and f"/ui/jobs/{job_id}/status.json" in ts_page
        assert 'id="train-form"' not in ts_page  # nothing to train on until it is ready

        # the curation job's page: what it curates with, and a Cancel button (no Retry while queued)
        job_page = client.get(f"/ui/jobs/{job_id}").text
        assert '<dd id="job-teacher">none (gallery similarity only)</dd>' in job_page
        assert 'id="job-cancel"' in job_page and 'id="job-retry"' not in job_page
        token = CSRF.search(job_page).group(1)  # type: ignore[union-attr]
        r = client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": "f" * 64}, follow_redirects=False)
        assert r.status_code == 403
        r = client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": token}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == f"/ui/jobs/{job_id}"
        with db() as s:  # type: ignore[operator]
            assert s.get(Job, job_id).status == "canceled"  # type: ignore[union-attr]
        after = client.get(f"/ui/jobs/{job_id}").text
        assert 'id="job-cancel"' not in after and 'id="job-retry"' in after
        # canceling again is the API's 409, said on the page
        again = client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": token})
        assert again.status_code == 409 and "already canceled" in error_on(again.text, "job-action-error")

        # refused curations: the dataset page with the reason
        for data, code, reason in (
            ({"gallery_id": "0" * 32, "size": "12"}, 404, "Gallery"),
            ({"gallery_id": gallery_id, "size": "many"}, 422, "size"),
            ({"gallery_id": gallery_id, "size": "0"}, 422, "size"),
            ({"gallery_id": gallery_id, "teacher": "timm:no_such_model_xyz"}, 422, "no_such_model_xyz"),
            ({"gallery_id": ""}, 422, "Choose a gallery"),
        ):
            r = client.post(f"/ui/datasets/{world.dataset_id}/curate", data={"csrf": token, **data})
            assert r.status_code == code, (data, r.status_code)
            assert reason in error_on(r.text, "curate-error"), (data, r.text[:500])
        assert jobs_of(db, world) - before == {job_id}  # none of them queued anything

        # another tenant: the dataset is a 404 page, its form posts too
        login(client, world.other_key)
        other = form_token(client, "/ui/datasets")
        r = client.post(
            f"/ui/datasets/{world.dataset_id}/curate", data={"csrf": other, "gallery_id": gallery_id}
        )
        assert r.status_code == 404 and "Not found" in r.text
        r = client.post(f"/ui/jobs/{job_id}/retry", data={"csrf": other})
        assert r.status_code == 404
        assert jobs_of(db, world) - before == {job_id}
    finally:
        cancel_left_over(db, world, before)


def test_train_form_shows_the_estimate_and_trains_on_exactly_this_set(
    world: World, client: TestClient, db: object
) -> None:
    before = jobs_of(db, world)
    with db() as s:  # type: ignore[operator]
        test_id = s.scalars(select(Dataset.id).where(Dataset.name == "shapes-test")).one()
    try:
        login(client, world.key)
        page = client.get(f"/ui/transfer-sets/{world.transfer_set_id}").text
        assert 'id="train-form"' in page and f'<option value="{test_id}"' in page
        assert [b for b in re.findall(r'<option value="(\w+)"[^>]*>\1</option>', page)] == [
            "fast",
            "balanced",
            "best",
        ]
        # the estimate: the balanced recipe's steps at the speed of the world's finished job
        shown = html.unescape(re.search(r'id="train-estimate"[^>]*>(.*?)</span>', page).group(1))  # type: ignore[union-attr]
        with db() as s:  # type: ignore[operator]
            expected = estimates.estimate(
                s, "balanced", teacher="timm:vit_small_patch14_dinov2.lvd142m", student="timm:resnet18"
            )
        assert expected.seconds is not None and expected.measured_jobs >= 1
        assert shown == expected.text() and "8,000 distillation steps of 64" in shown
        # the form's script asks the server again when the budget or the steps change
        fast = client.get(f"/ui/transfer-sets/{world.transfer_set_id}/estimate?budget=fast").json()
        best = client.get(f"/ui/transfer-sets/{world.transfer_set_id}/estimate?budget=best").json()
        assert fast["steps"]["distill"] == 1000 and best["steps"]["distill"] == 16000
        assert 0 < fast["seconds"] < expected.seconds < best["seconds"]
        short = client.get(
            f"/ui/transfer-sets/{world.transfer_set_id}/estimate?budget=fast&distill_steps=7"
        ).json()
        assert short["steps"]["distill"] == 7 and short["seconds"] < fast["seconds"]

        token = CSRF.search(page).group(1)  # type: ignore[union-attr]
        form = {
            "csrf": token,
            "teacher": "timm:test_vit",
            "student": "timm:test_efficientnet",
            "budget": "fast",
            "test_dataset_id": test_id,
            "distill_steps": "7",
            "teacher_steps": "",
            "full_finetune_steps": "0",
            "image_size": "32",
        }
        r = client.post(f"/ui/transfer-sets/{world.transfer_set_id}/train", data=form, follow_redirects=False)
        assert r.status_code == 303, r.text
        job_id = r.headers["location"].rsplit("/", 1)[-1]
        with db() as s:  # type: ignore[operator]
            job = s.get(Job, job_id)
            assert job is not None and job.kind == "pipeline" and job.status == "queued"
            request, config = job.params["request"], job.params["config"]
            ts = s.get(TransferSet, world.transfer_set_id)
            assert ts is not None and ts.status == "ready"  # the page brought it up to date
            manifest = ts.manifest_path
        assert request["transfer_set_id"] == world.transfer_set_id and request["budget"] == "fast"
        assert request["dataset_id"] == world.dataset_id and request["test_dataset_id"] == test_id
        assert config["data"]["transfer"]["path"] == manifest  # this set's items, no curate stage
        assert "curate" not in config["stages"] and config["stages"][-1] == "evaluate"
        assert config["distill"]["steps"] == 7 and config["finetune_teacher"]["full_finetune"]["steps"] == 0
        assert config["finetune_teacher"]["linear_probe"]["steps"] == 100  # blank: the budget's

        # the job page says what it trains, with which budget and steps
        job_page = client.get(f"/ui/jobs/{job_id}").text
        for element, value in (
            ("job-teacher", "timm:test_vit"),
            ("job-student", "timm:test_efficientnet"),
            ("job-budget", "fast"),
            ("job-distill-steps", "7 of 64 images"),
            ("job-teacher-steps", "100"),
        ):
            assert f'<dd id="{element}">{value}</dd>' in job_page, element
        assert f'href="/ui/transfer-sets/{world.transfer_set_id}"' in job_page

        # cancel, retry (it queues again, as POST /v1/jobs/{id}/retry does), cancel
        token = CSRF.search(job_page).group(1)  # type: ignore[union-attr]
        early = client.post(f"/ui/jobs/{job_id}/retry", data={"csrf": token})
        assert early.status_code == 409 and "only failed or canceled" in error_on(
            early.text, "job-action-error"
        )
        assert (
            client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": token}, follow_redirects=False).status_code
            == 303
        )
        r = client.post(f"/ui/jobs/{job_id}/retry", data={"csrf": token}, follow_redirects=False)
        assert r.status_code == 303
        with db() as s:  # type: ignore[operator]
            job = s.get(Job, job_id)
            assert job is not None and job.status == "queued" and job.params["retries"] == 1
        assert 'id="job-cancel"' in client.get(f"/ui/jobs/{job_id}").text
        assert (
            client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": token}, follow_redirects=False).status_code
            == 303
        )

        # refused trainings: the set's page with the reason, the form as it was sent; nothing queued
        for change, code, reason in (
            ({"student": "timm:resnet_typo"}, 422, "resnet_typo"),
            ({"budget": "huge"}, 422, "budget"),
            ({"distill_steps": "lots"}, 422, "recipe.distill.steps"),
            ({"test_dataset_id": "0" * 32}, 404, "Test dataset"),
        ):
            r = client.post(f"/ui/transfer-sets/{world.transfer_set_id}/train", data={**form, **change})
            assert r.status_code == code, (change, r.status_code)
            assert reason in error_on(r.text, "train-error"), (change, r.text[:400])
            assert 'value="timm:test_efficientnet"' in r.text or "student" in change
        assert jobs_of(db, world) - before == {job_id}
        r = client.post(f"/ui/transfer-sets/{world.transfer_set_id}/train", data={**form, "csrf": ""})
        assert r.status_code == 403
        r = client.post(
            f"/ui/transfer-sets/{world.transfer_set_id}/train",
            data=form,
            headers={"Origin": "https://evil.example"},
        )
        assert r.status_code == 403

        # another tenant: the set, its estimate and its form are 404s; its own form cannot name our test set
        login(client, world.other_key)
        other = form_token(client, "/ui/datasets")
        for path in (f"/ui/transfer-sets/{world.transfer_set_id}/estimate", f"/ui/jobs/{job_id}"):
            assert client.get(path).status_code == 404, path
        r = client.post(f"/ui/transfer-sets/{world.transfer_set_id}/train", data={**form, "csrf": other})
        assert r.status_code == 404 and "Not found" in r.text
        assert client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": other}).status_code == 404
        assert jobs_of(db, world) - before == {job_id}
    finally:
        cancel_left_over(db, world, before)


def test_finished_job_page_has_no_cancel_and_says_its_models(world: World, client: TestClient) -> None:
    login(client, world.key)
    page = client.get(f"/ui/jobs/{world.job_id}").text
    assert 'id="job-cancel"' not in page and 'id="job-retry"' not in page
    # a job submitted without a budget in its request (the world's, made by hand) says so
    assert '<dd id="job-student">timm:test_efficientnet</dd>' in page
    assert '<dd id="job-teacher">timm:test_vit</dd>' in page
    assert '<dd id="job-budget">not recorded</dd>' in page
    assert '<dd id="job-distill-steps">30 of 8 images</dd>' in page


def test_models_list_shows_the_student_and_the_model_page_predicts_as_printed(
    world: World, client: TestClient, tmp_path: Path
) -> None:
    login(client, world.key)
    listing = client.get("/ui/models").text
    row = re.search(rf'<tr data-model="{world.model_id}">(.*?)</tr>', listing, re.S)
    assert row and '<td class="mono model-student">timm:test_efficientnet</td>' in row.group(1)

    page = client.get(f"/ui/models/{world.model_id}").text
    assert '<dd id="model-student" class="mono">timm:test_efficientnet</dd>' in page
    commands = html.unescape(
        re.search(r'<pre class="mono" id="predict-commands">(.*?)</pre>', page, re.S).group(1)
    )  # type: ignore[union-attr]
    lines = commands.strip().splitlines()
    assert lines == [
        "kt login https://testserver --key YOUR_API_KEY",
        f"kt models download {world.model_id} --format onnx -o model-{world.model_id}.onnx",
        f"kt predict model-{world.model_id}.onnx IMAGES... --format onnx",
    ]
    # the page's two buttons save what the last line reads, under the names the page gives
    onnx = client.get(f"/ui/models/{world.model_id}/download?format=onnx")
    card = client.get(f"/ui/models/{world.model_id}/card")
    assert f'filename="model-{world.model_id}.onnx"' in onnx.headers["content-disposition"]
    assert f'filename="model-{world.model_id}.model_card.json"' in card.headers["content-disposition"]
    assert json.loads(card.content)["classes"] == world.classes
    (tmp_path / f"model-{world.model_id}.onnx").write_bytes(onnx.content)
    (tmp_path / f"model-{world.model_id}.model_card.json").write_bytes(card.content)
    images = world.settings.data_dir / "tenants" / world.tenant_id / "datasets" / world.dataset_id / "images"
    argv = shlex.split(lines[-1].replace("IMAGES...", shlex.quote(str(images))))
    assert argv[0] == "kt"
    proc = subprocess.run(
        [str(VENV_BIN / "kt"), *argv[1:], "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == sum(world.class_counts.values())
    assert {row["label"] for row in rows} <= set(world.classes)
    # another tenant: the card is a 404 like the model
    login(client, world.other_key)
    assert client.get(f"/ui/models/{world.model_id}/card").status_code == 404


def test_teacher_fields_suggest_the_registered_models_the_tenant_may_use(
    world: World, client: TestClient, db: object
) -> None:
    from service.db.models import RegisteredModel, Tenant

    with db() as s:  # type: ignore[operator]
        other = s.scalars(select(Tenant).where(Tenant.name == "globex")).one()
        rows = [
            RegisteredModel(name="shared-vfm", arch="vit_small_patch16_224", sha256="0" * 64, bytes=1),
            RegisteredModel(
                name="globex-only", arch="resnet50", tenant_id=other.id, sha256="1" * 64, bytes=1
            ),
        ]
        s.add_all(rows)
        s.commit()
        ids = [r.id for r in rows]
    try:
        login(client, world.key)
        for page in (f"/ui/datasets/{world.dataset_id}", f"/ui/transfer-sets/{world.transfer_set_id}"):
            text = client.get(page).text
            listed = re.findall(r'<datalist id="teacher-specs">(.*?)</datalist>', text, re.S)
            assert listed, page
            specs = re.findall(r'<option value="([^"]+)">', listed[0])
            assert specs == [
                "timm:vit_small_patch16_224@registered:shared-vfm",
                "timm:vit_small_patch14_dinov2.lvd142m",
            ]
    finally:
        with db() as s:  # type: ignore[operator]
            for row_id in ids:
                s.delete(s.get(RegisteredModel, row_id))
            s.commit()
