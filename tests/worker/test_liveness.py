"""Heartbeats, claiming a job, the reaper of lost jobs, and the ETA (all in-process, on SQLite;
the reaper inside a real Celery worker is in ``test_worker.test_celery_worker_runs_a_job``)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from kt_train.progress import Phase
from service.db.models import Job, utcnow
from service.settings import Settings
from tests.worker.conftest import add_job, get_job
from worker import liveness, runner
from worker.liveness import Heartbeat, Reaper, reap_lost_jobs


def set_job(session_factory: sessionmaker[Session], job_id: str, **values: Any) -> None:
    with session_factory() as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))
        s.commit()


def running_job(
    session_factory: sessionmaker[Session], tenant_id: str, silent_s: float, attempts: int = 1, **kw: Any
) -> str:
    """A ``running`` job whose last heartbeat was ``silent_s`` seconds ago."""
    job_id = add_job(session_factory, tenant_id, {}, **kw)
    set_job(
        session_factory,
        job_id,
        status="running",
        attempts=attempts,
        heartbeat_at=utcnow() - timedelta(seconds=silent_s),
    )
    return job_id


class Enqueued:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = fail

    def __call__(self, settings: Settings, job_id: str, queue: str) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.calls.append((job_id, queue))


# --- claim


def test_claim_refuses_a_job_another_worker_holds_and_takes_over_a_lost_one(
    session_factory, worker_settings, tenant_id, job_config
):
    held = running_job(session_factory, tenant_id, silent_s=5)
    # a duplicate delivery of a job whose worker is alive: not run twice
    assert runner.run_job(session_factory, held, worker_settings) == "running"
    job = get_job(session_factory, held)
    assert (job.status, job.attempts) == ("running", 1)
    assert not (worker_settings.data_dir / "jobs" / held / "run").exists()

    # the same delivery once the heartbeat is stale: this worker takes the job over
    lost = add_job(session_factory, tenant_id, job_config(stages=["finetune_teacher"]))
    set_job(session_factory, lost, status="running", attempts=1, heartbeat_at=utcnow() - timedelta(hours=1))
    assert runner.run_job(session_factory, lost, worker_settings) == "succeeded"
    job = get_job(session_factory, lost)
    assert (job.status, job.attempts) == ("succeeded", 2)


def test_claim_is_conditional(session_factory, worker_settings, tenant_id):
    job_id = add_job(session_factory, tenant_id, {})
    job, status = runner.claim(session_factory, job_id, worker_settings)
    assert job is not None and status == "running" and job.attempts == 1 and job.heartbeat_at is not None
    again, status = runner.claim(session_factory, job_id, worker_settings)
    assert again is None and status == "running" and get_job(session_factory, job_id).attempts == 1


# --- heartbeat


def test_heartbeat_thread_beats_while_the_job_runs(session_factory, tenant_id):
    job_id = running_job(session_factory, tenant_id, silent_s=3600)
    old = get_job(session_factory, job_id).heartbeat_at
    assert old is not None
    with Heartbeat(session_factory, job_id, interval_s=0.05):
        deadline = time.monotonic() + 10
        while (beat := get_job(session_factory, job_id).heartbeat_at) == old and time.monotonic() < deadline:
            time.sleep(0.05)
    assert beat is not None and utcnow() - beat < timedelta(seconds=10)
    # no beats for a job that is no longer running
    set_job(session_factory, job_id, status="failed", heartbeat_at=old)
    with Heartbeat(session_factory, job_id, interval_s=0.01):
        time.sleep(0.1)
    assert get_job(session_factory, job_id).heartbeat_at == old


def test_heartbeat_interval_is_a_fraction_of_the_timeout():
    assert liveness.heartbeat_interval_s(Settings(job_heartbeat_timeout_s=8)) == 2
    assert liveness.heartbeat_interval_s(Settings(job_heartbeat_timeout_s=3600)) == 30


# --- the reaper


def test_reaper_requeues_lost_jobs_and_fails_them_after_max_attempts(
    session_factory, worker_settings, tenant_id
):
    settings = worker_settings.model_copy(update={"job_heartbeat_timeout_s": 60.0, "job_max_attempts": 3})
    alive = running_job(session_factory, tenant_id, silent_s=30)
    lost = running_job(session_factory, tenant_id, silent_s=120, attempts=1, queue="gpu")
    exhausted = running_job(session_factory, tenant_id, silent_s=120, attempts=3)
    canceling = running_job(session_factory, tenant_id, silent_s=120, cancel_requested=True)
    queued = add_job(session_factory, tenant_id, {})
    set_job(session_factory, queued, updated_at=utcnow() - timedelta(hours=1))  # waiting is not being lost

    enqueued = Enqueued()
    found = reap_lost_jobs(session_factory, settings, enqueue=enqueued)
    assert (found.requeued, found.failed, found.canceled) == ([lost], [exhausted], [canceling])
    assert enqueued.calls == [(lost, "gpu")]  # back to the queue it came from

    job = get_job(session_factory, lost)
    assert (job.status, job.attempts, job.eta_s) == ("queued", 1, None)
    assert "no heartbeat for 120 s" in (job.error or "") and "requeued to 'gpu'" in (job.error or "")
    job = get_job(session_factory, exhausted)
    assert job.status == "failed" and job.finished_at is not None
    assert "all 3 attempts" in (job.error or "") and "submit it again" in (job.error or "")
    assert get_job(session_factory, canceling).status == "canceled"
    assert get_job(session_factory, alive).status == "running"
    assert get_job(session_factory, queued).status == "queued"
    for job_id in (lost, exhausted, canceling):
        text = (settings.data_dir / "jobs" / job_id / "job.log").read_text()
        assert "reaper: " in text, job_id

    # a second pass (another worker's reaper) finds nothing left to do
    again = reap_lost_jobs(session_factory, settings, enqueue=enqueued)
    assert (again.requeued, again.failed, again.canceled) == ([], [], [])
    assert len(enqueued.calls) == 1

    # the requeued job runs again in the next worker, as attempt 2 (its error cleared)
    job, status = runner.claim(session_factory, lost, settings)
    assert job is not None and (status, job.attempts, job.error) == ("running", 2, None)


def test_reaper_keeps_the_job_running_when_the_broker_is_down(session_factory, worker_settings, tenant_id):
    settings = worker_settings.model_copy(update={"job_heartbeat_timeout_s": 60.0})
    lost = running_job(session_factory, tenant_id, silent_s=120)
    before = get_job(session_factory, lost).heartbeat_at
    found = reap_lost_jobs(session_factory, settings, enqueue=Enqueued(fail=True))
    assert found.requeued == []
    job = get_job(session_factory, lost)
    assert (job.status, job.heartbeat_at) == ("running", before)  # the next pass tries again
    assert reap_lost_jobs(session_factory, settings, enqueue=Enqueued()).requeued == [lost]


def test_reaper_thread_runs_at_start_then_periodically(
    session_factory, worker_settings, tenant_id, monkeypatch
):
    settings = worker_settings.model_copy(update={"job_heartbeat_timeout_s": 60.0, "reaper_interval_s": 0.05})
    enqueued = Enqueued()
    monkeypatch.setattr(liveness, "enqueue_job", enqueued)
    first = running_job(session_factory, tenant_id, silent_s=120)
    monkeypatch.setattr(liveness, "reap_lost_jobs", lambda f, s: reap_lost_jobs(f, s, enqueue=enqueued))
    reaper = liveness.start_reaper(session_factory, settings)
    assert isinstance(reaper, Reaper)
    try:
        deadline = time.monotonic() + 10
        while get_job(session_factory, first).status != "queued" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert get_job(session_factory, first).status == "queued"
        # a job lost later is found by a later pass
        second = running_job(session_factory, tenant_id, silent_s=120)
        # (a pass counts itself once it is over: wait for the count too, not only for the row)
        while (
            get_job(session_factory, second).status != "queued" or reaper.passes < 2
        ) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert get_job(session_factory, second).status == "queued" and reaper.passes >= 2
    finally:
        reaper.stop()
    assert [job_id for job_id, _ in enqueued.calls] == [first, second]
    assert (
        liveness.start_reaper(session_factory, settings.model_copy(update={"reaper_interval_s": 0})) is None
    )


# --- ETA


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _two_stages() -> list[Phase]:
    """Stages a and b, one phase each of 10 units (weights follow the work: equal)."""
    return [Phase("a", 10, group="ga", stage="a"), Phase("b", 10, group="gb", stage="b")]


def test_eta_comes_from_the_measured_rate_of_the_running_phase(session_factory, tenant_id):
    job_id = running_job(session_factory, tenant_id, silent_s=0)
    clock = FakeClock()
    rep = runner.JobReporter(session_factory, job_id, _two_stages(), interval_s=0, clock=clock)

    rep.begin_stage("a")
    job = get_job(session_factory, job_id)
    assert (job.stage, job.progress, job.eta_s) == ("a", 0.0, None)  # nothing observed yet

    rep.start("a", 10)
    for step in range(1, 4):  # the first update is the baseline; two samples are not enough
        rep.update("a", step, {})
        assert get_job(session_factory, job_id).eta_s is None
        clock.now += 1.0
    rep.update("a", 4, {})  # 1 unit/s over 3 samples: 6 s of a, and b (not measured) at that rate
    job = get_job(session_factory, job_id)
    assert (job.progress, job.eta_s) == (0.2, 16.0)
    assert job.heartbeat_at is not None

    for step in range(5, 11):
        clock.now += 1.0
        rep.update("a", step, {})
    rep.finish("a")
    rep.end_stage("a")
    rep.begin_stage("b")  # b not observed yet: a's rate of work
    assert get_job(session_factory, job_id).eta_s == 10.0

    rep.start("b", 10)
    rep.update("b", 0, {})
    for step in range(1, 4):  # b runs 4x slower than a: its own rate, not the job's average
        clock.now += 4.0
        rep.update("b", step, {})
    job = get_job(session_factory, job_id)
    assert job.progress == 0.65 and job.eta_s == pytest.approx(28.0)
    rep.update("b", 10, {})
    assert rep.eta_s() == 0.0


def test_eta_leaves_out_stages_an_earlier_attempt_finished(session_factory, tenant_id):
    job_id = running_job(session_factory, tenant_id, silent_s=0)
    clock = FakeClock()
    rep = runner.JobReporter(
        session_factory, job_id, _two_stages(), interval_s=0, clock=clock, done_stages=["a"]
    )
    rep.begin_stage("a")  # finished before the crash: returns at once, and counts as done
    assert get_job(session_factory, job_id).progress == 0.5
    clock.now = 0.1
    rep.end_stage("a", done=True)
    rep.begin_stage("b")
    assert get_job(session_factory, job_id).eta_s is None  # 50% in 0.1 s is not a rate
    rep.start("b", 10)
    for step in range(0, 6):
        rep.update("b", step, {})
        clock.now += 2.0
    assert get_job(session_factory, job_id).eta_s == pytest.approx(10.0)  # 5 units at 0.5/s


def test_cancel_is_seen_at_the_next_progress_report(session_factory, tenant_id):
    job_id = running_job(session_factory, tenant_id, silent_s=0)
    rep = runner.JobReporter(session_factory, job_id, [Phase("a", 4, stage="a")], interval_s=0)
    rep.begin_stage("a")
    set_job(session_factory, job_id, cancel_requested=True)
    with pytest.raises(runner.Cancelled):
        rep.update("a", 1, {})


def test_an_attempt_taken_for_lost_stops_and_leaves_the_job_to_its_new_holder(
    session_factory, worker_settings, tenant_id, job_config, monkeypatch
):
    from sqlalchemy import select

    from kt_train import pipeline
    from service.db.models import Model

    job_id = add_job(session_factory, tenant_id, job_config(stages=["finetune_teacher", "distill", "export"]))
    real_distill = pipeline.STAGE_FUNCS["distill"]

    def handed_on_meanwhile(cfg, inputs, out_dir, reporter=None):
        # this worker stalled: the reaper requeued the job and another worker claimed it as attempt 2
        set_job(session_factory, job_id, status="running", attempts=2, heartbeat_at=utcnow())
        return real_distill(cfg, inputs, out_dir, reporter)

    monkeypatch.setitem(pipeline.STAGE_FUNCS, "distill", handed_on_meanwhile)
    assert runner.run_job(session_factory, job_id, worker_settings, progress_interval_s=0) == "running"
    job = get_job(session_factory, job_id)
    assert (job.status, job.attempts, job.finished_at, job.error) == ("running", 2, None, None)
    with session_factory() as s:
        assert s.scalars(select(Model).where(Model.job_id == job_id)).first() is None
    log = (worker_settings.data_dir / "jobs" / job_id / "job.log").read_text()
    assert "attempt 1 stopped: the job is now running as attempt 2" in log and "job succeeded" not in log


def test_heartbeat_only_for_its_own_attempt(session_factory, tenant_id):
    job_id = running_job(session_factory, tenant_id, silent_s=3600, attempts=2)
    old = get_job(session_factory, job_id).heartbeat_at
    Heartbeat(session_factory, job_id, interval_s=1, attempt=1).beat()
    assert get_job(session_factory, job_id).heartbeat_at == old
    Heartbeat(session_factory, job_id, interval_s=1, attempt=2).beat()
    assert get_job(session_factory, job_id).heartbeat_at != old
