"""The rules behind worker liveness, on a real SQLite database (the processes themselves are in
``tests/reliability/test_worker_restart.py``): when ``/readyz`` counts a worker as alive and when
too few are, what handing a job back does to its row, and ``kt serve``'s restart backoff."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from service import serve
from service.app import create_app
from service.db.models import Job, Tenant, Worker, utcnow
from service.db.session import init_db, make_engine, make_session_factory
from service.settings import Settings
from service.workers import (
    ATTEMPTS_BEFORE_RETRY,
    beat_worker,
    process_died,
    readiness,
    register_worker,
    release_job,
    unregister_worker,
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", worker_heartbeat_timeout_s=5, job_max_attempts=2)


@pytest.fixture
def factory(settings: Settings) -> Iterator[sessionmaker[Session]]:
    init_db(settings.database_url)
    engine = make_engine(settings.database_url)
    yield make_session_factory(engine)
    engine.dispose()


def ready(factory: sessionmaker[Session], settings: Settings, **overrides: Any) -> tuple[int, str | None]:
    with factory() as session:
        return readiness(session, settings.model_copy(update=overrides))


def age(factory: sessionmaker[Session], worker_id: str, seconds: float) -> None:
    with factory() as s:
        s.execute(
            update(Worker)
            .where(Worker.id == worker_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )
        s.commit()


def running_job(factory: sessionmaker[Session], attempts: int = 1, **values: Any) -> str:
    with factory() as s:
        tenant = Tenant(name=f"t{utcnow().timestamp()}")
        s.add(tenant)
        s.flush()
        job = Job(
            tenant_id=tenant.id, kind="pipeline", params={"config": {}}, status="running", attempts=attempts
        )
        for key, value in values.items():
            setattr(job, key, value)
        s.add(job)
        s.commit()
        return job.id


def get(factory: sessionmaker[Session], job_id: str) -> Job:
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


class Sent(list[tuple[str, str]]):
    def __call__(self, _settings: Settings, job_id: str, queue: str) -> None:
        self.append((job_id, queue))


# --- readiness


def test_auto_needs_a_worker_only_once_one_was_seen_to_go(factory, settings):
    # nothing registered: a deployment whose workers never started (or stopped cleanly) is ready
    assert ready(factory, settings) == (0, None)
    worker = register_worker(factory, "w1@a", "a", 100)
    assert ready(factory, settings) == (1, None)
    age(factory, worker, 6)  # past the 5 s timeout: silent
    alive, problem = ready(factory, settings)
    assert alive == 0 and problem is not None
    assert problem.startswith("no worker is alive: the last one, w1@a (pid 100 on a) sent its last heartbeat")
    assert "KT_WORKER_HEARTBEAT_TIMEOUT_S is 5 s" in problem
    # a worker elsewhere is alive: ready again, whatever the silent one did
    other = register_worker(factory, "w2@b", "b", 7)
    assert ready(factory, settings) == (1, None)
    unregister_worker(factory, other)
    assert ready(factory, settings)[1] is not None
    age(factory, worker, 2 * 86400)  # silent for two days: forgotten
    assert ready(factory, settings) == (0, None)


def test_a_number_is_a_minimum_and_zero_never_fails(factory, settings):
    alive, problem = ready(factory, settings, ready_min_workers=1)
    assert alive == 0 and problem is not None and "none has sent a heartbeat to this database" in problem
    register_worker(factory, "w1@a", "a", 100)
    assert ready(factory, settings, ready_min_workers=1) == (1, None)
    alive, problem = ready(factory, settings, ready_min_workers=2)
    assert problem is not None and problem.startswith("1 worker(s) alive, 2 needed")
    stale = register_worker(factory, "w2@a", "a", 101)
    age(factory, stale, 60)
    assert ready(factory, settings, ready_min_workers=0) == (1, None)


def test_beat_writes_the_held_job_and_a_stopped_row_is_not_alive(factory, settings):
    worker = register_worker(factory, "w@a", "a", 5)
    assert beat_worker(factory, worker, "job1", 2)
    with factory() as s:
        row = s.get(Worker, worker)
        assert row is not None and (row.job_id, row.attempt) == ("job1", 2)
    assert process_died(factory, settings, "a", 5, "was killed by SIGKILL", enqueue=Sent()) == []
    alive, problem = ready(factory, settings)
    assert alive == 0 and problem is not None and "w@a (pid 5 on a) was killed by SIGKILL" in problem
    assert not beat_worker(factory, worker, None, None)  # a row marked dead takes no more beats


def test_readyz_reports_the_workers(settings, factory):
    with TestClient(create_app(settings, migrate=False)) as client:
        assert client.get("/readyz").json() == {"status": "ok", "workers_alive": 0}
        worker = register_worker(factory, "w@a", "a", 5)
        assert client.get("/readyz").json() == {"status": "ok", "workers_alive": 1}
        age(factory, worker, 10)
        response = client.get("/readyz")
        assert response.status_code == 503
        body = response.json()
        assert body["workers_alive"] == 0 and set(body["failed"]) == {"workers"}
        assert body["detail"].startswith("Not ready: workers: no worker is alive: the last one, w@a (pid 5")


# --- handing a job back


def test_a_dead_workers_job_is_requeued_and_counts_as_an_attempt(factory, settings):
    job_id = running_job(factory, attempts=1)
    worker = register_worker(factory, "w@a", "a", 5)
    beat_worker(factory, worker, job_id, 1)
    sent = Sent()
    assert process_died(factory, settings, "a", 5, "was killed by SIGKILL", enqueue=sent) == [
        (job_id, "queued")
    ]
    assert sent == [(job_id, "cpu")]
    job = get(factory, job_id)
    assert job.status == "queued" and "the worker running attempt 1 was killed by SIGKILL" in (
        job.error or ""
    )
    assert ATTEMPTS_BEFORE_RETRY not in job.params
    log = (settings.data_dir / "jobs" / job_id / "job.log").read_text()
    assert "kt serve: requeued to 'cpu'" in log


def test_release_is_conditional_on_the_attempt(factory, settings):
    job_id = running_job(factory, attempts=3)  # attempt 2 was handed on already: 3 holds the job
    sent = Sent()
    kw: dict[str, Any] = {"counts_as_attempt": True, "source": "test", "enqueue": sent}
    assert release_job(factory, settings, job_id, 2, "died", **kw) is None
    assert get(factory, job_id).status == "running" and sent == []


def test_a_worker_told_to_stop_costs_no_attempt(factory, settings):
    job_id = running_job(factory, attempts=2)  # its last attempt by KT_JOB_MAX_ATTEMPTS=2
    sent = Sent()
    status = release_job(
        factory,
        settings,
        job_id,
        2,
        "was told to stop",
        counts_as_attempt=False,
        source="worker",
        enqueue=sent,
    )
    assert status == "queued" and sent == [(job_id, "cpu")]
    assert get(factory, job_id).params[ATTEMPTS_BEFORE_RETRY] == 1


def test_out_of_attempts_fails_and_a_cancel_request_cancels(factory, settings):
    kw: dict[str, Any] = {"counts_as_attempt": True, "source": "test", "enqueue": Sent()}
    exhausted = running_job(factory, attempts=2)
    assert release_job(factory, settings, exhausted, 2, "was killed by SIGKILL", **kw) == "failed"
    error = get(factory, exhausted).error or ""
    assert "was killed by SIGKILL on attempt 2" in error and f"POST /v1/jobs/{exhausted}/retry" in error
    canceling = running_job(factory, attempts=1, cancel_requested=True)
    assert release_job(factory, settings, canceling, 1, "died", **kw) == "canceled"


def test_a_broker_that_refuses_leaves_the_job_to_the_reaper(factory, settings):
    job_id = running_job(factory, attempts=1, heartbeat_at=utcnow() - timedelta(seconds=30))

    def refuse(*_: Any) -> None:
        raise ConnectionError("broker down")

    status = release_job(
        factory, settings, job_id, 1, "died", counts_as_attempt=True, source="t", enqueue=refuse
    )
    assert status == "running"
    job = get(factory, job_id)
    assert (job.status, job.error) == ("running", None)  # as it was: the reaper requeues it later


# --- kt serve's restarts


def test_restart_backoff_doubles_is_bounded_and_resets_after_a_stable_run():
    backoff = serve.Backoff(base_s=0.5, max_s=4, stable_s=60)
    assert [backoff.next_delay(uptime_s=1) for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    assert backoff.next_delay(uptime_s=61) == 0.5  # it had stayed up: start over
    assert backoff.next_delay(uptime_s=1) == 1


def test_exit_cause_names_the_signal():
    assert serve.exit_cause(-signal.SIGKILL) == "was killed by SIGKILL"
    assert serve.exit_cause(0) == "exited with code 0"
    assert serve.exit_cause(2) == "exited with code 2"
