"""Run one job: the glue between a ``jobs`` row and kt_train, without Celery.

The row is the source of truth. ``run_job`` claims it by id (``claim``: a conditional update, so
two deliveries of one job never run it at once), then runs it (the Celery task instead asks the
fair scheduler, ``worker.scheduler.claim_next``, which job to start, and runs it with
``run_claimed``): a ``pipeline`` or ``curate`` job
runs the stages of its training config one by one under ``<data_dir>/jobs/<job_id>/run``; a
``build_gallery`` job builds a gallery under ``<data_dir>/galleries/<job_id>`` and registers it.
Meanwhile the current stage, progress, ETA and a heartbeat go to the row, and stage starts and
ends, progress and errors to ``<data_dir>/jobs/<job_id>/job.log``. The row ends in a final status.
Stages are resumable (``_SUCCESS`` per stage, ``last.ckpt`` inside training stages, finished
shards of a gallery), so running the same job again after a crash continues where the crashed
run stopped (temp files a killed attempt left behind are removed first); running a finished or
canceled job again does nothing. A full disk fails the job at once with a message naming the file
and ``KT_DATA_DIR`` (retrying can't help until space is freed; then ``POST /v1/jobs/{id}/retry``).

Per-stage queues (``KT_STAGE_QUEUES``, ``service.queue.stage_queue``): a Celery task runs a job's
stages while they belong to the queue it serves (``serving``); at the first stage that belongs to
another queue it hands the job off (``hand_off``): the row goes back to ``queued`` on that queue,
marked with the stage it goes on at (``worker.scheduler.HANDOFF``), and ``dispatch`` sends the chain
of stage tasks that carries the job on (``worker.tasks``). The worker that takes it there continues
the same attempt from the stages done on disk under the shared data dir. Without stage queues (the
default) no job is handed off: every stage runs on the worker that started the job, as before.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, update
from sqlalchemy.orm import Session, sessionmaker

from kt_train import pipeline
from kt_train.config import TrainConfig, parse_config
from kt_train.costs import measure_model_costs
from kt_train.errors import ConfigError, KTError, WeightsNotFoundError
from kt_train.gallery import DEFAULT_ENCODER, Gallery, build_gallery
from kt_train.io import SUCCESS, is_disk_full
from kt_train.progress import EMBED, Phase, ProgressTracker, format_duration, plan_phases, rate_text
from service.admin import register_gallery
from service.db.models import JOB_FINAL_STATUSES, Job, Model, utcnow
from service.queue import stage_queue
from service.settings import Settings
from worker.joblog import JobLog, job_log_path
from worker.liveness import Heartbeat, heartbeat_interval_s, stale, stop_requested
from worker.scheduler import HANDOFF, continues_at

log = logging.getLogger(__name__)

# Job kinds this worker runs: the first two run the stages of their training config.
RUNNABLE_KINDS = ("pipeline", "curate", "build_gallery")
MAX_ERROR_CHARS = 4000


class Cancelled(Exception):
    """The job's ``cancel_requested`` flag was seen set; the run stops between two steps."""


class ClaimLost(Exception):
    """This attempt no longer holds the job: its heartbeat went stale, the reaper requeued the job
    and maybe another worker took it. The attempt stops and leaves the row to its new holder."""


class JobRetry(Exception):
    """An unexpected (non-user) error on an attempt that may still be retried."""


# Sends the rest of a job's chain of stage tasks: (job id, [(first stage, queue), ...]), one link per
# run of consecutive stages on one queue (``worker.tasks.send_chain``); raises when the broker refuses.
Dispatch = Callable[[str, list[tuple[str, str]]], None]


class HandOff(Exception):
    """The next stage to run, ``stage``, belongs to another queue than the one this task serves:
    the job is handed to the chain's next link there (``links``: the rest of the chain)."""

    def __init__(self, stage: str, queue: str, links: list[tuple[str, str]]) -> None:
        super().__init__(f"stage {stage} runs on queue {queue!r}")
        self.stage, self.queue, self.links = stage, queue, links


def job_run_dir(settings: Settings, job_id: str) -> Path:
    """Where a job's stages write: ``<data_dir>/jobs/<job_id>/run``."""
    return Path(settings.data_dir) / "jobs" / job_id / "run"


def stage_weights(cfg: TrainConfig) -> dict[str, float]:
    """Each configured stage's share of the work (``kt_train.progress.plan_phases``: model passes
    over images, the teacher-output cache included in distill)."""
    weights = dict.fromkeys(pipeline.run_order(cfg.stages), 0.0)
    for phase in plan_phases(cfg):
        if phase.stage is not None:
            weights[phase.stage] = weights.get(phase.stage, 0.0) + phase.work
    return weights


def model_costs(cfg: TrainConfig) -> dict[str, float]:
    """Seconds per image of a teacher and a student pass on this worker (``kt_train.costs``), for
    the ETA; only for a run that trains both."""
    stages = set(pipeline.run_order(cfg.stages))
    if cfg.task != "classification":  # kt_train.costs measures classifiers' passes
        return {}
    if not stages & {"distill", "finetune_student"} or not stages & {"finetune_teacher", "curate"}:
        return {}
    return measure_model_costs(cfg)


