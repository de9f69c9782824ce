"""Celery tasks: thin wrappers over ``worker.runner`` and ``worker.scheduler``.

The API enqueues a job by name, after committing its row:
``celery_app.send_task("kt.run_job", args=[job_id], queue="cpu")``. The message wakes a worker on
that queue, which then starts jobs in the fair order of ``worker.scheduler`` (the message's own
job, or another tenant's that has waited longer) until none is left that it may start.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from types import ModuleType
from typing import Any

from celery.exceptions import Reject
from celery.signals import worker_init, worker_ready, worker_shutdown, worker_shutting_down
from celery.worker import state as worker_state
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import Job
from service.db.session import SessionLocal
from service.queue import DEFAULT_QUEUE, QUEUES
from service.settings import Settings, get_settings
from worker import liveness, scheduler
from worker.app import celery_app

# Worker processes on this machine, recorded by the main process (children inherit the
# environment); each one sizes its torch threads to cores // processes (kt_train.threads).
PROCESSES_ENV = "KT_WORKER_PROCESSES"
_threads_set = False

log = logging.getLogger(__name__)

MAX_RETRIES = 3
BACKOFF_BASE_S = 10.0
BACKOFF_MAX_S = 600.0


def backoff_s(retries: int) -> float:
    """Seconds before retry number ``retries + 1``: 10, 20, 40, ... capped at 10 min."""
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**retries)


@worker_init.connect
def _record_concurrency(sender: Any = None, **_: Any) -> None:
    concurrency = getattr(sender, "concurrency", None)
    if isinstance(concurrency, int) and concurrency > 0:
        os.environ.setdefault(PROCESSES_ENV, str(concurrency))


@worker_init.connect
def _lower_priority(**_: Any) -> None:
    """Before any task: the worker takes niceness ``KT_WORKER_NICE`` (default 19, the lowest), so on a machine
    it shares with the API (``kt serve``, a small box) the API's requests go first and training
    takes the rest of the cores; alone on a machine it changes nothing. Pool processes inherit it."""
    nice = get_settings().worker_nice
    if nice > 0:
        try:
            now = os.nice(0)
            if now < nice:
                os.nice(nice - now)
        except OSError as e:
            log.warning("worker: could not lower the CPU priority to nice %d (%s)", nice, e)


def _size_threads() -> None:
    """Once per process: torch threads = KT_THREADS, or cores // worker processes (see
    ``kt_train.threads``; the default of one thread per core collapses under contention)."""
    global _threads_set
    if _threads_set:
        return
    from kt_train.threads import configure_threads

    try:
        processes = int(os.environ.get(PROCESSES_ENV, "1"))
    except ValueError:
        processes = 1
    configure_threads(processes=processes)
    _threads_set = True


def _flag_set(value: Any) -> bool:
    """Celery's shutdown flags hold an exit code once set: a warm shutdown's is 0 (EX_OK), which
    ``in (None, False)`` would take for unset (0 == False)."""
    return value is not None and value is not False


def _shutting_down() -> bool:
    """Celery was told to shut down (SIGTERM, SIGINT): start no further job (this worker has just
    handed its running one back, ``hand_back_jobs``)."""
    return (
        liveness.stop_requested()
        or _flag_set(worker_state.should_stop)
        or _flag_set(worker_state.should_terminate)
    )


def _queue_of(request: Any, session_factory: sessionmaker[Session], job_id: str) -> str:
    """The queue the message came from (its routing key), else the queue of the job it names."""
    routing_key = (getattr(request, "delivery_info", None) or {}).get("routing_key")
    if routing_key in QUEUES:
        return str(routing_key)
    with session_factory() as session:
        job = session.get(Job, job_id)
        return job.queue if job is not None and job.queue in QUEUES else DEFAULT_QUEUE


def _wake_later(job: Job, delay_s: float) -> None:
    """Send a message for ``job`` to arrive once its retry backoff is over."""
    try:
        run_job.apply_async(args=[job.id], queue=job.queue, countdown=delay_s)
    except Exception:  # the broker is down: the next message on the queue, or a free worker, starts it
        log.exception("job %s: could not send its retry message", job.id)


def _runner() -> ModuleType:
    """``worker.runner``, imported on first use: it pulls in torch and kt_train, seconds of work a
    worker needs to run a job but not to be ready (a restarted worker counts as alive, and takes
    messages, that much sooner); ``warm_up`` starts the import as soon as the worker is ready."""
    from worker import runner

    return runner


@worker_ready.connect
def warm_up(**_: Any) -> None:
    threading.Thread(target=_runner, name="kt-warm-up", daemon=True).start()


def _run_claimed(session_factory: sessionmaker[Session], settings: Settings, job: Job) -> str:
    """Run a claimed job; an unexpected error on one of its first ``MAX_RETRIES`` attempts (since
    a manual retry) requeues it, not to start before ``backoff_s`` (10, 20, 40 s) has passed."""
    runner = _runner()
    attempt = liveness.attempts_since_retry(job)
    delay = backoff_s(max(0, attempt - 1))
    try:
        return runner.run_claimed(
            session_factory, job, settings, can_retry=attempt <= MAX_RETRIES, retry_delay_s=delay
        )
    except runner.JobRetry as err:
        log.warning("job %s: %s; retry %d in %.0f s", job.id, err, attempt, delay)
        _wake_later(job, delay)
        return "queued"


@celery_app.task(name="kt.run_job", bind=True, acks_late=True)
def run_job(self: Any, job_id: str) -> str:
    """Woken by a message for job ``job_id``: start the jobs ``worker.scheduler.claim_next`` picks
    on this message's queue, one after the other, until none is left that this worker may start
    (or the worker is stopping). So a worker that becomes free always takes the fairest next job,
    whichever message woke it; a message whose job another worker already ran finds nothing.

    A stopping worker still takes one more message after its last task (Celery drains the broker
    once more on its way out), often the one its own hand-back just sent: that message goes back to
    the queue (``Reject(requeue=True)``) for the next worker, never acknowledged and lost."""
    if _shutting_down():
        raise Reject("this worker is stopping; the message is left for the next one", requeue=True)
    _size_threads()
    session_factory, settings = SessionLocal(), get_settings()
    queue = _queue_of(self.request, session_factory, job_id)
    outcomes: list[str] = []
    while not _shutting_down():
        job = scheduler.claim_next(session_factory, settings, queue)
        if job is None:
            break
        outcomes.append(f"{job.id}: {_run_claimed(session_factory, settings, job)}")
    return "; ".join(outcomes) or f"nothing to start on {queue!r} (job {job_id} was started already)"


_reaper: liveness.Reaper | None = None
_beat: liveness.WorkerBeat | None = None
_stopping: threading.Thread | None = None
HAND_BACK_WAIT_S = 10.0


@worker_ready.connect
def start_reaper(**_: Any) -> None:
    """Every worker looks for lost jobs (see ``worker.liveness``): at start, then periodically."""
    global _reaper
    if _reaper is None:
        _reaper = liveness.start_reaper(SessionLocal(), get_settings())


@worker_ready.connect
def announce_worker(sender: Any = None, **_: Any) -> None:
    """This process's row in ``workers``: ``/readyz`` counts it, ``kt serve`` finds its job by pid."""
    global _beat
    if _beat is None:
        name = str(getattr(sender, "hostname", None) or f"celery@{socket.gethostname()}")
        _beat = liveness.WorkerBeat(SessionLocal(), get_settings(), name).start()


@worker_shutting_down.connect
def hand_back_jobs(sig: Any = None, how: Any = None, **_: Any) -> None:
    """Told to stop (SIGTERM: warm shutdown; SIGINT, SIGQUIT: cold): the running job goes back to
    its queue at once instead of holding the worker until it ends (``liveness.request_stop``)."""
    global _stopping
    why = f"was told to stop ({sig}, {str(how or 'warm').lower()} shutdown)"
    _stopping = liveness.request_stop(SessionLocal(), get_settings(), _beat, why) or _stopping


@worker_shutdown.connect
def remove_worker(**_: Any) -> None:
    """A clean exit: the hand-back finished, then the row goes."""
    if _stopping is not None:
        _stopping.join(HAND_BACK_WAIT_S)
    if _beat is not None:
        _beat.close()
