"""Fair scheduling with a real Celery worker process (``--pool solo``), on the embedded wiring
(SQLite database, kombu's SQLite broker) and the production one (PostgreSQL, Redis): tenant A
queues three jobs, the worker starts the first, then tenant B queues one. B's job starts next,
before A's backlog drains (the broker's first-in-first-out order would have run A, A, A, B), every
job succeeds on its first attempt, and the messages of the jobs the worker took in this order
find nothing left to start."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from starlette.testclient import TestClient

from service.app import create_app
from service.db.models import Job
from service.db.session import init_db
from service.settings import Settings
from tests.reliability.conftest import (
    RedisServer,
    create_key,
    running,
    session_factory,
    start_worker,
    wait_until,
    worker_env,
)
from tests.reliability.test_worker_faults import FINAL, job_request, poll_job, upload_dataset

DISTILL_STEPS = 12


@pytest.fixture(params=["embedded-sqlite", "redis+postgres"])
def wiring(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    if request.param == "embedded-sqlite":
        broker = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
        yield {"database_url": f"sqlite:///{tmp_path / 'kt.db'}", "broker_url": broker}
        return
    redis_server: RedisServer = request.getfixturevalue("private_redis")
    yield {"database_url": request.getfixturevalue("pg_url"), "broker_url": redis_server.url}


def submit(client: TestClient, key: str, dataset_id: str) -> str:
    response = client.post(
        "/v1/jobs",
        json=job_request(dataset_id, DISTILL_STEPS),
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


@pytest.mark.slow
def test_a_later_tenants_job_starts_before_anothers_backlog_drains(
    tmp_path: Path, wiring: dict[str, str]
) -> None:
    data_dir = tmp_path / "data"
    db_url, broker_url = wiring["database_url"], wiring["broker_url"]
    settings = Settings(
        data_dir=data_dir,
        database_url=db_url,
        broker_url=broker_url,
        result_backend=broker_url,
        rate_limit_per_min=0,
    )
    if broker_url.startswith("sqla+"):  # the embedded default keeps results in SQLite too
        settings = settings.model_copy(update={"result_backend": f"db+sqlite:///{tmp_path / 'results.db'}"})
    init_db(db_url)
    key_a, key_b = create_key(db_url, "tenant-a"), create_key(db_url, "tenant-b")
    env = worker_env(data_dir, db_url, broker_url, KT_RESULT_BACKEND=settings.result_backend)
    with TestClient(create_app(settings, migrate=False)) as client:
        client.headers["Authorization"] = f"Bearer {key_a}"
        dataset_a = upload_dataset(client)
        client.headers["Authorization"] = f"Bearer {key_b}"
        dataset_b = upload_dataset(client)
        del client.headers["Authorization"]
        backlog = [submit(client, key_a, dataset_a) for _ in range(3)]

        worker = start_worker(env, tmp_path / "worker.log", "fair")
        with running(worker):
            client.headers["Authorization"] = f"Bearer {key_a}"

            def first_started() -> bool:
                body = poll_job(client, backlog[0])
                return body is not None and body["status"] == "running"

            wait_until(first_started, 120, "tenant A's first job to start", worker.tail)
            late = submit(client, key_b, dataset_b)
            assert poll_job(client, backlog[0])["status"] == "running", (
                "A's first job ended before B submitted"
            )

            with session_factory(db_url, migrate=False) as factory:

                def all_done() -> list[Job] | None:
                    with factory() as s:
                        jobs = list(s.scalars(select(Job).order_by(Job.started_at)).all())
                    return jobs if all(j.status in FINAL for j in jobs) else None

                jobs = wait_until(all_done, 300, "the four jobs to finish", worker.tail)
            assert [(j.status, j.attempts) for j in jobs] == [("succeeded", 1)] * 4, (
                [(j.id, j.status, j.error) for j in jobs],
                worker.tail(),
            )
            started = [j.id for j in jobs]
            assert started == [backlog[0], late, backlog[1], backlog[2]], (started, backlog, late)

            # one message woke the worker and it took the four jobs in turn; the other three
            # messages then find nothing to start (and start nothing twice)
            wait_until(
                lambda: worker.log.read_text(errors="replace").count("nothing to start on") == 3,
                60,
                "the three other messages to be taken",
                worker.tail,
            )
            assert worker.alive()
