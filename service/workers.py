"""Which worker processes are alive, and handing a job back when its worker stops or dies.

The job heartbeat (``jobs.heartbeat_at``, ``worker.liveness.Heartbeat``) says a *job* is being
worked on: it says nothing while the workers are idle, and it is only taken for lost after
``KT_JOB_HEARTBEAT_TIMEOUT_S`` (5 min). So every Celery worker process also keeps a row in
``workers`` (``worker.liveness.WorkerBeat``): its Celery name, host and pid, a heartbeat every
quarter of ``KT_WORKER_HEARTBEAT_TIMEOUT_S``, and the job attempt it runs now. The row lives in
the service database, which the API and every worker share wherever they run, so:

- ``readiness`` (``/readyz``) counts the rows with a fresh heartbeat. An API whose workers run on
  other machines sees them; one whose workers all died says so, naming the last one and why.
- ``process_died`` is for a supervisor that saw a worker process exit (``kt serve``): it marks the
  row with the cause and hands back the job the process held at once, instead of leaving it
  ``running`` until the job heartbeat times out.
- ``release_job`` hands one job attempt back: ``queued`` and sent to its queue again (finished
  stages are kept, so the next attempt resumes from them), unless a cancel was asked for (then
  ``canceled``) or the job has used its attempts (then ``failed``). It is a conditional UPDATE on
  the attempt still holding the job, so it never undoes what a reaper, another worker or the
  attempt itself did first.

A worker that stops cleanly deletes its row, so a deployment scaled down to no workers on
purpose does not read as "a worker died". This module never imports the worker (nor torch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import Job, Worker, utcnow
from service.queue import enqueue_job
from service.settings import Settings

log = logging.getLogger(__name__)

# Rows silent for longer than this are forgotten (pruned when a worker registers; ignored by /readyz).
WORKER_MEMORY = timedelta(days=1)
MAX_WORKER_BEAT_INTERVAL_S = 10.0
# ``jobs.params`` key counting the attempts that do not count toward KT_JOB_MAX_ATTEMPTS: those
# made before the last ``POST /v1/jobs/{id}/retry`` (which sets it), plus one per attempt a
# stopping worker handed back (a deploy or restart is not the job's fault).
ATTEMPTS_BEFORE_RETRY = "attempts_before_retry"
START_A_WORKER = "start one: `celery -A worker.app:celery_app worker -Q cpu,gpu --pool solo`, or `kt serve`"


def worker_beat_interval_s(settings: Settings) -> float:
    """Four beats per timeout, so one slow database write does not make a live worker look gone."""
    return min(MAX_WORKER_BEAT_INTERVAL_S, settings.worker_heartbeat_timeout_s / 4)


def attempts_since_retry(job: Job) -> int:
    """Attempts that count toward KT_JOB_MAX_ATTEMPTS (see ``ATTEMPTS_BEFORE_RETRY``)."""
    base = (job.params or {}).get(ATTEMPTS_BEFORE_RETRY) or 0
    return job.attempts - int(base) if isinstance(base, int) else job.attempts


# --- the workers' own rows -------------------------------------------------------------------


def register_worker(session_factory: sessionmaker[Session], name: str, host: str, pid: int) -> str:
    """A row for this worker process (its id); forgets rows silent for over ``WORKER_MEMORY`` and
    an older row of the same host and pid (a reused pid is a new process)."""
    now = utcnow()
    with session_factory() as session:
        session.execute(delete(Worker).where(Worker.heartbeat_at < now - WORKER_MEMORY))
        session.execute(delete(Worker).where(Worker.host == host, Worker.pid == pid))
        row = Worker(name=name, host=host, pid=pid, started_at=now, heartbeat_at=now)
        session.add(row)
        session.commit()
        return row.id


def beat_worker(
    session_factory: sessionmaker[Session], worker_id: str, job_id: str | None, attempt: int | None
) -> bool:
    """A heartbeat, with the job attempt held now; ``False`` when the row is gone or stopped."""
    with session_factory() as session:
        done = session.execute(
            update(Worker)
            .where(Worker.id == worker_id, Worker.stopped_at.is_(None))
            .values(heartbeat_at=utcnow(), job_id=job_id, attempt=attempt)
        )
        session.commit()
    return bool(done.rowcount)  # type: ignore[attr-defined]


def mark_stopped(session_factory: sessionmaker[Session], worker_id: str, reason: str) -> None:
    """The worker is on its way out (``reason``): no longer counted as alive."""
    with session_factory() as session:
        session.execute(
            update(Worker).where(Worker.id == worker_id).values(stopped_at=utcnow(), stop_reason=reason)
        )
        session.commit()


def unregister_worker(session_factory: sessionmaker[Session], worker_id: str) -> None:
    """A clean exit: the row goes (a worker stopped on purpose is not a worker that died)."""
    with session_factory() as session:
        session.execute(delete(Worker).where(Worker.id == worker_id))
        session.commit()


# --- readiness -------------------------------------------------------------------------------


def _ago(now: datetime, then: datetime) -> str:
    return f"{max(0.0, (now - then).total_seconds()):.1f} s ago"


def why_gone(row: Worker, settings: Settings, now: datetime) -> str:
    """How worker ``row`` is known not to be alive, in words."""
    who = f"{row.name} (pid {row.pid} on {row.host})"
    if row.stopped_at is not None:
        return f"{who} {row.stop_reason or 'stopped'} {_ago(now, row.stopped_at)}"
    return (
        f"{who} sent its last heartbeat {_ago(now, row.heartbeat_at)} "
        f"(KT_WORKER_HEARTBEAT_TIMEOUT_S is {settings.worker_heartbeat_timeout_s:g} s)"
    )


def readiness(session: Session, settings: Settings, now: datetime | None = None) -> tuple[int, str | None]:
    """(workers alive, ``None`` or why that is too few for ``KT_READY_MIN_WORKERS``)."""
    now = now or utcnow()
    rows = session.scalars(
        select(Worker).where(Worker.heartbeat_at >= now - WORKER_MEMORY).order_by(Worker.heartbeat_at.desc())
    ).all()
    fresh = now - timedelta(seconds=settings.worker_heartbeat_timeout_s)
    alive = [r for r in rows if r.stopped_at is None and r.heartbeat_at >= fresh]
    gone = [r for r in rows if r.stopped_at is not None or r.heartbeat_at < fresh]
    need = settings.ready_min_workers
    if need == "auto":  # workers are expected once one was seen to die or fall silent
        need = 1 if gone else 0
    if len(alive) >= need:
        return len(alive), None
    if gone:
        cause = f"the last one, {why_gone(gone[0], settings, now)}"
    else:
        cause = f"none has sent a heartbeat to this database ({START_A_WORKER})"
    counted = "no worker is alive" if not alive else f"{len(alive)} worker(s) alive, {need} needed"
    return len(alive), f"{counted}: {cause}"


# --- handing a job back ----------------------------------------------------------------------


def note_in_job_log(settings: Settings, job_id: str, line: str) -> None:
    """One line in the job's log (the format of ``worker.joblog.JobLog``, which serves it)."""
    path = Path(settings.data_dir) / "jobs" / job_id / "job.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{utcnow():%Y-%m-%d %H:%M:%S}Z {line}\n")
    except OSError as err:
        log.warning("job log %s not written (%s): %s", path, err, line)


