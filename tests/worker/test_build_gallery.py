"""Building a gallery as a job: ``POST /v1/admin/galleries`` on a real uvicorn server (SQLite, a
real Redis broker), the job run by ``worker.runner`` in-process on the same database, and the
gallery then listed and used for curation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from service.admin import create_tenant_key
from service.db.session import make_engine, make_session_factory
from tests.service.test_api import Api, imagefolder_zip, make_settings, running_api, upload
from worker import runner

ENCODER = "timm:test_efficientnet"  # random init, 32 px: seconds on CPU


@pytest.fixture
def gallery_api(tmp_path: Path, redis_url: str, worker_demo_data: dict[str, Path]) -> Iterator[Api]:
    # server paths are read from KT_GALLERY_ROOTS only: the demo images and this test's own folder
    roots = [worker_demo_data["transfer"].parent, tmp_path / "sources"]
    settings = make_settings(
        tmp_path / "data", broker_url=redis_url, result_backend=redis_url, gallery_roots=roots
    )
    with running_api(settings) as api:
        yield api


def queued(redis_url: str, queue: str) -> list[str]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(raw)["headers"]["argsrepr"].strip("[]'\"") for raw in client.lrange(queue, 0, -1)]
    finally:
        client.close()


def admin_key(api: Api, tenant: str = "ops") -> str:
    engine = make_engine(api.settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            return create_tenant_key(session, tenant, admin=True)
    finally:
        engine.dispose()


def run_in_process(api: Api, job_id: str, **kw: Any) -> str:
    engine = make_engine(api.settings.database_url)
    try:
        return runner.run_job(make_session_factory(engine), job_id, api.settings, **kw)
    finally:
        engine.dispose()


def test_admin_builds_a_gallery_with_a_job(
    gallery_api: Api, worker_demo_data: dict[str, Path], redis_url: str
) -> None:
    admin = admin_key(gallery_api)
    with gallery_api.client(admin) as client:
        dataset = upload(client, imagefolder_zip({"cat": 2, "dog": 3})).json()
        body = {
            "name": "web-tiny",
            "sources": [{"path": str(worker_demo_data["transfer"])}, {"dataset_id": dataset["id"]}],
            "encoder": ENCODER,
            "image_size": 32,
            "index_kind": "flat",
            "batch_size": 8,
            "shard_size": 12,
            "device": "cpu",
        }
        created = client.post("/v1/admin/galleries", json=body)
        assert created.status_code == 202, created.text
        job = created.json()
        assert (job["kind"], job["status"], job["queue"]) == ("build_gallery", "queued", "cpu")
        assert job["id"] in queued(redis_url, "cpu")
        # one build per name at a time
        twice = client.post("/v1/admin/galleries", json=body)
        assert twice.status_code == 409 and job["id"] in twice.json()["detail"]

        assert run_in_process(gallery_api, job["id"], log_interval_s=0) == "succeeded"

        done = client.get(f"/v1/jobs/{job['id']}").json()
        assert (done["status"], done["progress"], done["stage"]) == ("succeeded", 1.0, "build_gallery")
        listing = client.get("/v1/galleries").json()
        assert listing["count"] == 1
        gallery = listing["data"][0]
        # 16 unlabeled images + the 5 of the uploaded dataset
        assert {k: gallery[k] for k in ("name", "size", "encoder", "index_kind")} == {
            "name": "web-tiny",
            "size": 21,
            "encoder": ENCODER,
            "index_kind": "flat",
        }
        assert done["metrics"]["gallery_id"] == gallery["id"] and done["metrics"]["size"] == 21
        assert "build_gallery" in done["stage_timings"]
        on_disk = gallery_api.settings.data_dir / "galleries" / job["id"]
        assert (on_disk / "_SUCCESS").is_file() and len(list((on_disk / "shards").iterdir())) == 2

        log = client.get(f"/v1/jobs/{job['id']}/logs").text
        assert "attempt 1 of build_gallery job started" in log
        assert "build_gallery: 21/21 images" in log and "(job 100%" in log
        assert f"gallery 'web-tiny' registered as {gallery['id']}" in log and log.rstrip().endswith(
            "succeeded"
        )

        # the same name again, now that the gallery exists
        exists = client.post("/v1/admin/galleries", json=body)
        assert exists.status_code == 409 and "exists already" in exists.json()["detail"]

        # any tenant can curate from it
    with gallery_api.client(gallery_api.key("acme")) as client:
        own = upload(client, imagefolder_zip({"cat": 2, "dog": 2})).json()
        ts = client.post(
            "/v1/transfer-sets", json={"dataset_id": own["id"], "gallery_id": gallery["id"], "size": 4}
        )
        assert ts.status_code == 202, ts.text


def test_a_gallery_job_with_unreadable_sources_fails_with_the_reason(
    gallery_api: Api, tmp_path: Path
) -> None:
    empty = tmp_path / "sources" / "empty"
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    admin = admin_key(gallery_api)
    with gallery_api.client(admin) as client:
        body = {"name": "empty", "sources": [{"path": str(empty)}], "encoder": ENCODER, "image_size": 32}
        job = client.post("/v1/admin/galleries", json=body).json()
        assert run_in_process(gallery_api, job["id"]) == "failed"
        failed = client.get(f"/v1/jobs/{job['id']}").json()
        # named relative to its gallery root: a job's error never shows a server path (issue 14 item 10)
        assert failed["error"] and "gallery-root:sources/empty" in failed["error"]
        assert str(empty) not in failed["error"]
        assert client.get("/v1/galleries").json()["count"] == 0
        assert "job failed: " in client.get(f"/v1/jobs/{job['id']}/logs").text
