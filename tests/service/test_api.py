"""The HTTP API through a real uvicorn server: auth, health, metrics, the dataset lifecycle
(on SQLite and PostgreSQL), and the admin CLI."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from PIL import Image

from service.admin import create_tenant_key, revoke_key
from service.app import create_app
from service.db.session import make_engine, make_session_factory
from service.security import API_KEY_CACHE_TTL_S
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run ``app`` in a uvicorn server on a free 127.0.0.1 port (in a thread); yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@dataclass
class Api:
    url: str
    settings: Settings

    def key(self, tenant: str) -> str:
        engine = make_engine(self.settings.database_url)
        try:
            with make_session_factory(engine)() as session:
                return create_tenant_key(session, tenant)
        finally:
            engine.dispose()

    def revoke(self, key: str) -> None:
        engine = make_engine(self.settings.database_url)
        try:
            with make_session_factory(engine)() as session:
                revoke_key(session, key.split("_")[1])
        finally:
            engine.dispose()

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"data_dir": data_dir, "max_upload_bytes": 200_000, "max_upload_files": 50}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@contextmanager
def running_api(settings: Settings, migrate: bool = True) -> Iterator[Api]:
    with serve(create_app(settings, migrate=migrate)) as url:
        yield Api(url=url, settings=settings)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with running_api(make_settings(tmp_path_factory.mktemp("api") / "data")) as running:
        yield running


def image_bytes(color: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format=fmt)
    return buf.getvalue()


def make_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def imagefolder_zip(counts: dict[str, int], top: str = "") -> bytes:
    files = {}
    for i, (label, n) in enumerate(counts.items()):
        for j in range(n):
            files[f"{top}{label}/img{j}.png"] = image_bytes((40 * i, 10 * j, 100))
    return make_zip(files)


def upload(client: httpx.Client, data: bytes, name: str | None = "animals") -> httpx.Response:
    form = {"name": name} if name else {}
    return client.post("/v1/datasets", files={"file": ("dataset.zip", data, "application/zip")}, data=form)


# --- health, docs, auth ---------------------------------------------------------------------


def test_health_ready_docs(api: Api) -> None:
    with api.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert client.get("/docs").status_code == 200
        paths = client.get("/v1/openapi.json").json()["paths"]
        assert {"/v1/datasets", "/v1/datasets/{dataset_id}", "/healthz", "/readyz"} <= set(paths)
        assert "multipart/form-data" in paths["/v1/datasets"]["post"]["requestBody"]["content"]


def test_auth_rejects_missing_invalid_and_revoked_keys(api: Api) -> None:
    key = api.key("auth-tenant")
    prefix = key.split("_")[1]
    bad_keys = [None, "not-a-key", f"kt_{prefix}_wrongsecret", "kt_00000000_" + "x" * 40]
    for bad in bad_keys:
        with api.client(bad) as client:
            response = client.get("/v1/datasets")
        assert response.status_code == 401, bad
        assert response.headers["www-authenticate"] == "Bearer"
        assert "API key" in response.json()["detail"]
    with api.client(key) as client:
        assert client.get("/v1/datasets").json() == {"data": [], "count": 0}
        api.revoke(key)
        # the key stays cached (trusted) for at most API_KEY_CACHE_TTL_S seconds after its lookup
        deadline = time.monotonic() + API_KEY_CACHE_TTL_S + 2
        while (response := client.get("/v1/datasets")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]


def test_readyz_reports_unreachable_database_and_broker(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path / "data",
        database_url="postgresql+psycopg://postgres@127.0.0.1:1/nothing",
        broker_url="redis://127.0.0.1:1/0",
    )
    with running_api(settings, migrate=False) as down, down.client() as client:
        assert client.get("/healthz").status_code == 200
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert set(body["failed"]) == {"database", "broker"}
    assert "database" in body["detail"] and "redis at 127.0.0.1:1" in body["detail"]


# --- the dataset lifecycle ------------------------------------------------------------------


def dataset_lifecycle(api: Api) -> None:
    owner, other = api.key("owner"), api.key("other")
    with api.client(owner) as client:
        created = upload(client, imagefolder_zip({"cat": 3, "dog": 2}, top="pets/"))
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["name"] == "animals" and body["status"] == "ready"
        assert body["num_images"] == 5
        assert body["classes"] == ["cat", "dog"]
        assert body["class_counts"] == {"cat": 3, "dog": 2}
        assert body["bytes"] > 0
        dataset_id = body["id"]
        images = api.settings.data_dir / "tenants"
        stored = sorted(p.relative_to(images).parts[2:] for p in images.rglob("*.png"))
        assert len(stored) == 5 and stored[0] == (dataset_id, "images", "cat", "img0.png")

        second = upload(client, imagefolder_zip({"a": 1, "b": 1}), name=None)
        assert second.status_code == 201, second.text
        assert second.json()["name"] == "dataset"  # from the uploaded file's name

        listing = client.get("/v1/datasets", params={"limit": 1}).json()
        assert listing["count"] == 2 and len(listing["data"]) == 1
        assert (
            client.get("/v1/datasets", params={"limit": 1, "offset": 1}).json()["data"][0]["id"] == dataset_id
        )
        assert client.get(f"/v1/datasets/{dataset_id}").json() == body
        assert client.get("/v1/datasets", params={"limit": 0}).status_code == 422

    with api.client(other) as intruder:
        assert intruder.get(f"/v1/datasets/{dataset_id}").status_code == 404
        assert intruder.delete(f"/v1/datasets/{dataset_id}").status_code == 404
        assert intruder.get("/v1/datasets").json()["count"] == 0

    with api.client(owner) as client:
        assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
        missing = client.get(f"/v1/datasets/{dataset_id}")
        assert missing.status_code == 404 and dataset_id in missing.json()["detail"]
        assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 404
    assert not any(dataset_id in str(p) for p in api.settings.data_dir.rglob("*"))
    assert list((api.settings.data_dir / "tmp").iterdir()) == []


def test_dataset_lifecycle_sqlite(api: Api) -> None:
    dataset_lifecycle(api)


def test_dataset_lifecycle_postgres(postgres_url: str, tmp_path: Path) -> None:
    with running_api(make_settings(tmp_path / "data", database_url=postgres_url)) as pg_api:
        dataset_lifecycle(pg_api)


def test_metrics_count_requests_by_route_template(api: Api) -> None:
    with api.client(api.key("metrics")) as client:
        client.get("/v1/datasets/0123456789abcdef0123456789abcdef")
        client.get("/healthz")
        text = client.get("/metrics").text
    assert "kt_http_requests_total" in text and "kt_http_request_duration_seconds_bucket" in text
    assert 'route="/v1/datasets/{dataset_id}"' in text and 'status="404"' in text
    assert "0123456789abcdef0123456789abcdef" not in text
    assert 'route="/healthz"' in text


def test_admin_cli_creates_and_revokes_keys(tmp_path: Path) -> None:
    env = {**os.environ, "KT_DATA_DIR": str(tmp_path / "data")}
    run = [sys.executable, "-m", "service.admin"]
    created = subprocess.run(
        [*run, "create-key", "--tenant", "cli"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("kt_") and len(key.split("_")[1]) == 8
    prefix = key.split("_")[1]
    revoked = subprocess.run(
        [*run, "revoke-key", prefix], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert revoked.returncode == 0 and "revoked 1" in revoked.stdout
    again = subprocess.run(
        [*run, "revoke-key", prefix], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 1 and "no active API key" in again.stderr
