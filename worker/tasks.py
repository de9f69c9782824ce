"""Celery tasks: thin wrappers over ``worker.runner`` and ``worker.scheduler``.

The API enqueues a job by name, after committing its row:
``celery_app.send_task("kt.run_job", args=[job_id], queue="cpu")``. The message wakes a worker on
that queue, which then starts jobs in the fair order of ``worker.scheduler`` (the message's own
job, or another tenant's that has waited longer) until none is left that it may start.

A pipeline job whose stages run on different queues (``KT_STAGE_QUEUES``, e.g. ``curate=cpu,
distill=gpu``) is a Celery ``chain`` of ``kt.run_stage`` tasks, one per run of consecutive stages on
one queue, each sent to its queue. The task that started the job runs its stages up to the first one
on another queue, hands the job off there (``worker.runner.hand_off``: the row ``queued`` on that
queue, marked with the stage it goes on at) and sends the chain (``send_chain``). Each link takes the
job if it still waits for that stage (``worker.scheduler.claim_stage``), runs its stages from the
files the earlier ones left in the shared data dir, and at the next queue sends the rest of the
chain it came with; then, like ``kt.run_job``, it starts the fair next jobs on its queue. A link
whose job is no longer waiting for it (canceled, failed, taken by a worker asking for the next job
on that queue) ends its chain there. The row stays the source of truth: cancel, retry and the
reaper act on it as for any job.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from types import ModuleType
from typing import Any

from celery import chain, signature
from celery.exceptions import Reject
from celery.signals import worker_init, worker_ready, worker_shutdown, worker_shutting_down
from celery.worker import state as worker_state
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import quotas
from service.db.models import Job, Tenant
from service.db.session import SessionLocal
from service.queue import DEFAULT_QUEUE, PUBLISH_RETRY_POLICY, QUEUES, enqueue_job
from service.settings import Settings, get_settings
from worker import liveness, scheduler
from worker.app import celery_app

# Worker processes on this machine, recorded by the main process (children inherit the
# environment); each one sizes its torch threads to cores // processes (kt_train.threads).
PROCESSES_ENV = "KT_WORKER_PROCESSES"
_threads_set = False

log = logging.getLogger(__name__)

RUN_STAGE = "kt.run_stage"
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
        autogroup_nice(nice)


def autogroup_nice(nice: int, path: str = "/proc/self/autogroup") -> bool:
    """Give this process's session (its Linux autogroup) niceness ``nice``, if the process leads it.

    Under autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled`` = 1, the default of
    most desktop and many server kernels) the CPU is shared between sessions first and a process's
    niceness only counts inside its session: a worker that ``kt serve`` starts in a session of its
    own would take an equal share beside the API whatever its niceness (measured: two workers took
    0.62 of the 2 cores during the mixed load at nice 19, 0.08 with their sessions at 19). Only a
    session leader changes its group, so a worker started inside someone's shell session never
    lowers the shell's other programs. Returns whether the group's niceness is now ``nice`` or more.
    """
    if os.getsid(0) != os.getpid():
        return False
    try:
        with open(path) as f:  # "/autogroup-123 nice 0"
            current = int(f.read().split()[-1])
        if current < nice:
            with open(path, "w") as f:
                f.write(str(nice))
        return True
    except (OSError, ValueError, IndexError) as e:
        log.info("worker: session niceness not set (%s); fine where autogroups are off", e)
        return False


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


def _link(job_id: str, stage: str, queue: str) -> Any:
    """The chain link that goes on with job ``job_id`` at ``stage`` on ``queue``."""
    return celery_app.signature(RUN_STAGE, args=(job_id, stage), queue=queue, immutable=True)


def _is_link(step: dict[str, Any], job_id: str, stage: str, queue: str) -> bool:
    options = step.get("options") or {}
    return (
        step.get("task") == RUN_STAGE
        and list(step.get("args") or []) == [job_id, stage]
        and options.get("queue") == queue
    )


def send_chain(
    job_id: str, links: list[tuple[str, str]], carried: list[dict[str, Any]] | None = None
) -> None:
    """Send the rest of job ``job_id``'s chain of stage tasks, ``links`` ((first stage, queue) each,
    ``worker.runner.chain_links``). When ``carried``, the chain the running link came with
    (``Task.request.chain``: reversed), already goes on with that stage on that queue, its next link
    is sent with the remainder (as Celery would have once this task returned; sent now, because this
    task goes on to other jobs); otherwise a new ``chain`` of ``kt.run_stage`` tasks."""
    stage, queue = links[0]
    publish = {"retry": True, "retry_policy": PUBLISH_RETRY_POLICY}
    if carried and _is_link(carried[-1], job_id, stage, queue):
        signature(carried[-1], app=celery_app).apply_async(chain=carried[:-1], **publish)
        return
    chain(*(_link(job_id, s, q) for s, q in links)).apply_async(**publish)


def _wake_tenant(session_factory: sessionmaker[Session], settings: Settings, job: Job, queue: str) -> None:
    """Job ``job`` no longer runs here (it ended, was handed to its next stage task, or requeued).
    If that took its tenant below its running cap, the tenant's jobs on other queues may have waited
    for this slot with no message left to start them (one handed off between stage tasks whose link
    found the tenant at its cap, say): each such queue gets a ``kt.run_job`` message (this task's
    own queue is served next by this worker itself)."""
    try:
        with session_factory() as session:
            own_cap = session.scalar(select(Tenant.max_running_jobs).where(Tenant.id == job.tenant_id))
            cap = quotas.limits_for(settings, own_cap, None, None).running_jobs
            if not cap or quotas.count_jobs(session, job.tenant_id, "running") + 1 < cap:
                return  # it was below its cap: nothing waited for this slot
            waiting = session.execute(
                select(Job.queue, Job.id).where(
                    Job.tenant_id == job.tenant_id,
                    Job.status == "queued",
                    Job.queue != queue,
                    Job.id != job.id,
                )
            ).all()
        for other, job_id in dict(waiting).items():
            enqueue_job(settings, job_id, other)
    except Exception:  # the database or broker is down: the next message on those queues starts them
        log.warning("job %s: its tenant's other queues were not woken", job.id, exc_info=True)


def _worker_name(request: Any) -> str:
    """This worker's Celery node name (``cpu-1@host``), recorded for each stage it runs."""
    return str(getattr(request, "hostname", None) or f"celery@{socket.gethostname()}")