class JobReporter:
    """A kt_train ``Reporter`` that writes progress (0..1 over the phases of all stages, weighted
    by their work), ETA and a heartbeat to the job row, and raises ``Cancelled`` once the row asks
    for cancellation. Writes and cancel checks happen at most every ``interval_s`` seconds (and at
    every stage boundary); progress lines go to the job log at most every ``log_interval_s`` seconds.

    Progress, weights and ETA are ``kt_train.progress.ProgressTracker``'s: ``phases`` is the plan
    (``plan_phases``); the teacher-output cache is a phase of its own; progress never goes down
    within the attempt nor below ``floor`` (the row's progress when this attempt began: a resumed
    job does not drop), and ``done_stages`` (finished by an earlier attempt) count as done from the
    first write on. The ETA comes from the measured rates of this attempt's phases; ``None`` until
    one was measured."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        job_id: str,
        phases: Sequence[Phase],
        interval_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        joblog: JobLog | None = None,
        log_interval_s: float = 30.0,
        attempt: int | None = None,
        *,
        floor: float = 0.0,
        done_stages: Sequence[str] = (),
        min_sample_s: float = 1.0,
    ):
        self.session_factory = session_factory
        self.attempt = attempt
        self.job_id = job_id
        self.tracker = ProgressTracker(phases, clock=clock, floor=floor, min_sample_s=min_sample_s)
        for stage in done_stages:
            self.tracker.mark_done(stage)
        self.interval_s = interval_s
        self.clock = clock
        self.joblog = joblog
        self.log_interval_s = log_interval_s
        self.stage: str | None = None
        self.last_write = float("-inf")
        self.last_log = float("-inf")

    # --- pipeline side
    def begin_stage(self, name: str, *, write: bool = True) -> None:
        """Stage ``name`` begins; ``write=False`` for one an earlier task finished (it returns at
        once): the row keeps showing the stage the job is really at."""
        self.stage = name
        self.tracker.begin_stage(name)
        if write:
            self.flush(stage=name)

    def end_stage(self, name: str, *, done: bool = False) -> None:
        """``name`` ended; ``done``: an earlier attempt had finished it (all its work is done)."""
        self.tracker.end_stage(name, done=done)

    def report_units(self, task: str, done: int, total: int, what: str = "") -> None:
        """Progress of a loop that reports (done, total) pairs (a gallery's embedding)."""
        current = self.tracker.current
        if current is None or current.name != task:
            self.tracker.start(task, total)
        elif total != current.units:
            self.tracker._replan(lambda: setattr(current, "units", float(total)))
        self.tracker.update(task, done)
        self._log_progress(what)
        self.flush(force=False)

    def progress(self) -> float:
        return self.tracker.progress()

    def eta_s(self) -> float | None:
        """Seconds left, from the measured rates (``ProgressTracker.eta_s``); 0 when done."""
        if self.tracker.progress() >= 1.0:
            return 0.0
        eta = self.tracker.eta_s()
        return None if eta is None else round(eta, 1)

    def flush(self, *, stage: str | None = None, force: bool = True) -> None:
        """Write progress/ETA (and ``stage``) to the row; raise ``Cancelled`` if it asks for that."""
        now = self.clock()
        if not force and now - self.last_write < self.interval_s:
            return
        self.last_write = now
        p = self.progress()
        with self.session_factory() as session:
            job = session.get(Job, self.job_id)
            if job is None:
                raise Cancelled("the job row was deleted")
            check_held(job, self.attempt)
            if job.cancel_requested:
                raise Cancelled("cancel requested")
            job.progress = round(p, 4)
            job.eta_s = self.eta_s()
            job.heartbeat_at = utcnow()
            if stage is not None:
                job.stage = stage
            session.commit()

    def _log_progress(self, what: str, *, force: bool = False) -> None:
        now = self.clock()
        if self.joblog is None or (not force and now - self.last_log < self.log_interval_s):
            return
        self.last_log = now
        p = self.progress()
        eta = self.eta_s()
        eta_text = f", eta {format_duration(eta)}" if eta is not None else ""
        what = f"{what} " if what else ""
        self.joblog.write(f"{self.stage}: {what}(job {100 * p:.0f}%{eta_text})")

    # --- kt_train Reporter protocol
    def start(self, task: str, total: int) -> None:
        phase = self.tracker.start(task, total)
        if self.joblog is not None:
            self.joblog.write(f"{self.stage}: {task} started, {total} {phase.unit}s")

    def update(self, task: str, step: int, metrics: dict[str, float]) -> None:
        phase = self.tracker.update(task, step)
        if self.joblog is not None and self.clock() - self.last_log >= self.log_interval_s:
            values = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, int | float))
            rate = self.tracker.phase_rate(phase)
            speed = ""
            if rate is not None:
                left = format_duration(self.tracker.phase_eta_s(phase))
                speed = f", {rate_text(phase, rate)}, {task} ETA {left}"
            self._log_progress(f"{task} {phase.unit} {step}/{phase.units:.0f} {values}".rstrip() + speed)
        # a worker told to stop handed the job back: notice it at this step, not the next interval
        self.flush(force=stop_requested())

    def finish(self, task: str) -> None:
        self.tracker.finish(task)
        if self.joblog is not None:
            self.joblog.write(f"{self.stage}: {task} finished")


