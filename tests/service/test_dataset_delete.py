"""Deleting a dataset deletes what shows its images, or is refused while those exist (issue 14 item
9): transfer sets curated for it (their report, manifest and job folder), the curate stage of
training jobs that curated from it, galleries built from it and every transfer set curated from
those (another tenant's too). Without ``cascade=true`` the delete answers 409 and lists them;
with it, all of them go and the report URLs answer 404. Retrying a job whose transfer set or
gallery went with it answers 409 (issue 14 item 10). Real uvicorn on PostgreSQL and on SQLite
with the SQLite broker; no worker runs: a job's finished state and files are written here as the
worker leaves them (``worker.runner``: the row, then ``jobs/<id>/run/<stage>/``)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from service import storage
from service.db.models import Gallery, Job, Model
from service.db.session import make_engine, make_session_factory
from service.ui.auth import COOKIE_NAME
from tests.service.conftest import fresh_postgres_database
from tests.service.test_api import Api, imagefolder_zip, make_settings, running_api, upload
from tests.service.test_contract import key_for

REPORT = "<!DOCTYPE html><html><body><img src='data:image/jpeg;base64,/9j/4AAQ'>{marker}</body></html>\n"
TINY = {"teacher": "timm:test_vit", "student": "timm:resnet10t"}


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def dapi(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp(f"ddel-{request.param}")
    with contextlib.ExitStack() as stack:
        extra: dict[str, object] = {}
        if request.param == "postgresql":
            extra["database_url"] = stack.enter_context(fresh_postgres_database("kt_ddel"))
        settings = make_settings(root / "data", rate_limit_per_min=0, **extra)
        yield stack.enter_context(running_api(settings))


@contextlib.contextmanager
def _session(api: Api) -> Iterator[Any]:
    engine = make_engine(api.settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def write_gallery(api: Api, folder: Path, name: str, sources: list[str]) -> str:
    """A gallery folder (``gallery.json`` naming its sources) and its row, as a build leaves them."""
    folder.mkdir(parents=True)
    (folder / "gallery.json").write_text(
        json.dumps({"name": name, "sources": [{"path": s} for s in sources]})
    )
    gallery = Gallery(name=name, path=str(folder), size=4, encoder="timm:test_vit", index_kind="flat", dim=8)
    with _session(api) as session:
        session.add(gallery)
        session.commit()
        return gallery.id


def finish(api: Api, job_id: str, curated: bool = True, model: bool = False) -> Path:
    """Job ``job_id`` succeeded; with ``curated``, its curate stage wrote a report and a manifest
    (the worker's layout); with ``model``, it also exported a model. Returns the job's folder."""
    folder = api.settings.data_dir / "jobs" / job_id
    if curated:
        curate = folder / "run" / "curate"
        curate.mkdir(parents=True)
        (curate / "report.html").write_text(REPORT.format(marker=f"report of {job_id}"))
        (curate / "manifest.jsonl").write_text(
            json.dumps({"id": 0, "source": "/g/src", "key": "a.png"}) + "\n"
        )
        (curate / "summary.json").write_text(json.dumps({"size": 1}))
    with _session(api) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="succeeded", progress=1.0))
        if model:
            export = folder / "run" / "export"
            export.mkdir(parents=True)
            (export / "model.safetensors").write_bytes(b"weights")
            tenant_id = session.get(Job, job_id).tenant_id
            session.add(
                Model(
                    tenant_id=tenant_id,
                    job_id=job_id,
                    files={"safetensors": str(export / "model.safetensors")},
                )
            )
        session.commit()
    return folder


@dataclass
class World:
    alice: str
    bob: str
    dataset: str  # alice's, the one deleted
    bystander: str  # alice's other dataset: nothing of it may go
    transfer_set: str  # curated for `dataset`
    curate_job: str
    trained_on_set: str  # a canceled training job on `transfer_set`
    own_curation: str  # a training job that curated from `dataset` in its own curate stage
    plain_job: str  # a failed training job on `dataset` without curation: shows no images
    gallery: str  # built from `dataset`
    gallery_name: str
    bobs_set: str  # bob's transfer set curated from `gallery`
    bobs_job: str
    kept_set: str  # alice's transfer set of `bystander` from the ordinary gallery


@pytest.fixture
def world(dapi: Api, tmp_path: Path) -> World:
    alice, bob = key_for(dapi, f"alice-{tmp_path.name}", admin=True), key_for(dapi, f"bob-{tmp_path.name}")
    plain = write_gallery(dapi, tmp_path / "plain-gallery", f"plain-{tmp_path.name}", [str(tmp_path / "src")])
    with dapi.client(alice) as client, dapi.client(bob) as bobs:
        dataset = upload(client, imagefolder_zip({"cat": 2, "dog": 2})).json()["id"]
        bystander = upload(client, imagefolder_zip({"cat": 2, "dog": 2})).json()["id"]
        bobs_dataset = upload(bobs, imagefolder_zip({"cat": 2, "dog": 2})).json()["id"]
        images = storage.dataset_dir(dapi.settings.data_dir, _tenant_of(dapi, dataset), dataset) / "images"
        name = f"from-alice-{tmp_path.name}"
        gallery = write_gallery(dapi, dapi.settings.data_dir / "galleries" / name, name, [str(images)])

        def curate(c: httpx.Client, ds: str, gid: str) -> dict[str, Any]:
            ts = c.post("/v1/transfer-sets", json={"dataset_id": ds, "gallery_id": gid, "size": 4})
            assert ts.status_code == 202, ts.text
            finish(dapi, ts.json()["job_id"])
            return dict(ts.json())

        ts = curate(client, dataset, plain)
        kept = curate(client, bystander, plain)
        bobs_ts = curate(bobs, bobs_dataset, gallery)
        on_set = client.post("/v1/jobs", json={**TINY, "dataset_id": bystander, "transfer_set_id": ts["id"]})
        assert on_set.status_code == 202, on_set.text
        assert client.post(f"/v1/jobs/{on_set.json()['id']}/cancel").json()["status"] == "canceled"
        own = client.post("/v1/jobs", json={**TINY, "dataset_id": dataset, "gallery_id": plain})
        assert own.status_code == 202, own.text
        finish(dapi, own.json()["id"], model=True)
        plain_job = client.post("/v1/jobs", json={**TINY, "dataset_id": dataset}).json()["id"]
        with _session(dapi) as session:
            session.execute(update(Job).where(Job.id == plain_job).values(status="failed", error="boom"))
            session.commit()
    return World(
        alice, bob, dataset, bystander, ts["id"], ts["job_id"], on_set.json()["id"], own.json()["id"],
        plain_job, gallery, name, bobs_ts["id"], bobs_ts["job_id"], kept["id"],
    )  # fmt: skip


def _tenant_of(api: Api, dataset_id: str) -> str:
    from service.db.models import Dataset

    with _session(api) as session:
        return str(session.get(Dataset, dataset_id).tenant_id)


@contextlib.contextmanager
def ui_client(api: Api, key: str) -> Iterator[httpx.Client]:
    """A browser logged in to /ui (the Secure cookie sent by hand, as a browser on 127.0.0.1 does)."""
    with httpx.Client(base_url=api.url, timeout=30) as browser:
        login = browser.post("/ui/login", data={"api_key": key}, follow_redirects=False)
        assert login.status_code == 303, login.text
        browser.headers["Cookie"] = f"{COOKIE_NAME}={login.cookies[COOKIE_NAME]}"
        yield browser


def test_a_dataset_with_derived_data_is_not_deleted_without_cascade(dapi: Api, world: World) -> None:
    with dapi.client(world.alice) as client:
        refused = client.delete(f"/v1/datasets/{world.dataset}")
        assert refused.status_code == 409, refused.text
        body = refused.json()
        assert body["dependents"] == {
            "transfer_sets": [world.transfer_set],
            "jobs": [world.own_curation],
            "galleries": [{"id": world.gallery, "name": world.gallery_name}],
            "other_tenants": 1,  # bob's set from the gallery: counted, its id not shown
        }
        for needle in (world.transfer_set, world.own_curation, world.gallery_name, "cascade=true"):
            assert needle in body["detail"], body["detail"]
        assert world.bobs_set not in refused.text
        # nothing went: the dataset, its transfer set and the report are all still there
        assert client.get(f"/v1/datasets/{world.dataset}").status_code == 200
        assert client.get(f"/v1/transfer-sets/{world.transfer_set}/report").status_code == 200
    with ui_client(dapi, world.alice) as browser:
        assert browser.get(f"/ui/jobs/{world.curate_job}/transfer-set/report").status_code == 200


def test_cascade_deletes_everything_that_shows_the_images(dapi: Api, world: World) -> None:
    data_dir = dapi.settings.data_dir
    with dapi.client(world.alice) as client, dapi.client(world.bob) as bob:
        # a job still training on the transfer set: refused, it would fail midway
        retried = client.post(f"/v1/jobs/{world.trained_on_set}/retry")
        assert retried.status_code == 202, retried.text
        busy = client.delete(f"/v1/datasets/{world.dataset}", params={"cascade": "true"})
        assert busy.status_code == 409 and world.trained_on_set in busy.json()["detail"], busy.text
        client.post(f"/v1/jobs/{world.trained_on_set}/cancel")

        deleted = client.delete(f"/v1/datasets/{world.dataset}", params={"cascade": "true"})
        assert deleted.status_code == 204, deleted.text

        assert client.get(f"/v1/datasets/{world.dataset}").status_code == 404
        for path in (
            f"/v1/transfer-sets/{world.transfer_set}",
            f"/v1/transfer-sets/{world.transfer_set}/report",
        ):
            assert client.get(path).status_code == 404, path
        assert client.get(f"/v1/jobs/{world.curate_job}").status_code == 404
        assert not (data_dir / "jobs" / world.curate_job).exists()
        assert not (data_dir / "jobs" / world.own_curation / "run" / "curate").exists()
        assert not (data_dir / "galleries" / world.gallery_name).exists()
        assert all(g["id"] != world.gallery for g in client.get("/v1/galleries").json()["data"])
        assert bob.get(f"/v1/transfer-sets/{world.bobs_set}").status_code == 404
        assert not (data_dir / "jobs" / world.bobs_job).exists()

        # kept: the model of the job that curated from it, the other dataset and its transfer set
        model = client.get("/v1/models").json()["data"]
        assert [m["job_id"] for m in model] == [world.own_curation]
        assert client.get(f"/v1/models/{model[0]['id']}/download").content == b"weights"
        assert client.get(f"/v1/transfer-sets/{world.kept_set}/report").status_code == 200
        assert client.get(f"/v1/datasets/{world.bystander}").status_code == 200

        # their inputs are gone: retrying answers 409 instead of a job that can only fail
        for job_id, gone in ((world.trained_on_set, world.transfer_set), (world.plain_job, world.dataset)):
            again = client.post(f"/v1/jobs/{job_id}/retry")
            assert again.status_code == 409 and gone in again.json()["detail"], again.text
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] in ("canceled", "failed")
    with ui_client(dapi, world.alice) as browser:
        for page in (
            f"/ui/jobs/{world.curate_job}/transfer-set/report",
            f"/ui/jobs/{world.own_curation}/transfer-set/report",
            f"/ui/transfer-sets/{world.transfer_set}/report",
        ):
            assert browser.get(page).status_code == 404, page


def test_a_job_whose_gallery_is_gone_is_not_retried(dapi: Api, tmp_path: Path) -> None:
    key = key_for(dapi, f"carol-{tmp_path.name}")
    gallery = write_gallery(dapi, tmp_path / "g", f"g-{tmp_path.name}", [str(tmp_path / "src")])
    with dapi.client(key) as client:
        dataset = upload(client, imagefolder_zip({"cat": 2, "dog": 2})).json()["id"]
        job = client.post("/v1/jobs", json={**TINY, "dataset_id": dataset, "gallery_id": gallery}).json()
        client.post(f"/v1/jobs/{job['id']}/cancel")
        (tmp_path / "g" / "gallery.json").unlink()
        (tmp_path / "g").rmdir()  # an operator removed the gallery's files
        again = client.post(f"/v1/jobs/{job['id']}/retry")
        assert again.status_code == 409, again.text
        assert gallery in again.json()["detail"] and "GET /v1/galleries" in again.json()["detail"]
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "canceled"


def test_kt_datasets_delete_says_what_depends_on_it_and_cascades(
    dapi: Api, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kt_client.cli import app

    for name, value in {
        "KT_API_URL": dapi.url,
        "KT_API_KEY": world.alice,
        "KT_CONFIG_DIR": str(tmp_path),
    }.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    refused = runner.invoke(app, ["datasets", "delete", world.dataset])
    assert refused.exit_code == 1, (refused.stdout, refused.stderr)
    assert world.transfer_set in refused.stderr
    assert f"`kt datasets delete {world.dataset} --cascade`" in refused.stderr, refused.stderr
    done = runner.invoke(app, ["datasets", "delete", world.dataset, "--cascade"])
    assert done.exit_code == 0, (done.stdout, done.stderr)
    assert world.dataset in done.stdout
    with dapi.client(world.alice) as client:
        assert client.get(f"/v1/transfer-sets/{world.transfer_set}").status_code == 404
