"""The fair scheduler (``worker.scheduler.claim_next``), in-process, on SQLite and PostgreSQL:
tenants take turns whatever order their jobs were queued in, a tenant at its running cap keeps its
other jobs queued without holding back anyone else, a retry's backoff is honoured, and concurrent
claims never pass a cap nor start one job twice. (A real worker process taking jobs in this order
is ``tests/reliability/test_fair_scheduling.py``.)"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import Job, Tenant, utcnow
from service.db.session import init_db, make_engine, make_session_factory
from service.settings import Settings
from tests.service.conftest import fresh_postgres_database
from tests.worker.conftest import add_tenant, get_job
from worker import scheduler

T0 = datetime(2026, 1, 1, 12, 0, 0).astimezone()


@pytest.fixture(params=["sqlite", "postgresql"])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A fresh, migrated database of its own (claim_next looks at every tenant's jobs)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'kt.db'}"
        init_db(url)
        engine = make_engine(url)
        yield make_session_factory(engine)
        engine.dispose()
        return
    with fresh_postgres_database("kt_sched") as url:
        init_db(url)
        engine = make_engine(url)
        yield make_session_factory(engine)
        engine.dispose()


def settings_with(tmp_path: Path, **kw: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", **kw)  # type: ignore[arg-type]


def queue_jobs(
    factory: sessionmaker[Session], tenant_id: str, count: int, start_s: int, **kw: object
) -> list[str]:
    """``count`` queued jobs of the tenant, created one second apart from ``T0 + start_s``."""
    with factory() as s:
        jobs = [
            Job(
                tenant_id=tenant_id,
                kind="pipeline",
                params={},
                created_at=T0 + timedelta(seconds=start_s + i),
                **kw,
            )
            for i in range(count)
        ]
        s.add_all(jobs)
        s.commit()
        return [job.id for job in jobs]


def finish(factory: sessionmaker[Session], job_id: str) -> None:
    with factory() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status="succeeded", finished_at=utcnow()))
        s.commit()


def drain_with_one_worker(factory: sessionmaker[Session], settings: Settings) -> list[str]:
    """What one worker starts, job after job, until nothing is left."""
    order = []
    while (job := scheduler.claim_next(factory, settings, "cpu")) is not None:
        assert job.status == "running" and job.attempts == 1 and job.heartbeat_at is not None
        order.append(job.id)
        finish(factory, job.id)
    return order


def test_tenants_take_turns_whatever_order_their_jobs_were_queued_in(factory, tmp_path):
    """A queued 4 jobs first, then B 2, then C 1: one worker starts A, B, C, A, B, A, A (the first
    in-first-out order of the messages would have been A, A, A, A, B, B, C)."""
    settings = settings_with(tmp_path)
    a, b, c = (add_tenant(factory, name) for name in ("a", "b", "c"))
    jobs_a = queue_jobs(factory, a, 4, start_s=0)
    jobs_b = queue_jobs(factory, b, 2, start_s=10)
    jobs_c = queue_jobs(factory, c, 1, start_s=20)
    order = drain_with_one_worker(factory, settings)
    assert order == [jobs_a[0], jobs_b[0], jobs_c[0], jobs_a[1], jobs_b[1], jobs_a[2], jobs_a[3]]
    with factory() as s:
        starts = dict(s.execute(select(Tenant.name, Tenant.last_started_at)).all())
    assert starts["a"] > starts["b"] > starts["c"]  # A's last start was the last of all


def test_a_tenant_at_its_running_cap_waits_without_holding_back_others(factory, tmp_path):
    settings = settings_with(tmp_path, max_running_jobs_per_tenant=1)
    a, b = add_tenant(factory, "a"), add_tenant(factory, "b")
    jobs_a = queue_jobs(factory, a, 3, start_s=0)
    [job_b] = queue_jobs(factory, b, 1, start_s=10)

    first = scheduler.claim_next(factory, settings, "cpu")
    assert first is not None and first.id == jobs_a[0]
    second = scheduler.claim_next(factory, settings, "cpu")  # A is at its cap: B's job, queued later
    assert second is not None and second.id == job_b
    assert scheduler.claim_next(factory, settings, "cpu") is None  # a third worker: nothing it may start
    assert [get_job(factory, j).status for j in jobs_a] == ["running", "queued", "queued"]

    finish(factory, jobs_a[0])
    third = scheduler.claim_next(factory, settings, "cpu")
    assert third is not None and third.id == jobs_a[1]

    # the tenant's own limit overrides the setting: two at once for A
    with factory() as s:
        s.execute(update(Tenant).where(Tenant.id == a).values(max_running_jobs=2))
        s.commit()
    fourth = scheduler.claim_next(factory, settings, "cpu")
    assert fourth is not None and fourth.id == jobs_a[2]


def test_queues_and_backoff_and_cancel_requests_are_honoured(factory, tmp_path):
    settings = settings_with(tmp_path)
    a = add_tenant(factory, "a")
    [gpu_job] = queue_jobs(factory, a, 1, start_s=0, queue="gpu")
    [backing_off] = queue_jobs(factory, a, 1, start_s=1, run_after=utcnow() + timedelta(hours=1))
    [canceling] = queue_jobs(factory, a, 1, start_s=2, cancel_requested=True)
    assert scheduler.claim_next(factory, settings, "cpu") is None
    assert get_job(factory, canceling).status == "canceled"  # nothing else would end it
    assert get_job(factory, backing_off).status == "queued"

    with factory() as s:
        s.execute(update(Job).where(Job.id == backing_off).values(run_after=utcnow() - timedelta(seconds=1)))
        s.commit()
    job = scheduler.claim_next(factory, settings, "cpu")
    assert job is not None and job.id == backing_off and job.run_after is None
    job = scheduler.claim_next(factory, settings, "gpu")
    assert job is not None and job.id == gpu_job


def test_concurrent_claims_never_pass_a_cap_nor_start_a_job_twice(factory, tmp_path):
    """Eight workers claim at the same moment, twice over: each tenant has exactly its cap running,
    every claimed job was claimed once, and the rest are still queued."""
    settings = settings_with(tmp_path, max_running_jobs_per_tenant=2)
    a, b = add_tenant(factory, "a"), add_tenant(factory, "b")
    queue_jobs(factory, a, 6, start_s=0)
    queue_jobs(factory, b, 6, start_s=100)
    claimed: list[str] = []
    errors: list[BaseException] = []

    def worker(barrier: threading.Barrier) -> None:
        try:
            barrier.wait(timeout=30)
            job = scheduler.claim_next(factory, settings, "cpu")
            if job is not None:
                claimed.append(job.id)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    for _ in range(2):
        barrier = threading.Barrier(8)
        threads = [threading.Thread(target=worker, args=(barrier,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors
    assert len(claimed) == len(set(claimed)) == 4
    with factory() as s:
        running = Counter(s.scalars(select(Job.tenant_id).where(Job.status == "running")).all())
        attempts = set(s.scalars(select(Job.attempts).where(Job.status == "running")).all())
        queued = s.scalar(select(Job.id).where(Job.status == "queued").limit(1))
    assert running == {a: 2, b: 2} and attempts == {1} and queued is not None
