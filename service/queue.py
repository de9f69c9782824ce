"""Enqueue jobs for the workers, without importing the worker (nor torch or kt_train).

The service builds its own Celery client from the same settings as ``worker.app`` (broker,
result backend, Redis visibility timeout) and sends tasks by name. A job is always enqueued
after its row is committed: Celery only carries the id, the row is the source of truth.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from service.settings import Settings

RUN_JOB_TASK = "kt.run_job"
DEFAULT_QUEUE = "cpu"
QUEUES = ("cpu", "gpu")  # must match worker.app.QUEUES
# Must match worker.app.VISIBILITY_TIMEOUT_S: longer than the longest stage.
VISIBILITY_TIMEOUT_S = 12 * 3600
REDIS_SCHEMES = ("redis://", "rediss://", "redis+socket://")
# Give up publishing after about this many seconds when the broker is down (then: 503).
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


@lru_cache(maxsize=8)
def celery_client(broker_url: str, result_backend: str) -> Celery:
    """A publish-only Celery app for this broker (cached: it holds a connection pool)."""
    app = Celery("kt-service", set_as_current=False)
    app.conf.update(
        broker_url=broker_url,
        result_backend=result_backend,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        enable_utc=True,
    )
    if broker_url.startswith(REDIS_SCHEMES):
        app.conf.broker_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    if result_backend.startswith(REDIS_SCHEMES):
        app.conf.result_backend_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    return app


def queue_for(device: str | None, settings: Settings) -> str:
    """The queue of a job asking for ``device``: any ``cuda`` device needs a GPU worker (``gpu``),
    ``cpu`` a CPU one; no device (or ``auto``) leaves it to ``settings.default_queue``."""
    if device is not None and device.startswith("cuda"):
        return "gpu"
    if device == "cpu":
        return "cpu"
    return settings.default_queue


def stage_queue(stage: str, device: str | None, settings: Settings) -> str | None:
    """The queue stage ``stage`` of a pipeline job asking for ``device`` runs on, or ``None`` for
    "where the job already is". Stages are routed only while ``settings.stage_queues``
    (``KT_STAGE_QUEUES``) names some, and only for a job that names no device (or ``auto``): a stage
    named there runs on its queue, the others on ``settings.default_queue``. A job asking for
    ``cpu`` or ``cuda`` stays on that device's queue (``queue_for``) from its first stage to its last."""
    if not settings.stage_queues or device not in (None, "auto"):
        return None
    return settings.stage_queues.get(stage, settings.default_queue)


def enqueue_job(settings: Settings, job_id: str, queue: str = DEFAULT_QUEUE) -> None:
    """Send ``kt.run_job(job_id)`` to ``queue``; raises when the broker can't be reached."""
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; the workers listen on {QUEUES}")
    client = celery_client(settings.broker_url, settings.result_backend)
    # ignore_result: nobody reads a task's result (the job row has it), and a Redis result backend
    # would otherwise be subscribed to before publishing, retrying for ~20 s when Redis is down
    client.send_task(
        RUN_JOB_TASK,
        args=[job_id],
        queue=queue,
        retry=True,
        retry_policy=PUBLISH_RETRY_POLICY,
        ignore_result=True,
    )
