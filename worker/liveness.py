"""Which worker holds a running job, and what happens when that worker dies.

A worker holding a job writes ``jobs.heartbeat_at`` every few seconds (``Heartbeat``, a thread,
so slow steps such as loading a model don't starve it). A ``running`` row whose heartbeat is older
than ``KT_JOB_HEARTBEAT_TIMEOUT_S`` has no live worker: every worker runs a reaper
(``start_reaper``, a timer thread, first pass at worker start) that sends such a job back to its
queue, or fails it with a message saying it may be resubmitted once it has used
``KT_JOB_MAX_ATTEMPTS`` attempts. Every change is a conditional UPDATE on the stale heartbeat, so
several reapers (and a worker whose heartbeat comes back) never both act on one job.

Celery's own redelivery (``acks_late`` + ``reject_on_worker_lost``, and Redis' visibility timeout)
may hand the same job to a worker too; ``claim`` in ``worker.runner`` refuses a job whose
heartbeat is fresh, so a job never runs twice at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import Job, utcnow
from service.queue import enqueue_job
from service.settings import Settings
from worker.joblog import JobLog, job_log_path

log = logging.getLogger(__name__)

MAX_HEARTBEAT_INTERVAL_S = 30.0


def heartbeat_interval_s(settings: Settings) -> float:
    """A few beats per timeout, so one slow database write does not make a live job look lost."""
    return min(MAX_HEARTBEAT_INTERVAL_S, settings.job_heartbeat_timeout_s / 4)


def stale(cutoff: datetime) -> ColumnElement[bool]:
    """The job's last sign of life is older than ``cutoff`` (rows without a heartbeat, written
    before there were heartbeats, count from their last update)."""
    return or_(Job.heartbeat_at < cutoff, and_(Job.heartbeat_at.is_(None), Job.updated_at < cutoff))


class Heartbeat:
    """``with Heartbeat(factory, job_id, interval_s, attempt):`` writes ``heartbeat_at`` every
    ``interval_s`` from a daemon thread, while the job is ``running`` as ``attempt`` (a job handed
    on to another worker's attempt is not kept alive by this one)."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        job_id: str,
        interval_s: float,
        attempt: int | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.job_id = job_id
        self.interval_s = interval_s
        self.attempt = attempt
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id[:8]}", daemon=True)

    def beat(self) -> None:
        try:
            with self.session_factory() as session:
                held = [Job.id == self.job_id, Job.status == "running"]
                if self.attempt is not None:
                    held.append(Job.attempts == self.attempt)
                session.execute(update(Job).where(*held).values(heartbeat_at=utcnow()))
                session.commit()
        except Exception:  # a database blip: the next beat tries again, long before the timeout
            log.warning("job %s: heartbeat not written", self.job_id, exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class ReapResult:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    canceled: list[str] = field(default_factory=list)


# ``jobs.params`` key where ``POST /v1/jobs/{id}/retry`` notes the attempts made before it: a
# retried job gets KT_JOB_MAX_ATTEMPTS fresh attempts (``attempts`` itself keeps counting, since it
# tells attempts apart).
ATTEMPTS_BEFORE_RETRY = "attempts_before_retry"


def attempts_since_retry(job: Job) -> int:
    """Attempts the job made since it was last retried by hand (all of them if never)."""
    base = (job.params or {}).get(ATTEMPTS_BEFORE_RETRY) or 0
    return job.attempts - int(base) if isinstance(base, int) else job.attempts


def lost_message(attempts: int, settings: Settings, job_id: str = "{id}") -> str:
    return (
        f"The worker running this job stopped (no heartbeat for {settings.job_heartbeat_timeout_s:g} s) on "
        f"attempt {attempts}, and the job has used all {settings.job_max_attempts} attempts "
        "(KT_JOB_MAX_ATTEMPTS). The request itself was not at fault: retry it with "
        f"POST /v1/jobs/{job_id}/retry (finished stages are kept), or submit it again."
    )


def reap_lost_jobs(
    session_factory: sessionmaker[Session],
    settings: Settings,
    *,
    now: datetime | None = None,
    enqueue: Callable[[Settings, str, str], None] = enqueue_job,
) -> ReapResult:
    """One pass: requeue (or fail, or finish canceling) every ``running`` job without a live worker."""
    now = now or utcnow()
    timeout = settings.job_heartbeat_timeout_s
    cutoff = now - timedelta(seconds=timeout)
    result = ReapResult()
    with session_factory() as session:
        lost = session.scalars(select(Job).where(Job.status == "running", stale(cutoff))).all()
    for job in lost:
        last = job.heartbeat_at or job.updated_at
        silent = (now - last).total_seconds() if last else timeout
        values: dict[str, Any]
        if job.cancel_requested:
            kind, values = "canceled", {"status": "canceled", "finished_at": now, "eta_s": None}
            line = "canceled: its worker was lost after the cancel request"
        elif attempts_since_retry(job) >= settings.job_max_attempts:
            message = lost_message(job.attempts, settings, job.id)
            kind, values = "failed", {"status": "failed", "finished_at": now, "eta_s": None, "error": message}
            line = f"failed: {message}"
        else:
            note = (
                f"requeued to '{job.queue}' at {now:%Y-%m-%d %H:%M:%S} UTC: the worker running attempt "
                f"{job.attempts} sent no heartbeat for {silent:.0f} s (limit {timeout:g} s); "
                "stages it finished are kept"
            )
            kind, values = "requeued", {"status": "queued", "eta_s": None, "error": note}
            line = note
        with session_factory() as session:
            # only if still running and still silent: a worker may have beaten, or another reaper acted
            done = session.execute(
                update(Job).where(Job.id == job.id, Job.status == "running", stale(cutoff)).values(**values)
            )
            session.commit()
        if done.rowcount != 1:  # type: ignore[attr-defined]
            continue
        log.warning("job %s: %s", job.id, line)
        JobLog(job_log_path(settings, job.id)).write(f"reaper: {line}")
        if kind == "requeued":
            try:
                enqueue(settings, job.id, job.queue)
            except Exception as err:
                # put it back as it was, so that the next pass tries again
                log.error("job %s: could not requeue (%s); next reaper pass retries", job.id, err)
                with session_factory() as session:
                    session.execute(
                        update(Job)
                        .where(Job.id == job.id, Job.status == "queued")
                        .values(status="running", heartbeat_at=job.heartbeat_at)
                    )
                    session.commit()
                continue
        getattr(result, kind).append(job.id)
    return result


class Reaper:
    """Runs ``reap_lost_jobs`` now and then every ``interval_s`` in a daemon thread."""

    def __init__(self, session_factory: sessionmaker[Session], settings: Settings, interval_s: float) -> None:
        self.session_factory = session_factory
        self.settings = settings
        self.interval_s = interval_s
        self.passes = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kt-reaper", daemon=True)

    def _run(self) -> None:
        while True:
            try:
                found = reap_lost_jobs(self.session_factory, self.settings)
                if found.requeued or found.failed or found.canceled:
                    log.info("reaper: %s", found)
            except Exception:  # the database is down: try again next time
                log.exception("reaper pass failed")
            self.passes += 1
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> Reaper:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()


def start_reaper(session_factory: sessionmaker[Session], settings: Settings) -> Reaper | None:
    """The worker's reaper (``None`` when ``KT_REAPER_INTERVAL_S`` is 0)."""
    if settings.reaper_interval_s <= 0:
        return None
    log.info(
        "reaper: every %g s, jobs silent for %g s are requeued (at most %d attempts)",
        settings.reaper_interval_s,
        settings.job_heartbeat_timeout_s,
        settings.job_max_attempts,
    )
    return Reaper(session_factory, settings, settings.reaper_interval_s).start()