def _run_claimed(
    session_factory: sessionmaker[Session],
    settings: Settings,
    job: Job,
    queue: str | None = None,
    worker: str | None = None,
    carried: list[dict[str, Any]] | None = None,
) -> str:
    """Run a claimed job, here up to its first stage on another queue than ``queue`` (then handed to
    its chain of stage tasks, ``send_chain``, ``carried``: the chain this task came with); an
    unexpected error on one of its first ``MAX_RETRIES`` attempts (since a manual retry) requeues
    it, not to start before ``backoff_s`` (10, 20, 40 s) has passed."""
    runner = _runner()
    attempt = liveness.attempts_since_retry(job)
    delay = backoff_s(max(0, attempt - 1))

    def dispatch(job_id: str, links: list[tuple[str, str]]) -> None:
        send_chain(job_id, links, carried)

    try:
        return runner.run_claimed(
            session_factory,
            job,
            settings,
            can_retry=attempt <= MAX_RETRIES,
            retry_delay_s=delay,
            serving=queue,
            dispatch=dispatch if queue is not None else None,
            worker_name=worker,
        )
    except runner.JobRetry as err:
        log.warning("job %s: %s; retry %d in %.0f s", job.id, err, attempt, delay)
        _wake_later(job, delay)
        return "queued"
    finally:
        _wake_tenant(session_factory, settings, job, queue or job.queue)


def _run_next_jobs(
    session_factory: sessionmaker[Session], settings: Settings, queue: str, worker: str
) -> list[str]:
    """Start the jobs ``worker.scheduler.claim_next`` picks on ``queue``, one after the other, until
    none is left that this worker may start (or the worker is stopping)."""
    outcomes: list[str] = []
    while not _shutting_down():
        job = scheduler.claim_next(session_factory, settings, queue)
        if job is None:
            break
        outcomes.append(f"{job.id}: {_run_claimed(session_factory, settings, job, queue, worker)}")
    return outcomes


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
    outcomes = _run_next_jobs(session_factory, settings, queue, _worker_name(self.request))
    return "; ".join(outcomes) or f"nothing to start on {queue!r} (job {job_id} was started already)"


@celery_app.task(name=RUN_STAGE, bind=True, acks_late=True, ignore_result=True)
def run_stage(self: Any, job_id: str, stage: str) -> str:
    """A link of job ``job_id``'s chain of stage tasks: go on with the job at ``stage`` if it waits
    for that stage on this message's queue (``worker.scheduler.claim_stage``), up to its next stage
    on another queue (where the rest of the chain this link came with goes on, ``send_chain``); then
    start the fair next jobs on this queue, as ``kt.run_job`` does. A job no longer waiting for this
    stage (canceled, failed, taken by another worker) ends the chain here: Celery sends nothing more.

    A stopping worker hands the message back (``Reject(requeue=True)``), its chain with it."""
    if _shutting_down():
        raise Reject("this worker is stopping; the message is left for the next one", requeue=True)
    # the rest of the chain goes on only from a hand-off (send_chain), never when this task returns
    carried = list(self.request.chain or [])
    self.request.chain = None
    _size_threads()
    session_factory, settings = SessionLocal(), get_settings()
    queue = _queue_of(self.request, session_factory, job_id)
    worker = _worker_name(self.request)
    job = scheduler.claim_stage(session_factory, settings, job_id, stage, queue)
    if job is None:
        outcomes = [f"{job_id}: not waiting for stage {stage} on {queue!r}; its chain ends here"]
    else:
        outcomes = [
            f"{job_id} from {stage}: {_run_claimed(session_factory, settings, job, queue, worker, carried)}"
        ]
    outcomes += _run_next_jobs(session_factory, settings, queue, worker)
    return "; ".join(outcomes)


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
