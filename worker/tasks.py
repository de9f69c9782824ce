"""Celery tasks: thin wrappers over ``worker.runner``.

The API enqueues a job by name, after committing its row:
``celery_app.send_task("kt.run_job", args=[job_id], queue="cpu")``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import worker_init, worker_ready

from service.db.session import SessionLocal
from service.settings import get_settings
from worker import liveness, runner
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


@celery_app.task(name="kt.run_job", bind=True, max_retries=MAX_RETRIES, acks_late=True)
def run_job(self, job_id: str) -> str:
    """Run job ``job_id`` (see ``worker.runner.run_job``); unexpected errors retry with backoff."""
    can_retry = self.request.retries < self.max_retries
    _size_threads()
    try:
        return runner.run_job(SessionLocal(), job_id, get_settings(), can_retry=can_retry)
    except runner.JobRetry as err:
        delay = backoff_s(self.request.retries)
        log.warning("job %s: %s; retry %d in %.0f s", job_id, err, self.request.retries + 1, delay)
        raise self.retry(exc=err, countdown=delay) from err


_reaper: liveness.Reaper | None = None


@worker_ready.connect
def start_reaper(**_: Any) -> None:
    """Every worker looks for lost jobs (see ``worker.liveness``): at start, then periodically."""
    global _reaper
    if _reaper is None:
        _reaper = liveness.start_reaper(SessionLocal(), get_settings())
