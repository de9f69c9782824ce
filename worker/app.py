"""The Celery application. Celery only carries job ids; the ``jobs`` row is the source of truth.

Start a worker with ``celery -A worker.app:celery_app worker -Q cpu`` (``-Q gpu`` on GPU machines).
Broker and result backend come from ``service.settings`` (``KT_BROKER_URL``, ``KT_RESULT_BACKEND``):
Redis in production, kombu's SQLite-backed SQLAlchemy transport (``sqla+sqlite://``) embedded.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_init
from kombu import Exchange, Queue

from service.settings import Settings, get_settings
from service.storage import secure_data_dir

QUEUES = ("cpu", "gpu")
# Longer than the longest stage: a task not acked within it is handed to another worker.
VISIBILITY_TIMEOUT_S = 12 * 3600
REDIS_SCHEMES = ("redis://", "rediss://", "redis+socket://")


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings`` (the worker's is ``celery_app``; tests make their own)."""
    app = Celery("kt", include=["worker.tasks", "worker.gallery_tasks"])
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        # Each queue gets its own exchange and routing key; a bare Queue(name) binds with the
        # default routing key, so a task sent to "gpu" could land on "cpu".
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue="cpu",
        task_create_missing_queues=False,
        # tasks are idempotent (the row + resumable stages): ack after the run, redeliver on a crash
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # the broker going away (a Redis restart) must not stop a running job: its row holds its
        # state, and a restarted Redis without persistence has lost the message to redeliver anyway
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_track_started=True,
        broker_connection_retry_on_startup=True,
        enable_utc=True,
    )
    # Only Redis knows a visibility timeout; kombu's SQLAlchemy transport and Celery's database
    # result backend hand their options to create_engine, which refuses unknown ones.
    if settings.broker_url.startswith(REDIS_SCHEMES):
        app.conf.broker_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    if settings.result_backend.startswith(REDIS_SCHEMES):
        app.conf.result_backend_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    return app


celery_app = make_celery(get_settings())


@worker_init.connect
def _private_files(**_: Any) -> None:
    """Before the worker connects or runs anything: what it writes (job runs, models, logs, the
    SQLite result backend) is 0600 in 0700 folders, whatever umask it was started with."""
    secure_data_dir(get_settings().data_dir)