def check_held(job: Job, attempt: int | None) -> None:
    """Raise ``ClaimLost`` unless ``job`` is still running as ``attempt`` (``None``: any)."""
    if job.status != "running" or (attempt is not None and job.attempts != attempt):
        raise ClaimLost(
            f"the job is now {job.status} as attempt {job.attempts}: it was handed on (taken for lost, "
            "or handed back by a worker told to stop)"
        )


def _set(session_factory: sessionmaker[Session], job_id: str, **values: Any) -> Job:
    with session_factory() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} does not exist")
        for k, v in values.items():
            setattr(job, k, v)
        session.commit()
        return job


def _finish(
    session_factory: sessionmaker[Session], job_id: str, status: str, joblog: JobLog, **values: Any
) -> str:
    _set(session_factory, job_id, status=status, eta_s=None, finished_at=utcnow(), **values)
    log.info("job %s %s", job_id, status)
    joblog.write(f"job {status}" + (f": {values['error']}" if values.get("error") else ""))
    return status


# kt_train's "weights not available" messages end by suggesting a local weights file after '@', which
# a job's spec may not name (422); on the server the way is a registered model
_LOCAL_FILE_HINT = re.compile(
    r",? or (?:pass a local file|download its model\.safetensors and pass):? \S+@\S+\s*$"
)
REGISTER_HINT = (
    "; or have the operator register a weights file (`kt admin register-model NAME weights.safetensors`) "
    "and name it timm:<arch>@registered:NAME (`kt registered-models list` lists those you may use)"
)


