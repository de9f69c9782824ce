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

The job heartbeat only times out after minutes, so two things act sooner (``service.workers``):
each worker process keeps a row of its own (``WorkerBeat``: a heartbeat, and the job attempt it
holds, from ``HOLDINGS``), which ``/readyz`` counts and by which ``kt serve`` hands back the job of a
worker process it saw die; and a worker told to stop hands its running job back itself
(``request_stop``, from Celery's shutdown signal), not counted as an attempt.
"""

from __future__ import annotations

import logging
import os
import socket
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
from service.workers import (  # noqa: F401 - ATTEMPTS_BEFORE_RETRY: re-exported
    ATTEMPTS_BEFORE_RETRY,
    attempts_since_retry,
    beat_worker,
    mark_stopped,
    register_worker,
    release_job,
    unregister_worker,
    worker_beat_interval_s,
)
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


class Holdings:
    """The job attempts this process runs now (one, with ``--pool solo``), as ``Heartbeat`` enters
    and leaves them. The worker's row (``WorkerBeat``) announces them at once, so a supervisor that
    sees the process die knows which job to hand back; a stopping worker hands them back itself."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, int | None] = {}
        self.worker: WorkerBeat | None = None

    def add(self, job_id: str, attempt: int | None) -> None:
        with self._lock:
            self._jobs[job_id] = attempt
        self._announce()

    def discard(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)
        self._announce()

    def held(self) -> list[tuple[str, int]]:
        """(job id, attempt) of each job held now (attempts unknown to it are left out)."""
        with self._lock:
            return [(job_id, attempt) for job_id, attempt in self._jobs.items() if attempt is not None]

    def _announce(self) -> None:
        if self.worker is not None:
            self.worker.beat()


HOLDINGS = Holdings()


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
        HOLDINGS.add(self.job_id, self.attempt)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        HOLDINGS.discard(self.job_id)


@dataclass
class ReapResult:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    canceled: list[str] = field(default_factory=list)


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


# --- the worker process itself ----------------------------------------------------------------


class WorkerBeat:
    """This worker process's row in ``workers`` (see ``service.workers``): registered at start,
    then a heartbeat, with the job attempt held (``HOLDINGS``), every ``interval_s`` from a daemon
    thread and whenever a job starts or ends. ``stopping`` marks it no longer alive (told to stop),
    ``close`` deletes it (a clean exit). A database blip costs a beat, never the worker."""

    def __init__(self, session_factory: sessionmaker[Session], settings: Settings, name: str) -> None:
        self.session_factory = session_factory
        self.settings = settings
        self.name = name
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.id: str | None = None
        self.interval_s = worker_beat_interval_s(settings)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kt-worker-beat", daemon=True)

    def start(self) -> WorkerBeat:
        try:
            self.id = register_worker(self.session_factory, self.name, self.host, self.pid)
        except Exception:  # the database is down: the first beat registers
            log.warning("worker %s: not registered yet", self.name, exc_info=True)
        HOLDINGS.worker = self
        self._thread.start()
        return self

    def beat(self) -> None:
        if self._stop.is_set():
            return
        held = HOLDINGS.held()
        job_id, attempt = held[0] if held else (None, None)
        with self._lock:
            try:
                if self.id is None or not beat_worker(self.session_factory, self.id, job_id, attempt):
                    # never registered (database down at start) or the row was removed: again
                    self.id = register_worker(self.session_factory, self.name, self.host, self.pid)
                    beat_worker(self.session_factory, self.id, job_id, attempt)
            except Exception:
                log.warning("worker %s: heartbeat not written", self.name, exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def stopping(self, reason: str) -> None:
        """Told to stop: no more beats, and the row says why (``/readyz`` stops counting it)."""
        self._stop.set()
        with self._lock:
            if self.id is not None:
                try:
                    mark_stopped(self.session_factory, self.id, reason)
                except Exception:
                    log.warning("worker %s: stop not recorded", self.name, exc_info=True)

    def close(self) -> None:
        """A clean exit: the row is deleted."""
        self._stop.set()
        if HOLDINGS.worker is self:
            HOLDINGS.worker = None
        with self._lock:
            if self.id is not None:
                try:
                    unregister_worker(self.session_factory, self.id)
                except Exception:
                    log.warning("worker %s: row not removed", self.name, exc_info=True)


_stop_requested = threading.Event()


def stop_requested() -> bool:
    """This worker was told to stop: the running attempt stops at its next progress report."""
    return _stop_requested.is_set()


def hand_back(session_factory: sessionmaker[Session], settings: Settings, why: str) -> list[tuple[str, str]]:
    """Give every job this process holds back to its queue now (``service.workers.release_job``,
    not counted as an attempt): another worker, or this one restarted, resumes it from its
    finished stages instead of waiting out the heartbeat timeout. (job id, new status) each."""
    released = []
    for job_id, attempt in HOLDINGS.held():
        try:
            status = release_job(
                session_factory, settings, job_id, attempt, why, counts_as_attempt=False, source="worker"
            )
        except Exception:  # the database is down: the reaper requeues it after the timeout
            log.exception("job %s: could not be handed back", job_id)
            continue
        if status is not None:
            released.append((job_id, status))
    return released


def request_stop(
    session_factory: sessionmaker[Session], settings: Settings, worker: WorkerBeat | None, why: str
) -> threading.Thread | None:
    """The worker was told to stop (called from Celery's signal handler, so the database work runs
    in a thread): mark its row stopping and hand its jobs back. Once per process; the thread, or
    ``None`` when already asked."""
    if _stop_requested.is_set():
        return None
    _stop_requested.set()

    def run() -> None:
        if worker is not None:
            worker.stopping(why)
        for job_id, status in hand_back(session_factory, settings, why):
            log.warning("job %s handed back (%s): %s", job_id, why, status)

    thread = threading.Thread(target=run, name="kt-hand-back", daemon=True)
    thread.start()
    return thread
