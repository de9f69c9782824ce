"""Where an admin gallery build may read from: server paths only inside ``KT_GALLERY_ROOTS`` (symlinks
resolved first), never inside or around ``KT_DATA_DIR`` (every tenant's uploads); with no roots
configured, no server path at all; datasets by id, the caller's own only. Real uvicorn over SQLite
with the SQLite broker (submitted builds stay queued; no worker runs)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from service import storage
from service.db.models import Dataset, Job, new_id
from service.db.session import make_engine, make_session_factory
from service.serve import settings_env
from service.settings import Settings
from tests.service.test_api import Api, imagefolder_zip, make_settings, running_api, upload
from tests.service.test_contract import key_for


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``base/`` (a root: it holds the data dir, which stays off limits) with ``images/`` (a root
    too), and ``elsewhere/``, outside every root."""
    base = tmp_path_factory.mktemp("galsrc")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    images = base / "images"
    (images / "shards").mkdir(parents=True)
    (images / "a.png").write_bytes(b"png")
    return {"base": base, "images": images, "elsewhere": elsewhere, "data": base / "data"}


@pytest.fixture(scope="module")
def gapi(places: dict[str, Path]) -> Iterator[Api]:
    settings = make_settings(places["data"], gallery_roots=[places["images"], places["base"]])
    with running_api(settings) as api:
        yield api


@pytest.fixture(scope="module")
def keys(gapi: Api) -> dict[str, str]:
    return {"admin": key_for(gapi, "ops", admin=True), "rival": key_for(gapi, "rival")}


def build(client: httpx.Client, *sources: dict[str, str]) -> httpx.Response:
    body = {"name": f"g-{new_id()[:12]}", "sources": list(sources)}
    return client.post("/v1/admin/galleries", json={**body, "encoder": "timm:test_efficientnet"})


def refused(response: httpx.Response, *needles: str) -> str:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    for needle in needles:
        assert needle in detail, detail
    return str(detail)


def row(api: Api, model: Any, row_id: str) -> Any:
    engine = make_engine(api.settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            found = session.get(model, row_id)
            assert found is not None
            return found
    finally:
        engine.dispose()


def job_sources(api: Api, job_id: str) -> list[Any]:
    return list(row(api, Job, job_id).params["config"]["sources"])


def test_a_path_inside_a_root_is_accepted_as_resolved(
    gapi: Api, keys: dict[str, str], places: dict[str, Path]
) -> None:
    link = places["elsewhere"] / "to-images"
    link.symlink_to(places["images"])  # outside every root, but what it points at is inside one
    pattern = f"{places['images']}/shards/{{00000..00003}}.tar"
    with gapi.client(keys["admin"]) as client:
        ok = build(client, {"path": str(places["images"])}, {"path": str(link / "a.png")}, {"path": pattern})
    assert ok.status_code == 202, ok.text
    assert job_sources(gapi, ok.json()["id"]) == [
        str(places["images"].resolve()),
        str((places["images"] / "a.png").resolve()),
        f"{places['images'].resolve()}/shards/{{00000..00003}}.tar",
    ]


def test_a_path_inside_the_data_dir_is_refused(
    gapi: Api, keys: dict[str, str], places: dict[str, Path]
) -> None:
    with gapi.client(keys["rival"]) as client:
        theirs = upload(client, imagefolder_zip({"cat": 1, "dog": 1})).json()
    rival_tenant = row(gapi, Dataset, theirs["id"]).tenant_id
    their_images = storage.dataset_dir(gapi.settings.data_dir, rival_tenant, theirs["id"]) / "images"
    assert their_images.is_dir()
    sneaky = places["images"] / "sneaky"
    sneaky.symlink_to(gapi.settings.data_dir / "tenants")  # a link inside a root into the data dir
    with gapi.client(keys["admin"]) as client:
        for path in (their_images, gapi.settings.data_dir, gapi.settings.data_dir / "kt.db", sneaky):
            refused(build(client, {"path": str(path)}), "is inside", "KT_DATA_DIR", "dataset_id")
        # a folder around the data dir would take it in whole
        refused(build(client, {"path": str(places["base"])}), "contains", "KT_DATA_DIR")
        refused(build(client, {"path": f"{places['base']}/{{data,images}}"}), "contains", "KT_DATA_DIR")


def test_a_path_outside_the_roots_is_refused(
    gapi: Api, keys: dict[str, str], places: dict[str, Path]
) -> None:
    away = places["images"] / "away"
    away.symlink_to(places["elsewhere"])
    with gapi.client(keys["admin"]) as client:
        for path in (places["elsewhere"], away, Path("/etc")):
            detail = refused(build(client, {"path": str(path)}), "outside", "KT_GALLERY_ROOTS")
            assert str(places["images"].resolve()) in detail
        refused(build(client, {"path": "/no/such/dir"}), "does not exist", "KT_GALLERY_ROOTS")
        refused(build(client, {"path": "/srv/../etc"}), "'..'")


def test_another_tenants_dataset_is_not_found(gapi: Api, keys: dict[str, str]) -> None:
    with gapi.client(keys["rival"]) as client:
        theirs = upload(client, imagefolder_zip({"cat": 1, "dog": 1})).json()
    with gapi.client(keys["admin"]) as client:
        mine = upload(client, imagefolder_zip({"cat": 1, "dog": 1})).json()
        response = build(client, {"dataset_id": theirs["id"]})
        assert response.status_code == 404, response.text
        assert theirs["id"] in response.json()["detail"]
        assert build(client, {"dataset_id": mine["id"]}).status_code == 202


def test_without_roots_only_datasets_are_accepted(tmp_path: Path, places: dict[str, Path]) -> None:
    with running_api(make_settings(tmp_path / "data")) as api:
        admin = key_for(api, "ops", admin=True)
        with api.client(admin) as client:
            refused(build(client, {"path": str(places["images"])}), "KT_GALLERY_ROOTS is empty", "dataset_id")
            dataset = upload(client, imagefolder_zip({"cat": 1, "dog": 1})).json()
            assert build(client, {"dataset_id": dataset["id"]}).status_code == 202


def test_gallery_roots_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("KT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KT_GALLERY_ROOTS", json.dumps([str(a), str(b)]))
    assert Settings().gallery_roots == [a.resolve(), b.resolve()]
    monkeypatch.setenv("KT_GALLERY_ROOTS", f"{a}{os.pathsep}{b}")
    settings = Settings()
    assert settings.gallery_roots == [a.resolve(), b.resolve()]
    assert settings_env(settings)["KT_GALLERY_ROOTS"] == f"{a.resolve()}{os.pathsep}{b.resolve()}"
    monkeypatch.delenv("KT_GALLERY_ROOTS")
    assert Settings().gallery_roots == []
    with pytest.raises(ValidationError, match="is inside KT_DATA_DIR"):
        Settings(gallery_roots=[tmp_path / "data" / "x"])
    with pytest.raises(ValidationError, match="is relative"):
        Settings(gallery_roots=[Path("rel")])