def died_message(job: Job, settings: Settings, why: str) -> str:
    return (
        f"The worker running this job {why} on attempt {job.attempts}, and the job has used all "
        f"{settings.job_max_attempts} attempts (KT_JOB_MAX_ATTEMPTS). The request itself was not at "
        f"fault: retry it with POST /v1/jobs/{job.id}/retry (finished stages are kept), or submit it again."
    )


def _outcome(
    job: Job, settings: Settings, why: str, counts_as_attempt: bool, now: datetime
) -> dict[str, Any]:
    """The row's new values when attempt ``job.attempts`` gives the job up (see ``release_job``)."""
    if job.cancel_requested:
        return {"status": "canceled", "finished_at": now, "eta_s": None}
    if counts_as_attempt and attempts_since_retry(job) >= settings.job_max_attempts:
        return {
            "status": "failed",
            "finished_at": now,
            "eta_s": None,
            "error": died_message(job, settings, why),
        }
    note = (
        f"requeued to '{job.queue}' at {now:%Y-%m-%d %H:%M:%S} UTC: the worker running attempt "
        f"{job.attempts} {why}; stages it finished are kept"
    )
    values: dict[str, Any] = {"status": "queued", "eta_s": None, "error": note}
    if not counts_as_attempt:
        base = (job.params or {}).get(ATTEMPTS_BEFORE_RETRY) or 0
        values["params"] = {
            **(job.params or {}),
            ATTEMPTS_BEFORE_RETRY: (base if isinstance(base, int) else 0) + 1,
        }
    return values


