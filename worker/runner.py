"""Run one job: the glue between a ``jobs`` row and the kt_train pipeline stages, without Celery.

The row is the source of truth. ``run_job`` reloads it by id, runs the configured stages one by
one under ``<data_dir>/jobs/<job_id>/run`` (writing the current stage, progress and ETA to the row
as it goes), and leaves the row in a final status. Stages are resumable (``_SUCCESS`` per stage,
``last.ckpt`` inside training stages), so running the same job again after a crash continues
where the crashed run stopped; running a finished or canceled job again does nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from kt_train import pipeline
from kt_train.config import TrainConfig, parse_config
from kt_train.errors import ConfigError, KTError
from service.db.models import JOB_FINAL_STATUSES, Job, Model, utcnow
from service.settings import Settings

log = logging.getLogger(__name__)

# Job kinds this worker runs: each runs the stages of its config.
RUNNABLE_KINDS = ("pipeline", "curate")
# Weight, in training-step equivalents, of a stage that does not train (curate, export, evaluate):
# a share of the run's training steps, at least one step.
NON_TRAINING_WEIGHT = 0.02
MAX_ERROR_CHARS = 4000


class Cancelled(Exception):
    """The job's ``cancel_requested`` flag was seen set; the run stops between two steps."""


class JobRetry(Exception):
    """An unexpected (non-user) error on an attempt that may still be retried."""


def job_run_dir(settings: Settings, job_id: str) -> Path:
    """Where a job's stages write: ``<data_dir>/jobs/<job_id>/run``."""
    return Path(settings.data_dir) / "jobs" / job_id / "run"


def stage_weights(cfg: TrainConfig) -> dict[str, float]:
    """Each configured stage's share of the work, in training steps (see ``NON_TRAINING_WEIGHT``)."""
    ft = cfg.finetune_teacher
    steps = {
        "finetune_teacher": ft.linear_probe.steps + ft.full_finetune.steps,
        "distill": cfg.distill.steps,
        "finetune_student": cfg.finetune_student.steps,
    }
    total = sum(steps.get(s, 0) for s in cfg.stages)
    other = max(1.0, NON_TRAINING_WEIGHT * total)
    return {s: float(steps[s]) if s in steps else other for s in cfg.stages}


class JobReporter:
    """A kt_train ``Reporter`` that writes progress (0..1 over all stages, weighted by steps) and
    ETA to the job row, and raises ``Cancelled`` once the row asks for cancellation. Writes and
    cancel checks happen at most every ``interval_s`` seconds (and at every stage boundary)."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        job_id: str,
        weights: dict[str, float],
        interval_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.session_factory = session_factory
        self.job_id = job_id
        self.weights = weights
        self.total = sum(weights.values()) or 1.0
        self.interval_s = interval_s
        self.clock = clock
        self.stage: str | None = None
        self.done_before = 0.0  # weight of the finished stages
        self.stage_done = 0.0  # steps of the finished loops inside the current stage
        self.loop_total = 0
        self.loop_step = 0
        self.t0 = clock()
        self.p0: float | None = None  # progress when this attempt first reported
        self.last_write = float("-inf")

    # --- pipeline side
    def begin_stage(self, name: str) -> None:
        self.stage, self.stage_done, self.loop_total, self.loop_step = name, 0.0, 0, 0
        self.flush(stage=name)

    def end_stage(self, name: str) -> None:
        self.done_before += self.weights.get(name, 0.0)
        self.stage_done, self.loop_total, self.loop_step = 0.0, 0, 0

    def progress(self) -> float:
        within = 0.0
        if self.stage is not None:
            within = min(self.stage_done + self.loop_step, self.weights.get(self.stage, 0.0))
        return min(1.0, (self.done_before + within) / self.total)

    def eta_s(self, p: float) -> float | None:
        if self.p0 is None or p <= self.p0:
            return None
        rate = (p - self.p0) / max(self.clock() - self.t0, 1e-6)
        return round((1.0 - p) / rate, 1)

    def flush(self, *, stage: str | None = None, force: bool = True) -> None:
        """Write progress/ETA (and ``stage``) to the row; raise ``Cancelled`` if it asks for that."""
        now = self.clock()
        if not force and now - self.last_write < self.interval_s:
            return
        self.last_write = now
        p = self.progress()
        if self.p0 is None:
            self.p0, self.t0 = p, now
        with self.session_factory() as session:
            job = session.get(Job, self.job_id)
            if job is None:
                raise Cancelled("the job row was deleted")
            if job.cancel_requested:
                raise Cancelled("cancel requested")
            job.progress = round(p, 4)
            job.eta_s = self.eta_s(p)
            if stage is not None:
                job.stage = stage
            session.commit()

    # --- kt_train Reporter protocol
    def start(self, task: str, total: int) -> None:
        self.loop_total, self.loop_step = total, 0

    def update(self, task: str, step: int, metrics: dict[str, float]) -> None:
        self.loop_step = step
        self.flush(force=False)

    def finish(self, task: str) -> None:
        self.stage_done += self.loop_total
        self.loop_total, self.loop_step = 0, 0


def _set(session_factory: sessionmaker[Session], job_id: str, **values: Any) -> Job:
    with session_factory() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} does not exist")
        for k, v in values.items():
            setattr(job, k, v)
        session.commit()
        return job


def _finish(session_factory: sessionmaker[Session], job_id: str, status: str, **values: Any) -> str:
    _set(session_factory, job_id, status=status, eta_s=None, finished_at=utcnow(), **values)
    log.info("job %s %s", job_id, status)
    return status


def _message(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if not isinstance(err, KTError):
        text = f"{type(err).__name__}: {text}"
    return text[:MAX_ERROR_CHARS]


def _wire(name: str, res: dict[str, Any], inputs: dict[str, Any]) -> None:
    """Feed a stage's outputs to the next stages (as ``kt_train.pipeline.run_pipeline`` does)."""
    if name == "finetune_teacher":
        inputs["teacher"], inputs["classes"] = res["checkpoint"], res["classes"]
    elif name == "curate" and res.get("manifest"):
        inputs["transfer"] = res["manifest"]
    elif name in ("distill", "finetune_student"):
        inputs["student"], inputs["classes"] = res["checkpoint"], res["classes"]