def _message(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if not isinstance(err, KTError):
        text = f"{type(err).__name__}: {text}"
    elif isinstance(err, WeightsNotFoundError) and _LOCAL_FILE_HINT.search(text):
        text = _LOCAL_FILE_HINT.sub("", text) + REGISTER_HINT
    return text[:MAX_ERROR_CHARS]


def disk_full_message(
    err: BaseException, settings: Settings, job_id: str, where: dict[str, Any]
) -> str | None:
    """The job's error for a full disk (``None`` when ``err`` is something else): the file being
    written (or the stage's directory when the library did not say), where to free space, and how
    to run the job again."""
    if not is_disk_full(err):
        return None
    target = None
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen and target is None:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.filename:
            target = str(cur.filename)
        cur = cur.__cause__ or cur.__context__
    if target is None:
        stage, directory = where.get("stage"), where.get("dir")
        target = f"the {stage} stage's files in {directory}" if stage else "the job's files"
    return (
        f"no space left on device while writing {target}; free space in KT_DATA_DIR ({settings.data_dir}), "
        f"then retry the job (POST /v1/jobs/{job_id}/retry). Nothing partial was kept: files are "
        "written to a temp name and renamed into place only when complete."
    )[:MAX_ERROR_CHARS]


def remove_stale_temp_files(root: Path, older_than_s: float) -> list[Path]:
    """Delete the temp files of atomic writes (``.<name>.<random>.tmp[.<suffix>]``) under ``root``
    that were not touched for ``older_than_s``: what an attempt killed mid-write left behind. The
    age guard spares a write still in flight (an attempt taken for lost that has not noticed yet)."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    cutoff = time.time() - older_than_s
    for path in root.rglob(".*"):
        name = path.name
        if not (name.endswith(".tmp") or ".tmp." in name):
            continue
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            continue
    return removed


def _wire(name: str, res: dict[str, Any], inputs: dict[str, Any]) -> None:
    """Feed a stage's outputs to the next stages (as ``kt_train.pipeline.run_pipeline`` does)."""
    pipeline.wire_outputs(name, res, inputs)


def _raw_config(job: Job) -> dict[str, Any]:
    if job.kind not in RUNNABLE_KINDS:
        raise ConfigError(f"job kind {job.kind!r} is not run by this worker (it runs {RUNNABLE_KINDS})")
    raw = (job.params or {}).get("config")
    if not isinstance(raw, dict):
        raise ConfigError("job params must hold the job's config as a mapping under 'config'")
    return raw


def tenant_cache_dir(settings: Settings, tenant_id: str) -> Path:
    """The tenant's content-addressed caches, shared by its jobs and by no other tenant's:
    ``<data_dir>/tenants/<tenant_id>/cache`` (``kt_train.cache_store``)."""
    return Path(settings.data_dir) / "tenants" / tenant_id / "cache"


def stage_queues(cfg: TrainConfig, settings: Settings, stages: Sequence[str]) -> list[tuple[str, str | None]]:
    """(stage, the queue it runs on) for ``stages`` (``service.queue.stage_queue``); ``None``: where
    the job is (no stage queues, a job that names its device, or a stage with nothing to do: curate
    without a gallery)."""
    out: list[tuple[str, str | None]] = []
    for name in stages:
        idle = name == "curate" and cfg.curate.gallery is None
        out.append((name, None if idle else stage_queue(name, cfg.device, settings)))
    return out


def chain_links(routes: list[tuple[str, str | None]], here: str) -> list[tuple[str, str]]:
    """The links of a chain of stage tasks for ``routes`` (``stage_queues``): (first stage, queue)
    for each run of consecutive stages on one queue; a stage routed nowhere joins the run before it
    (or ``here``, the queue the job is on, for the first)."""
    links: list[tuple[str, str]] = []
    current = here
    for name, queue in routes:
        queue = queue or current
        if not links or queue != current:
            links.append((name, queue))
        current = queue
    return links


def _build_config(job: Job, settings: Settings) -> TrainConfig:
    data = {**_raw_config(job), "out_dir": str(job_run_dir(settings, job.id))}
    # the teacher-output cache lives in the tenant's store, whatever the config said: a second job
    # with the same teacher and transfer set reuses it; another tenant's jobs never see it (each
    # store capped at KT_MAX_CACHE_BYTES_PER_TENANT)
    distill = dict(data.get("distill") or {})
    distill["cache"] = {
        **(distill.get("cache") or {}),
        "dir": str(tenant_cache_dir(settings, job.tenant_id) / "teacher_outputs"),
        "max_bytes": settings.max_cache_bytes_per_tenant,
    }
    data["distill"] = distill
    # so do the embeddings of the curate stage's query views and gallery-candidate crops
    data["curate"] = {
        **(data.get("curate") or {}),
        "cache_dir": str(tenant_cache_dir(settings, job.tenant_id) / "embeddings"),
        "cache_max_bytes": settings.max_cache_bytes_per_tenant,
    }
    return parse_config(data, f"of job {job.id}")


def claim(session_factory: sessionmaker[Session], job_id: str, settings: Settings) -> tuple[Job | None, str]:
    """Take job ``job_id`` for this worker: ``(job, "running")`` with the row now ``running``, its
    attempt counted and its heartbeat fresh. Otherwise ``(None, status)``: the job is finished,
    was canceled before it started (``"canceled"``, set here), or another worker holds it (a
    ``running`` row with a fresh heartbeat: a duplicate delivery must not run it twice)."""
    now = utcnow()
    free = or_(
        Job.status == "queued",
        and_(Job.status == "running", stale(now - timedelta(seconds=settings.job_heartbeat_timeout_s))),
    )
    with session_factory() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} does not exist")
        if job.status in JOB_FINAL_STATUSES:
            return None, job.status
        if job.cancel_requested:
            values: dict[str, Any] = {"status": "canceled", "finished_at": now, "eta_s": None}
        else:
            values = {
                "status": "running",
                "attempts": Job.attempts + 1,
                "started_at": job.started_at or now,
                "heartbeat_at": now,
                "error": None,
            }
        taken = session.execute(update(Job).where(Job.id == job_id, free).values(**values))
        session.commit()
        session.refresh(job)
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            return None, job.status
        if job.status == "canceled":
            return None, "canceled"
        return job, "running"


def run_job(
    session_factory: sessionmaker[Session],
    job_id: str,
    settings: Settings,
    *,
    can_retry: bool = False,
    progress_interval_s: float = 2.0,
    log_interval_s: float = 30.0,
) -> str:
    """Run job ``job_id`` to a final status and return it (or ``"running"`` when another worker
    holds it). A heartbeat thread runs meanwhile (see ``worker.liveness``) and every step goes to
    the job log (``worker.joblog``).

    User errors (``KTError``) fail the job with their message. Any other error fails it too,
    unless ``can_retry``: then the row goes back to ``queued`` with the error noted and
    ``JobRetry`` is raised for the caller (Celery) to retry later.
    """
    joblog = JobLog(job_log_path(settings, job_id))
    job, status = claim(session_factory, job_id, settings)
    if job is None:
        if status == "canceled":
            joblog.write("job canceled before it started")
        elif status == "running":
            log.info("job %s is held by another worker (fresh heartbeat); not running it twice", job_id)
        else:
            log.info("job %s is already %s; nothing to do", job_id, status)
        return status
    return run_claimed(
        session_factory,
        job,
        settings,
        can_retry=can_retry,
        progress_interval_s=progress_interval_s,
        log_interval_s=log_interval_s,
    )