def release_job(
    session_factory: sessionmaker[Session],
    settings: Settings,
    job_id: str,
    attempt: int,
    why: str,
    *,
    counts_as_attempt: bool,
    source: str,
    enqueue: Callable[[Settings, str, str], None] = enqueue_job,
) -> str | None:
    """Hand back attempt ``attempt`` of job ``job_id`` because its worker ``why`` (e.g. "was killed
    by SIGKILL"): the job's new status, or ``None`` when that attempt no longer held it. A
    requeued job is sent to its queue again; if the broker refuses, the row goes back to
    ``running`` as it was, for the reaper to requeue after the job heartbeat timeout.
    ``counts_as_attempt``: ``False`` for a worker that was told to stop (its attempt is not
    counted against KT_JOB_MAX_ATTEMPTS). ``source`` names who acted, in the job's log."""
    now = utcnow()
    held = [Job.id == job_id, Job.status == "running", Job.attempts == attempt]
    with session_factory() as session:
        job = session.scalars(select(Job).where(*held)).first()
        if job is None:
            return None
        before = {"status": job.status, "error": job.error, "eta_s": job.eta_s, "params": job.params}
        values = _outcome(job, settings, why, counts_as_attempt, now)
        done = session.execute(update(Job).where(*held).values(**values))
        session.commit()
    if done.rowcount != 1:  # type: ignore[attr-defined]
        return None
    status = str(values["status"])
    line = (
        values.get("error")
        if status != "canceled"
        else "canceled: its worker stopped after the cancel request"
    )
    log.warning("job %s: %s", job_id, line)
    note_in_job_log(settings, job_id, f"{source}: {line}")
    if status == "queued":
        try:
            enqueue(settings, job_id, job.queue)
        except Exception as err:
            log.error(
                "job %s: could not requeue (%s); the reaper will after the heartbeat timeout", job_id, err
            )
            with session_factory() as session:
                session.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(**before))
                session.commit()
            return "running"
    return status


def process_died(
    session_factory: sessionmaker[Session],
    settings: Settings,
    host: str,
    pid: int,
    why: str,
    *,
    enqueue: Callable[[Settings, str, str], None] = enqueue_job,
) -> list[tuple[str, str]]:
    """A supervisor saw worker process ``pid`` on ``host`` exit (``why``: "was killed by SIGKILL").
    Marks its row (``/readyz`` then counts it gone at once) and hands back the job attempt it
    held; returns ``(job_id, new status)`` for each job handed back. A worker that unregistered
    (a clean exit) has no row, and nothing is done."""
    now = utcnow()
    with session_factory() as session:
        rows = session.scalars(select(Worker).where(Worker.host == host, Worker.pid == pid)).all()
        held = [(r.job_id, r.attempt) for r in rows if r.job_id is not None and r.attempt is not None]
        for row in rows:
            stopping = f"{row.stop_reason}, then " if row.stop_reason else ""
            row.stopped_at, row.stop_reason = now, f"{stopping}{why}"
        session.commit()
    released = []
    for job_id, attempt in held:
        status = release_job(
            session_factory,
            settings,
            job_id,
            attempt,
            why,
            counts_as_attempt=True,
            source="kt serve",
            enqueue=enqueue,
        )
        if status is not None:
            released.append((job_id, status))
    return released
