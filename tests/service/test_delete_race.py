"""A dataset deleted while a job or a transfer set that reads it is being submitted: exactly one of
the two requests wins, the loser answers 409 (or 404, once the delete has committed before the
submission looked) with a JSON ``detail``, never a 500, and no queued job is left on a deleted
dataset. Real concurrent requests (two threads released together) against a real uvicorn server,
on PostgreSQL and on SQLite, with a real Redis broker (db 10); no worker runs, so jobs stay queued."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from service.db.models import Dataset, Gallery, Job, TransferSet
from service.db.session import make_engine, make_session_factory
from tests.service.conftest import flushed_redis, fresh_postgres_database
from tests.service.test_api import Api, imagefolder_zip, make_settings, running_api, upload

REDIS_URL = os.environ.get("KT_TEST_RACE_REDIS_URL", "redis://127.0.0.1:6379/10")
ROUNDS = 10


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with flushed_redis(REDIS_URL) as url:
        yield url


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def race_api(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[Api]:
    root = tmp_path_factory.mktemp(f"race-{request.param}")
    with contextlib.ExitStack() as stack:
        extra: dict[str, object] = {}
        if request.param == "postgresql":
            extra["database_url"] = stack.enter_context(fresh_postgres_database("kt_race"))
        # no worker runs: the races' winners stay queued, more of them than a tenant's default quota
        settings = make_settings(
            root / "data",
            broker_url=redis_url,
            result_backend=redis_url,
            rate_limit_per_min=0,
            max_queued_jobs_per_tenant=0,
            **extra,
        )
        yield stack.enter_context(running_api(settings))


@pytest.fixture(scope="module")
def race_world(race_api: Api) -> dict[str, str]:
    gallery = Gallery(name="g", path="/galleries/g", size=10, encoder="timm:x", index_kind="flat", dim=8)
    with _session(race_api) as session:
        session.add(gallery)
        session.commit()
    return {"key": race_api.key("racer"), "gallery_id": gallery.id}


@contextlib.contextmanager
def _session(api: Api) -> Iterator[Any]:
    engine = make_engine(api.settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def job_body(dataset_id: str, _world: dict[str, str]) -> dict[str, Any]:
    return {"dataset_id": dataset_id, "teacher": "timm:test_vit", "student": "timm:resnet10t"}


def transfer_set_body(dataset_id: str, world: dict[str, str]) -> dict[str, Any]:
    return {"dataset_id": dataset_id, "gallery_id": world["gallery_id"], "size": 5}


def race(api: Api, key: str, path: str, body: dict[str, Any]) -> tuple[httpx.Response, httpx.Response]:
    """``DELETE`` the dataset and ``POST path`` with ``body`` at the same moment."""
    dataset_id = body["dataset_id"]
    barrier = threading.Barrier(2)
    answers: dict[str, httpx.Response] = {}
    errors: list[BaseException] = []

    def send(name: str, call: Callable[[httpx.Client], httpx.Response]) -> None:
        try:
            with api.client(key) as client:
                client.get("/healthz")  # connected before the start signal
                barrier.wait(timeout=30)
                answers[name] = call(client)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [
        threading.Thread(target=send, args=("delete", lambda c: c.delete(f"/v1/datasets/{dataset_id}"))),
        threading.Thread(target=send, args=("create", lambda c: c.post(path, json=body))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return answers["delete"], answers["create"]


def assert_explained(response: httpx.Response, *needles: str) -> None:
    assert response.headers["content-type"].startswith("application/json"), response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and len(detail) > 25, detail
    for needle in needles:
        assert needle in detail, detail


def unfinished_jobs_reading(api: Api, dataset_id: str) -> list[str]:
    with _session(api) as session:
        jobs = session.scalars(select(Job).where(Job.status.in_(("queued", "running")))).all()
        return [j.id for j in jobs if (j.params.get("request") or {}).get("dataset_id") == dataset_id]


@pytest.mark.parametrize(
    ("path", "make_body"),
    [("/v1/jobs", job_body), ("/v1/transfer-sets", transfer_set_body)],
    ids=["job", "transfer-set"],
)
def test_a_delete_racing_a_submission_leaves_one_winner(
    race_api: Api,
    race_world: dict[str, str],
    path: str,
    make_body: Callable[[str, dict[str, str]], dict[str, Any]],
) -> None:
    key = race_world["key"]
    outcomes: Counter[str] = Counter()
    for _ in range(ROUNDS):
        with race_api.client(key) as client:
            created = upload(client, imagefolder_zip({"cat": 2, "dog": 2}))
            assert created.status_code == 201, created.text
            dataset_id = created.json()["id"]
        deleted, submitted = race(race_api, key, path, make_body(dataset_id, race_world))
        pair = (deleted.status_code, submitted.status_code)
        assert deleted.status_code in (204, 409) and submitted.status_code in (202, 404, 409), (
            pair,
            deleted.text,
            submitted.text,
        )
        assert (deleted.status_code == 204) != (submitted.status_code == 202), (
            f"both or neither won: {pair}",
            deleted.text,
            submitted.text,
        )
        with _session(race_api) as session:
            still_there = session.get(Dataset, dataset_id) is not None
            sets = session.scalars(select(TransferSet.id).where(TransferSet.dataset_id == dataset_id)).all()
        jobs = unfinished_jobs_reading(race_api, dataset_id)
        if submitted.status_code == 202:
            outcomes["submitted"] += 1
            assert still_there and len(jobs) == 1, (jobs, still_there)
            assert_explained(deleted, jobs[0], "cancel")
        else:
            outcomes["deleted"] += 1
            assert not still_there and jobs == [] and list(sets) == [], (jobs, sets)
            assert_explained(submitted, dataset_id)
            if submitted.status_code == 409:
                assert "deleted" in submitted.json()["detail"], submitted.text
    assert sum(outcomes.values()) == ROUNDS, outcomes


def test_a_failed_job_whose_dataset_was_deleted_is_not_retried(
    race_api: Api, race_world: dict[str, str]
) -> None:
    with race_api.client(race_world["key"]) as client:
        dataset_id = upload(client, imagefolder_zip({"cat": 2, "dog": 2})).json()["id"]
        job = client.post("/v1/jobs", json=job_body(dataset_id, race_world)).json()
        with _session(race_api) as session:
            session.execute(update(Job).where(Job.id == job["id"]).values(status="failed", error="boom"))
            session.commit()
        assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204  # no unfinished job reads it
        retried = client.post(f"/v1/jobs/{job['id']}/retry")
        assert retried.status_code == 409, retried.text
        assert_explained(retried, dataset_id, "deleted")
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "failed"


def test_the_loser_of_a_race_is_told_what_happened(race_api: Api, race_world: dict[str, str]) -> None:
    """The deterministic halves of the race: a delete after the job committed (409 naming the
    job), a submission naming a dataset deleted already (404)."""
    with race_api.client(race_world["key"]) as client:
        dataset_id = upload(client, imagefolder_zip({"cat": 2, "dog": 2})).json()["id"]
        job = client.post("/v1/jobs", json=job_body(dataset_id, race_world))
        assert job.status_code == 202, job.text
        refused = client.delete(f"/v1/datasets/{dataset_id}")
        assert refused.status_code == 409
        assert_explained(refused, job.json()["id"], "cancel")
        client.post(f"/v1/jobs/{job.json()['id']}/cancel")
        assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
        late = client.post("/v1/jobs", json=job_body(dataset_id, race_world))
        assert late.status_code == 404
        assert_explained(late, dataset_id)
        again = client.delete(f"/v1/datasets/{dataset_id}")
        assert again.status_code == 404
