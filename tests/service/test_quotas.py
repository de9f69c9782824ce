"""Per-tenant quotas through a real uvicorn server, on SQLite and on PostgreSQL, with a real Redis
broker (db 9): past its queued-jobs limit a tenant's submission (job, transfer set, retry) answers
429 with ``Retry-After`` and a message giving the limit, the usage and what to do, and creates
nothing (no row, no broker message), even for concurrent submissions; past its storage quota an
upload answers 413 and keeps nothing. No worker runs here, so submitted jobs stay queued. The
limits are the defaults (``KT_MAX_QUEUED_JOBS_PER_TENANT`` 20, ...) unless a test gives the tenant
its own (``kt admin limits``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select

from service.admin import set_tenant_limits
from service.db.models import Dataset, Gallery, Job, Tenant, TransferSet
from service.db.session import make_engine, make_session_factory
from service.quotas import human_bytes
from tests.service.conftest import flushed_redis, fresh_postgres_database
from tests.service.test_api import REPO, Api, imagefolder_zip, make_settings, running_api, upload

REDIS_URL = os.environ.get("KT_TEST_QUOTA_REDIS_URL", "redis://127.0.0.1:6379/9")
QUEUE = "cpu"


@pytest.fixture(scope="module")
def broker() -> Iterator[redis.Redis]:
    with flushed_redis(REDIS_URL) as url:
        client = redis.Redis.from_url(url)
        yield client
        client.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def qapi(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, broker: redis.Redis
) -> Iterator[Api]:
    root = tmp_path_factory.mktemp(f"quota-{request.param}")
    with contextlib.ExitStack() as stack:
        extra: dict[str, object] = {}
        if request.param == "postgresql":
            extra["database_url"] = stack.enter_context(fresh_postgres_database("kt_quota"))
        settings = make_settings(root / "data", broker_url=REDIS_URL, result_backend=REDIS_URL, **extra)
        yield stack.enter_context(running_api(settings))


@contextlib.contextmanager
def db(api: Api) -> Iterator[Any]:
    engine = make_engine(api.settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def set_limits(api: Api, tenant: str, **limits: int | None) -> None:
    with db(api) as session:
        set_tenant_limits(session, tenant, **limits)


def tenant_rows(api: Api, tenant: str, model: Any) -> int:
    with db(api) as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == tenant))
        return int(
            session.scalar(select(func.count()).select_from(model).where(model.tenant_id == tenant_id)) or 0
        )


def job_body(dataset_id: str) -> dict[str, Any]:
    return {"dataset_id": dataset_id, "teacher": "timm:test_vit", "student": "timm:resnet10t"}


def max_parameter_body(dataset_id: str) -> dict[str, Any]:
    """A job with the largest values the schema allows: the most expensive request a tenant can send."""
    return {
        **job_body(dataset_id),
        "budget": "best",
        "image_size": 1024,
        "steps": {"finetune_teacher": 100_000, "distill": 1_000_000, "finetune_student": 100_000},
        "batch_size": {"finetune_teacher": 4096, "distill": 4096, "finetune_student": 4096},
        "recipe": {"distill": {"cache_views": 1024}},
        "export_formats": ["safetensors", "onnx", "torchscript"],
    }


def tenant_with_dataset(api: Api, name: str) -> tuple[str, str]:
    key = api.key(name)
    with api.client(key) as client:
        created = upload(client, imagefolder_zip({"cat": 2, "dog": 2}))
        assert created.status_code == 201, created.text
        return key, created.json()["id"]


def assert_queue_full(response: httpx.Response, queued: int, limit: int, *needles: str) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["Retry-After"] == "60"
    detail = response.json()["detail"]
    for needle in (
        f"already has {queued} queued job(s)",
        f"limit of {limit}",
        "nothing was created",
        *needles,
    ):
        assert needle in detail, detail
    assert "Wait for queued jobs to start" in detail and "cancel one" in detail and "/cancel" in detail, (
        detail
    )


def test_past_the_queued_limit_a_submission_answers_429_and_creates_nothing(
    qapi: Api, broker: redis.Redis
) -> None:
    key, dataset_id = tenant_with_dataset(qapi, "queue-full")
    set_limits(qapi, "queue-full", queued_jobs=3)
    gallery = Gallery(
        name="quota-g", path="/galleries/g", size=10, encoder="timm:x", index_kind="flat", dim=8
    )
    with db(qapi) as session:
        session.add(gallery)
        session.commit()
    with qapi.client(key) as client:
        accepted = [client.post("/v1/jobs", json=job_body(dataset_id)) for _ in range(3)]
        assert [r.status_code for r in accepted] == [202, 202, 202], [r.text for r in accepted]
        messages = broker.llen(QUEUE)

        refused = client.post("/v1/jobs", json=job_body(dataset_id))
        assert_queue_full(refused, 3, 3, "set for this tenant by the operator", "0 running")
        curate = client.post(
            "/v1/transfer-sets", json={"dataset_id": dataset_id, "gallery_id": gallery.id, "size": 5}
        )
        assert_queue_full(curate, 3, 3)
        assert tenant_rows(qapi, "queue-full", Job) == 3 and tenant_rows(qapi, "queue-full", TransferSet) == 0
        assert broker.llen(QUEUE) == messages  # nothing was sent to the workers either

        # the quota is the tenant's own: another tenant submits as before
        other_key, other_dataset = tenant_with_dataset(qapi, "queue-other")
        with qapi.client(other_key) as other:
            assert other.post("/v1/jobs", json=job_body(other_dataset)).status_code == 202

        # canceling a queued job makes room for one more; a retry counts like a submission
        canceled = accepted[0].json()["id"]
        assert client.post(f"/v1/jobs/{canceled}/cancel").json()["status"] == "canceled"
        assert client.post("/v1/jobs", json=job_body(dataset_id)).status_code == 202
        retried = client.post(f"/v1/jobs/{canceled}/retry")
        assert_queue_full(retried, 3, 3)
        assert client.get(f"/v1/jobs/{canceled}").json()["status"] == "canceled"
        assert tenant_rows(qapi, "queue-full", Job) == 4  # 3 queued + the canceled one

        # back to the setting (20): room again
        set_limits(qapi, "queue-full", queued_jobs=None)
        assert client.post(f"/v1/jobs/{canceled}/retry").status_code == 202


def test_concurrent_submissions_never_pass_the_queued_limit(qapi: Api, broker: redis.Redis) -> None:
    """Twelve submissions released at the same moment against a limit of 3: exactly 3 are queued
    (the count and the insert are one step under the tenant row's lock), 9 answer 429."""
    key, dataset_id = tenant_with_dataset(qapi, "queue-race")
    set_limits(qapi, "queue-race", queued_jobs=3)
    messages = broker.llen(QUEUE)
    barrier = threading.Barrier(12)
    codes: list[int] = []
    errors: list[BaseException] = []

    def submit() -> None:
        try:
            with qapi.client(key) as client:
                client.get("/healthz")  # connected before the start signal
                barrier.wait(timeout=30)
                codes.append(client.post("/v1/jobs", json=job_body(dataset_id)).status_code)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert Counter(codes) == {202: 3, 429: 9}, codes
    assert tenant_rows(qapi, "queue-race", Job) == 3
    assert broker.llen(QUEUE) == messages + 3


def test_ninety_max_parameter_submissions_from_one_tenant(qapi: Api) -> None:
    """The probe of issue 14: one tenant sends 90 jobs with the largest parameters allowed. Before
    the quota all 90 were queued; now the default limit (20 queued) takes the first 20."""
    key, dataset_id = tenant_with_dataset(qapi, "flooder")
    codes: Counter[int] = Counter()
    t0 = time.monotonic()
    with qapi.client(key) as client:
        first = client.post("/v1/jobs", json=max_parameter_body(dataset_id))
        assert first.status_code == 202, first.text
        codes[first.status_code] += 1
        last = first
        for _ in range(89):
            last = client.post("/v1/jobs", json=max_parameter_body(dataset_id))
            codes[last.status_code] += 1
    seconds = time.monotonic() - t0
    assert codes == {202: 20, 429: 70}, codes
    assert_queue_full(last, 20, 20, "KT_MAX_QUEUED_JOBS_PER_TENANT")
    assert tenant_rows(qapi, "flooder", Job) == 20
    print(
        f"\n90 max-parameter submissions from one tenant: {codes[202]} accepted, {codes[429]} refused (429), {seconds:.1f} s"
    )


def dataset_dirs(api: Api, tenant: str) -> list[str]:
    with db(api) as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == tenant))
    root = Path(api.settings.data_dir) / "tenants" / str(tenant_id) / "datasets"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def leftover_uploads(api: Api) -> list[Path]:
    tmp = Path(api.settings.data_dir) / "tmp"
    return [p for p in tmp.iterdir() if p.suffix == ".zip"] if tmp.is_dir() else []


