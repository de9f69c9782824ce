"""NUL characters, which PostgreSQL text cannot hold, answer 422 before any work: in a URL's path
(every id of ``/v1`` and ``/ui``) or query, in any string of a JSON body, and in an upload's form
fields (refused as the field arrives, before the archive is read). Real uvicorn on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from service.db.models import Dataset
from service.db.session import make_engine, make_session_factory
from service.ui.auth import COOKIE_NAME
from tests.service.conftest import fresh_postgres_database
from tests.service.test_api import Api, imagefolder_zip, make_settings, make_zip, running_api, upload
from tests.service.test_contract import key_for


@pytest.fixture(scope="module")
def pg_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with fresh_postgres_database("kt_nul") as url:
        settings = make_settings(tmp_path_factory.mktemp("nul") / "data", database_url=url)
        with running_api(settings) as api:
            yield api


@pytest.fixture(scope="module")
def keys(pg_api: Api) -> dict[str, str]:
    return {"owner": key_for(pg_api, "owner"), "admin": key_for(pg_api, "owner", admin=True)}


def assert_nul_refused(response: httpx.Response, where: str = "") -> None:
    assert response.status_code == 422, f"{response.request.method} {response.request.url}: {response.text}"
    detail = response.json()["detail"]
    assert "NUL" in detail and "remove" in detail, detail
    assert where in detail, detail


def dataset_count(api: Api) -> int:
    engine = make_engine(api.settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            return int(session.scalar(select(func.count()).select_from(Dataset)) or 0)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/jobs/%00"),
        ("GET", "/v1/jobs/a%00b/logs"),
        ("POST", "/v1/jobs/a%00b/cancel"),
        ("GET", "/v1/datasets/a%00b"),
        ("DELETE", "/v1/datasets/a%00b"),
        ("GET", "/v1/transfer-sets/a%00b"),
        ("GET", "/v1/models/a%00b"),
        ("GET", "/v1/jobs?status=%00"),
        ("GET", "/v1/datasets?limit=1&x=a%00"),
    ],
)
def test_a_nul_in_the_url_is_refused(pg_api: Api, keys: dict[str, str], method: str, path: str) -> None:
    with pg_api.client(keys["owner"]) as client:
        assert_nul_refused(client.request(method, path), "URL")


def test_a_nul_in_a_ui_url_is_refused(pg_api: Api, keys: dict[str, str]) -> None:
    with httpx.Client(base_url=pg_api.url, timeout=30) as client:
        login = client.post("/ui/login", data={"api_key": keys["owner"]}, follow_redirects=False)
        assert login.status_code == 303, login.text
        # the session cookie is Secure, which httpx keeps for https: sent by hand, as a browser on 127.0.0.1 does
        client.headers["Cookie"] = f"{COOKIE_NAME}={login.cookies[COOKIE_NAME]}"
        assert client.get("/ui/jobs").status_code == 200  # the cookie works
        for path in ("/ui/jobs/a%00b", "/ui/datasets/a%00b", "/ui/models/%00", "/ui/login?next=%00"):
            assert_nul_refused(client.get(path), "URL")


def _bodies(dataset_id: str) -> list[tuple[str, dict[str, Any], str]]:
    job = {"dataset_id": dataset_id, "teacher": "timm:test_vit", "student": "timm:resnet10t"}
    return [
        ("/v1/jobs", {**job, "dataset_id": "a\u0000b"}, "body.dataset_id"),
        ("/v1/jobs", {**job, "test_dataset_id": "\u0000"}, "body.test_dataset_id"),
        ("/v1/jobs", {**job, "gallery_id": "g\u0000"}, "body.gallery_id"),
        ("/v1/jobs", {**job, "teacher": "timm:test_vit\u0000"}, "body.teacher"),
        ("/v1/transfer-sets", {"dataset_id": dataset_id, "gallery_id": "a\u0000b"}, "body.gallery_id"),
    ]


def test_a_nul_in_a_json_string_is_refused(pg_api: Api, keys: dict[str, str]) -> None:
    with pg_api.client(keys["owner"]) as client:
        dataset_id = upload(client, imagefolder_zip({"cat": 2, "dog": 2})).json()["id"]
        for path, body, where in _bodies(dataset_id):
            assert_nul_refused(client.post(path, json=body), where)
    with pg_api.client(keys["admin"]) as client:
        build = {"name": "g", "sources": [{"dataset_id": dataset_id}, {"path": "/srv/a\u0000b"}]}
        assert_nul_refused(client.post("/v1/admin/galleries", json=build), "body.sources.1.path")
        build = {"name": "g", "sources": [{"dataset_id": "a\u0000b"}]}
        assert_nul_refused(client.post("/v1/admin/galleries", json=build), "body.sources.0.dataset_id")


def test_a_nul_in_an_upload_name_is_refused_before_the_archive_is_read(
    pg_api: Api, keys: dict[str, str]
) -> None:
    before = dataset_count(pg_api)
    tmp = pg_api.settings.data_dir / "tmp"
    with pg_api.client(keys["owner"]) as client:
        assert_nul_refused(upload(client, imagefolder_zip({"cat": 2, "dog": 2}), name="a\x00b"), "`name`")
        # a corrupt image would be the error, were the archive read before the name
        broken = make_zip({"cat/1.png": b"not an image", "dog/1.png": b"nor this"})
        assert_nul_refused(upload(client, broken, name="\x00"), "`name`")
        assert upload(client, imagefolder_zip({"cat": 1, "dog": 1}), name="fine").status_code == 201
    assert dataset_count(pg_api) == before + 1
    leftovers = [p.name for p in tmp.iterdir()] if tmp.is_dir() else []
    assert leftovers == [], leftovers


def test_names_without_nul_still_work(pg_api: Api, keys: dict[str, str]) -> None:
    with pg_api.client(keys["owner"]) as client:
        created = upload(client, imagefolder_zip({"cat": 1, "dog": 1}), name="ünïcode ☃ name")
        assert created.status_code == 201, created.text
        assert client.get(f"/v1/datasets/{created.json()['id']}").json()["name"] == "ünïcode ☃ name"
        assert client.get("/v1/jobs/0123456789abcdef0123456789abcdef").status_code == 404