def run_claimed(
    session_factory: sessionmaker[Session],
    job: Job,
    settings: Settings,
    *,
    can_retry: bool = False,
    retry_delay_s: float = 0.0,
    progress_interval_s: float = 2.0,
    log_interval_s: float = 30.0,
    serving: str | None = None,
    dispatch: Dispatch | None = None,
    worker_name: str | None = None,
) -> str:
    """Run ``job``, which this worker has just claimed (``claim``, or the fair scheduler's
    ``worker.scheduler.claim_next``), to a final status; see ``run_job``. An unexpected error on
    an attempt that ``can_retry`` requeues the job not to be started before ``retry_delay_s``
    from now (``jobs.run_after``: the backoff lives in the row, so no worker takes it early).

    ``serving``, ``dispatch``: the queue this Celery task serves and how to send the chain of stage
    tasks; a pipeline job is run here up to its first stage on another queue, then handed off
    (``hand_off``; returns ``"queued"``). Without them every stage runs here. ``worker_name`` (the
    Celery node name; default the host name) is recorded per stage (``stage_timings["workers"]``)."""
    job_id = job.id
    joblog = JobLog(job_log_path(settings, job_id))
    worker_name = worker_name or socket.gethostname()
    goes_on = continues_at(job)
    if goes_on is not None:
        joblog.write(
            f"attempt {job.attempts} goes on at stage {goes_on} on {worker_name} (queue {job.queue})"
        )
    else:
        joblog.write(f"attempt {job.attempts} of {job.kind} job started on {worker_name} (queue {job.queue})")
    if serving is None or dispatch is None:
        serving = dispatch = None
    where: dict[str, Any] = {}  # the stage running now and its directory (for error messages)
    try:
        # the heartbeat first: it also tells this worker's row (and so a supervisor) which job it holds
        beat = Heartbeat(session_factory, job_id, heartbeat_interval_s(settings), attempt=job.attempts)
        with beat, joblog.capture():
            if job.attempts > 1 and goes_on is None:
                stale_temps = remove_stale_temp_files(
                    job_run_dir(settings, job_id), heartbeat_interval_s(settings)
                )
                if stale_temps:
                    joblog.write(
                        f"removed {len(stale_temps)} temp file(s) an earlier attempt left unfinished"
                    )
            if job.kind == "build_gallery":
                where.update(stage="build_gallery", dir=gallery_dir(settings, job_id))
                _run_build_gallery(
                    session_factory, job, settings, joblog, progress_interval_s, log_interval_s
                )
            else:
                _run_stages(
                    session_factory,
                    job,
                    settings,
                    joblog,
                    progress_interval_s,
                    log_interval_s,
                    where,
                    serving=serving,
                    worker_name=worker_name,
                )
        log.info("job %s succeeded", job_id)
        joblog.write("job succeeded")
        return "succeeded"
    except HandOff as hop:
        assert dispatch is not None  # only a task that can send the chain hands off
        return hand_off(session_factory, job, hop, joblog, dispatch)
    except ClaimLost as err:
        log.warning("job %s: attempt %d stops: %s", job_id, job.attempts, err)
        joblog.write(f"attempt {job.attempts} stopped: {err}")
        with session_factory() as session:
            row = session.get(Job, job_id)
            return row.status if row is not None else "canceled"
    except Cancelled:
        return _finish(session_factory, job_id, "canceled", joblog)
    except KTError as err:
        message = disk_full_message(err, settings, job_id, where) or _message(err)
        return _finish(session_factory, job_id, "failed", joblog, error=message)
    except Exception as err:
        if full := disk_full_message(err, settings, job_id, where):
            log.error("job %s: %s", job_id, full)
            joblog.write(f"disk full on attempt {job.attempts}:\n{traceback.format_exc()}")
            return _finish(session_factory, job_id, "failed", joblog, error=full)
        log.exception("job %s: unexpected error", job_id)
        joblog.write(f"unexpected error on attempt {job.attempts}:\n{traceback.format_exc()}")
        if can_retry:
            run_after = utcnow() + timedelta(seconds=retry_delay_s) if retry_delay_s > 0 else None
            _set(
                session_factory,
                job_id,
                status="queued",
                eta_s=None,
                run_after=run_after,
                error=f"retrying after {_message(err)}",
            )
            joblog.write("job requeued: it will be retried")
            raise JobRetry(_message(err)) from err
        return _finish(session_factory, job_id, "failed", joblog, error=_message(err))