def test_an_upload_past_the_storage_quota_answers_413_and_keeps_nothing(qapi: Api) -> None:
    key, first_id = tenant_with_dataset(qapi, "storage-full")
    with qapi.client(key) as client:
        used = client.get(f"/v1/datasets/{first_id}").json()["bytes"]
        assert used > 0
        limit = used + used // 2  # room for half a dataset more
        set_limits(qapi, "storage-full", storage_bytes=limit)

        refused = upload(client, imagefolder_zip({"owl": 2, "bat": 2}))
        assert refused.status_code == 413, refused.text
        detail = refused.json()["detail"]
        for needle in (f"already hold {human_bytes(used)} ({used} bytes)", "storage quota of", "nothing was kept",
                       "Delete datasets you no longer need", "DELETE /v1/datasets/{id}"):  # fmt: skip
            assert needle in detail, detail
        assert [d["id"] for d in client.get("/v1/datasets").json()["data"]] == [first_id]
        assert tenant_rows(qapi, "storage-full", Dataset) == 1
        assert dataset_dirs(qapi, "storage-full") == [first_id]  # no new directory, no staging left
        assert leftover_uploads(qapi) == []

        # full to the byte: refused before the body is read
        set_limits(qapi, "storage-full", storage_bytes=used)
        full = upload(client, imagefolder_zip({"owl": 2, "bat": 2}))
        assert full.status_code == 413 and "the upload was not read" in full.json()["detail"], full.text
        assert dataset_dirs(qapi, "storage-full") == [first_id] and leftover_uploads(qapi) == []

        # deleting a dataset frees its bytes
        set_limits(qapi, "storage-full", storage_bytes=limit)
        assert client.delete(f"/v1/datasets/{first_id}").status_code == 204
        again = upload(client, imagefolder_zip({"owl": 2, "bat": 2}))
        assert again.status_code == 201, again.text