def _build_config(job: Job, settings: Settings) -> TrainConfig:
    if job.kind not in RUNNABLE_KINDS:
        raise ConfigError(f"job kind {job.kind!r} is not run by this worker (it runs {RUNNABLE_KINDS})")
    raw = (job.params or {}).get("config")
    if not isinstance(raw, dict):
        raise ConfigError("job params must hold the training config as a mapping under 'config'")
    data = {**raw, "out_dir": str(job_run_dir(settings, job.id))}
    return parse_config(data, f"of job {job.id}")


def run_job(
    session_factory: sessionmaker[Session],
    job_id: str,
    settings: Settings,
    *,
    can_retry: bool = False,
    progress_interval_s: float = 2.0,
) -> str:
    """Run job ``job_id`` to a final status and return it.

    User errors (``KTError``) fail the job with their message. Any other error fails it too,
    unless ``can_retry``: then the row goes back to ``queued`` with the error noted and
    ``JobRetry`` is raised for the caller (Celery) to retry later.
    """
    with session_factory() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} does not exist")
        if job.status in JOB_FINAL_STATUSES:
            log.info("job %s is already %s; nothing to do", job_id, job.status)
            return job.status
        if job.cancel_requested:
            job.status, job.finished_at, job.eta_s = "canceled", utcnow(), None
            session.commit()
            return "canceled"
        job.status = "running"
        job.attempts = (job.attempts or 0) + 1
        job.started_at = job.started_at or utcnow()
        job.error = None
        session.commit()
        timings: dict[str, Any] = dict(job.stage_timings or {})

    try:
        cfg = _build_config(job, settings)
        reporter = JobReporter(session_factory, job_id, stage_weights(cfg), interval_s=progress_interval_s)
        out_root = Path(cfg.out_dir)
        out_root.mkdir(parents=True, exist_ok=True)
        inputs: dict[str, Any] = {}
        results: dict[str, dict[str, Any]] = {}
        for name in cfg.stages:
            reporter.begin_stage(name)
            t0 = time.perf_counter()
            res = pipeline.STAGE_FUNCS[name](cfg, dict(inputs), out_root / name, reporter)
            # a stage finished by an earlier attempt returns at once: keep the time it really took
            timings.setdefault(name, round(time.perf_counter() - t0, 2))
            results[name] = res
            _wire(name, res, inputs)
            reporter.end_stage(name)
            _set(session_factory, job_id, stage_timings=dict(timings))
        reporter.flush()  # a last cancel check, and progress 1.0
        metrics, model_files, card = _collect(results)
        with session_factory() as session:
            job = session.get(Job, job_id)
            assert job is not None
            if model_files:
                session.add(Model(tenant_id=job.tenant_id, job_id=job.id, card=card, files=model_files))
            job.status, job.progress, job.eta_s, job.finished_at = "succeeded", 1.0, None, utcnow()
            job.metrics, job.stage_timings = metrics, timings
            session.commit()
        log.info("job %s succeeded", job_id)
        return "succeeded"
    except Cancelled:
        return _finish(session_factory, job_id, "canceled")
    except KTError as err:
        return _finish(session_factory, job_id, "failed", error=_message(err))
    except Exception as err:
        log.exception("job %s: unexpected error", job_id)
        if can_retry:
            _set(
                session_factory, job_id, status="queued", eta_s=None, error=f"retrying after {_message(err)}"
            )
            raise JobRetry(_message(err)) from err
        return _finish(session_factory, job_id, "failed", error=_message(err))


def _collect(results: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """(job metrics, exported model files, model card) from the stage outputs."""
    metrics: dict[str, Any] = {}
    for name in ("finetune_teacher", "distill", "finetune_student"):
        if results.get(name, {}).get("metrics"):
            metrics[f"{name}_val"] = results[name]["metrics"]
    ev = results.get("evaluate", {})
    if ev.get("metrics"):
        metrics["test"] = json.loads(Path(ev["metrics"]).read_text())
        for k, v in ev.items():
            if k.endswith("_top1"):
                metrics[k] = v
    files = {k: str(v) for k, v in results.get("export", {}).items() if isinstance(v, str)}
    card: dict[str, Any] = {}
    if files.get("card") and Path(files["card"]).is_file():
        card = json.loads(Path(files["card"]).read_text())
    return metrics, files, card