def _run_stages(
    session_factory: sessionmaker[Session],
    job: Job,
    settings: Settings,
    joblog: JobLog,
    progress_interval_s: float,
    log_interval_s: float,
    where: dict[str, Any] | None = None,
    *,
    serving: str | None = None,
    worker_name: str | None = None,
) -> None:
    """A ``pipeline`` or ``curate`` job: the stages of its training config, one after the other
    (``pipeline.run_order``: evaluate before export). An export format that fails its check leaves
    the job succeeded with a warning (``metrics.warnings``; the card's ``failed_formats``): the
    model is registered with the formats that passed.

    With ``serving`` (the queue of the Celery task running it), the first stage still to run that
    belongs to another queue raises ``HandOff`` at that stage's boundary, after a last cancel check.
    Stages an earlier task or attempt finished return their recorded outputs at once (``_SUCCESS``),
    which feed the stages run here."""
    job_id = job.id
    timings: dict[str, Any] = dict(job.stage_timings or {})
    workers: dict[str, str] = dict(timings.get("workers") or {})
    cfg = _build_config(job, settings)
    out_root = Path(cfg.out_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    order = pipeline.run_order(cfg.stages)
    routes = dict(stage_queues(cfg, settings, order)) if serving is not None else {}
    earlier = "attempt" if continues_at(job) is None else "stage task"
    for name in order:  # the next stage belongs elsewhere: hand off before loading or timing models
        queue = routes.get(name)
        if queue is None or (out_root / name / SUCCESS).is_file():
            continue
        if queue != serving:
            raise HandOff(
                name, queue, chain_links(stage_queues(cfg, settings, order[order.index(name) :]), queue)
            )
        break
    reporter = JobReporter(
        session_factory,
        job_id,
        plan_phases(cfg, model_costs=model_costs(cfg)),
        interval_s=progress_interval_s,
        joblog=joblog,
        log_interval_s=log_interval_s,
        attempt=job.attempts,
        # a resumed job: where the earlier attempt got to, and the stages it finished
        floor=float(job.progress or 0.0),
        done_stages=[name for name in order if (out_root / name / SUCCESS).is_file()],
    )
    inputs: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    funcs = pipeline.stage_funcs(cfg)  # the task's stages (kt_train.tasks for segmentation)
    pipeline.seed_run(cfg)  # as `kt train`: the models' init depends on the config, not on earlier jobs
    for name in order:
        resumed = (out_root / name / SUCCESS).is_file()
        queue = routes.get(name)
        if not resumed and serving is not None and queue is not None and queue != serving:
            reporter.flush()  # a cancel asked for meanwhile ends the job here, at the stage boundary
            rest = order[order.index(name) :]
            raise HandOff(name, queue, chain_links(stage_queues(cfg, settings, rest), queue))
        if where is not None:
            where.update(stage=name, dir=out_root / name)
        started = f"started on {worker_name}" + (f" (queue {serving})" if serving else "")
        joblog.write(
            f"stage {name}: " + (f"done by an earlier {earlier}, reusing it" if resumed else started)
        )
        reporter.begin_stage(name, write=not resumed)
        t0 = time.perf_counter()
        res = funcs[name](cfg, dict(inputs), out_root / name, reporter)
        # a stage finished by an earlier attempt returns at once: keep the time it really took
        timings.setdefault(name, round(time.perf_counter() - t0, 2))
        if isinstance(res.get("teacher_cache"), dict) and "built" in res["teacher_cache"]:  # the store
            timings.setdefault("teacher_cache", _cache_timing(res["teacher_cache"]))
        results[name] = res
        _wire(name, res, inputs)
        reporter.end_stage(name, done=resumed)
        if not resumed:
            joblog.write(f"stage {name}: finished in {timings[name]:.1f} s")
            if worker_name is not None:  # the first to finish it (curate without a gallery reruns)
                workers.setdefault(name, worker_name)
                timings["workers"] = dict(workers)
        for warning in _warnings(name, res):
            joblog.write(f"warning: {warning}")
        _set(session_factory, job_id, stage_timings=dict(timings))
    reporter.flush()  # a last cancel check, and progress 1.0
    metrics, model_files, card = _collect(results)
    with session_factory() as session:
        row = session.get(Job, job_id)
        assert row is not None
        check_held(row, job.attempts)
        if model_files:
            session.add(Model(tenant_id=row.tenant_id, job_id=row.id, card=card, files=model_files))
        row.status, row.progress, row.eta_s, row.finished_at = "succeeded", 1.0, None, utcnow()
        row.metrics, row.stage_timings = metrics, timings
        session.commit()


def hand_off(
    session_factory: sessionmaker[Session], job: Job, hop: HandOff, joblog: JobLog, dispatch: Dispatch
) -> str:
    """Hand attempt ``job.attempts`` on to the chain's next link: the row ``queued`` on ``hop.queue``
    at stage ``hop.stage``, marked as handed off (``worker.scheduler.HANDOFF``: the reaper looks at
    running jobs only, and whoever takes it goes on with the same attempt), then the chain sent.
    Returns the job's status: ``"queued"``; ``"canceled"`` when a cancel came first; the row's
    status when this attempt no longer held it. If the broker refuses the chain, the row goes back
    to ``running`` on ``hop.queue`` with its heartbeat left to go stale, so that the reaper requeues
    it there (as ``service.workers.release_job`` does)."""
    with session_factory() as session:
        row = session.get(Job, job.id)
        if row is None:
            return "canceled"
        if row.status != "running" or row.attempts != job.attempts:
            return row.status
        if row.cancel_requested:
            session.rollback()
            return _finish(session_factory, job.id, "canceled", joblog)
        params = dict(row.params or {})
        before = dict(params)
        params[HANDOFF] = {
            "stage": hop.stage,
            "queue": hop.queue,
            "attempt": job.attempts,
            "retries": int(params.get("retries") or 0),
            "at": utcnow().isoformat(),
            "state": "queued",
        }
        held = [Job.id == job.id, Job.status == "running", Job.attempts == job.attempts]
        done = session.execute(
            update(Job)
            .where(*held, Job.cancel_requested.is_(False))
            .values(status="queued", queue=hop.queue, stage=hop.stage, eta_s=None, error=None, params=params)
        )
        session.commit()
    if done.rowcount != 1:  # type: ignore[attr-defined]
        with session_factory() as session:
            row = session.get(Job, job.id)
            held_here = row is not None and row.status == "running" and row.attempts == job.attempts
            if row is not None and held_here and row.cancel_requested:
                return _finish(session_factory, job.id, "canceled", joblog)
            return row.status if row is not None else "canceled"
    links = ", ".join(f"{stage} on {queue}" for stage, queue in hop.links)
    joblog.write(f"stage {hop.stage}: queued on '{hop.queue}' for the chain's next stage task ({links})")
    try:
        dispatch(job.id, hop.links)
    except Exception as err:
        log.error("job %s: could not send its chain (%s); the reaper requeues it", job.id, err)
        joblog.write(
            f"stage {hop.stage}: the chain could not be sent ({err}); the reaper will requeue the job"
        )
        with session_factory() as session:
            session.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == "queued")
                .values(status="running", params=before)
            )
            session.commit()
        return "running"
    return "queued"