def test_kt_admin_limits_shows_and_sets_a_tenants_quotas(tmp_path: Path) -> None:
    env = {**os.environ, "KT_DATA_DIR": str(tmp_path / "data"), "KT_MAX_QUEUED_JOBS_PER_TENANT": "7"}
    env = {k: v for k, v in env.items() if k != "KT_DATABASE_URL"}
    run = [sys.executable, "-m", "service.admin"]

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*run, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)

    assert admin("create-key", "--tenant", "acme").returncode == 0
    shown = admin("limits", "acme")
    assert shown.returncode == 0, shown.stderr
    assert "queued jobs: 0 of 7 (KT_MAX_QUEUED_JOBS_PER_TENANT)" in shown.stdout, shown.stdout
    assert "storage bytes: 0 B of 20.0 GiB (KT_MAX_STORAGE_BYTES_PER_TENANT)" in shown.stdout, shown.stdout

    changed = admin(
        "limits", "acme", "--max-running-jobs", "0", "--max-queued-jobs", "50", "--max-storage", "1.5GiB"
    )
    assert changed.returncode == 0, changed.stderr
    assert "running jobs: 0 of no limit (this tenant's own)" in changed.stdout, changed.stdout
    assert "queued jobs: 0 of 50 (this tenant's own)" in changed.stdout
    assert "storage bytes: 0 B of 1.5 GiB (this tenant's own)" in changed.stdout

    reset = admin("limits", "acme", "--max-queued-jobs", "default")
    assert "queued jobs: 0 of 7 (KT_MAX_QUEUED_JOBS_PER_TENANT)" in reset.stdout, reset.stdout
    assert "storage bytes: 0 B of 1.5 GiB (this tenant's own)" in reset.stdout  # the others kept

    bad = admin("limits", "acme", "--max-queued-jobs", "lots")
    assert bad.returncode == 1 and "'lots' is not a limit" in bad.stderr and "`default`" in bad.stderr
    unknown = admin("limits", "nobody")
    assert unknown.returncode == 1 and "no tenant named 'nobody'" in unknown.stderr