def _cache_timing(info: dict[str, Any]) -> dict[str, Any]:
    """The stage timings' ``teacher_cache`` entry: the seconds this job spent building the cache
    (0 when it reused one from the tenant's store) and whether it built it."""
    out = {"seconds": info.get("build_seconds", 0.0), "built": bool(info.get("built"))}
    if "key" in info:
        out["key"] = info["key"]
    if "reused_build_seconds" in info:
        out["saved_seconds"] = info["reused_build_seconds"]
    return out


def gallery_dir(settings: Settings, job_id: str) -> Path:
    """Where a ``build_gallery`` job builds its gallery: ``<data_dir>/galleries/<job_id>`` (a retry
    of the job resumes the same directory)."""
    return Path(settings.data_dir) / "galleries" / job_id


def _run_build_gallery(
    session_factory: sessionmaker[Session],
    job: Job,
    settings: Settings,
    joblog: JobLog,
    progress_interval_s: float,
    log_interval_s: float,
) -> None:
    """A ``build_gallery`` job: ``kt_train.gallery.build_gallery``, then the ``galleries`` row."""
    raw = _raw_config(job)
    name, sources = raw.get("name"), raw.get("sources")
    if not isinstance(name, str) or not name or not isinstance(sources, list) or not sources:
        raise ConfigError("a build_gallery job needs 'name' and a non-empty list of 'sources' in its config")
    stage = "build_gallery"
    reporter = JobReporter(
        session_factory,
        job.id,
        [Phase(EMBED, 1, unit="image", group=EMBED, stage=stage)],  # sized by the first report
        interval_s=progress_interval_s,
        joblog=joblog,
        log_interval_s=log_interval_s,
        attempt=job.attempts,
        floor=float(job.progress or 0.0),
    )
    out = gallery_dir(settings, job.id)
    device = raw.get("device")
    joblog.write(f"stage {stage}: embedding {len(sources)} source(s) with {raw.get('encoder')} into {out}")
    reporter.begin_stage(stage)
    t0 = time.perf_counter()

    def progress(done: int, total: int, images_per_s: float) -> None:
        reporter.report_units(EMBED, done, total, f"{done}/{total} images, {images_per_s:.1f}/s")

    options: dict[str, Any] = {
        "encoder": str(raw.get("encoder") or DEFAULT_ENCODER),
        "image_size": raw.get("image_size"),
        "name": name,
        "batch_size": int(raw.get("batch_size") or 128),
        "shard_size": int(raw.get("shard_size") or 50_000),
        "index_kind": str(raw.get("index_kind") or "auto"),
        "device": None if device in (None, "auto") else str(device),
    }
    if raw.get("distributed"):
        gallery = _build_distributed(job, [str(s) for s in sources], out, options, reporter, joblog, settings)
    else:
        gallery = build_gallery([str(s) for s in sources], out, progress=progress, **options)
    reporter.end_stage(stage)
    reporter.flush()  # a last cancel check before the gallery becomes visible
    seconds = round(time.perf_counter() - t0, 2)
    joblog.write(f"stage {stage}: {gallery.count} images, {gallery.dim}-d, finished in {seconds:.1f} s")
    with session_factory() as session:
        held = session.get(Job, job.id)
        assert held is not None
        check_held(held, job.attempts)
        row = register_gallery(session, out, name)
        metrics = {
            "gallery_id": row.id,
            "name": row.name,
            "size": row.size,
            "dim": row.dim,
            "encoder": row.encoder,
            "index_kind": row.index_kind,
            "skipped_images": int(gallery.doc.get("num_skipped") or 0),
            **{k: v for k, v in (gallery.doc.get("build") or {}).items() if k in ("images_per_s", "device")},
        }
        job_row = session.get(Job, job.id)
        assert job_row is not None
        job_row.status, job_row.progress, job_row.eta_s = "succeeded", 1.0, None
        job_row.finished_at, job_row.metrics, job_row.stage_timings = utcnow(), metrics, {stage: seconds}
        session.commit()
    joblog.write(f"gallery {row.name!r} registered as {row.id}")


DISTRIBUTED_POLL_S = 1.0


def _build_distributed(
    job: Job,
    sources: list[str],
    out: Path,
    options: dict[str, Any],
    reporter: JobReporter,
    joblog: JobLog,
    settings: Settings,
) -> Gallery:
    """A ``distributed`` gallery build: plan it here, send the Celery canvas of
    ``worker.gallery_tasks`` (train the quantizer, one task per shard, merge) to the job's queue,
    and hold the job (heartbeat, progress = shards done / total, cancel) until the canvas has marked
    the gallery complete. A retried job plans the same build again and sends the canvas again: its
    finished steps are kept (every step is idempotent). A step whose worker died (no beat for
    ``KT_WORKER_HEARTBEAT_TIMEOUT_S``) is sent back to its queue (``gallery_tasks.Watch``) and noted
    in the job log. Needs a free worker slot besides this one."""
    from kt_train import gallery_shards
    from worker import gallery_tasks

    device = options.pop("device")
    info = gallery_shards.plan_distributed_build(sources, out, device=device, **options)
    if not info["complete"]:
        result = gallery_tasks.dispatch(str(out), info["shards"], queue=job.queue, device=device)
        joblog.write(
            f"distributed build: {info['listed']} images in {info['shards']} shard task(s) on queue "
            f"{job.queue}, index {info['index']}"
        )
        watch = gallery_tasks.Watch(result, settings.worker_heartbeat_timeout_s)
        try:
            while not ((out / SUCCESS).is_file() and gallery_shards.shards_done(out)[0] == info["shards"]):
                done, total = gallery_shards.shards_done(out)
                reporter.report_units(EMBED, done, max(total, 1), f"{done}/{total} shards")
                why, sent_back = watch.poll()  # a step whose worker died goes back to its queue
                for line in sent_back:
                    joblog.write(f"distributed build: {line}")
                if why is not None:
                    raise ConfigError(f"distributed gallery build: {why}")
                time.sleep(DISTRIBUTED_POLL_S)
        except Cancelled:
            gallery_tasks.revoke(result)
            raise
        n = info["shards"]
        reporter.report_units(EMBED, n, max(n, 1), f"{n}/{n} shards, merged on disk")
    return Gallery.open(out)


def _warnings(name: str, res: dict[str, Any]) -> list[str]:
    """What a finished stage did not do although asked: an export format that failed its check."""
    if name != "export":
        return []
    return [
        f"export format {fmt} was left out: {reason}; the model keeps the formats that passed "
        f"({', '.join(_exported_files(res))})"
        for fmt, reason in (res.get("failed_formats") or {}).items()
    ]


def _exported_files(export: dict[str, Any]) -> dict[str, str]:
    """Format -> path of an export stage's outputs: a path per format (classification), or the
    card's ``files`` relative to it (segmentation: ``kt_train.tasks.segmentation_stages.export``)."""
    if isinstance(export.get("files"), dict) and export.get("card"):
        where = Path(export["card"]).parent
        return {fmt: str(where / rel) for fmt, rel in export["files"].items() if fmt != "checkpoint" and rel}
    return {k: str(export[k]) for k in pipeline.exported_formats(export) if export.get(k)}


def _collect(results: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """(job metrics, exported model files, model card) from the stage outputs."""
    metrics: dict[str, Any] = {}
    for name in ("finetune_teacher", "distill", "finetune_student"):
        if results.get(name, {}).get("metrics"):
            metrics[f"{name}_val"] = results[name]["metrics"]
    ev = results.get("evaluate", {})
    if isinstance(ev.get("metrics"), dict):  # segmentation: the metrics themselves (mIoU, per class)
        for k, v in ev["metrics"].items():
            metrics[k] = {m: x for m, x in v.items() if m != "confusion"} if isinstance(v, dict) else v
    elif ev.get("metrics"):
        metrics["test"] = json.loads(Path(ev["metrics"]).read_text())
        for k, v in ev.items():
            if k.endswith("_top1"):
                metrics[k] = v
    export = results.get("export", {})
    warnings = [w for name, res in results.items() for w in _warnings(name, res)]
    if warnings:
        metrics["warnings"] = warnings
    files = {**_exported_files(export), **({"card": str(export["card"])} if export.get("card") else {})}
    card: dict[str, Any] = {}
    if files.get("card") and Path(files["card"]).is_file():
        card = json.loads(Path(files["card"]).read_text())
    return metrics, files, card
