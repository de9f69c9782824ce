"""``/v1/jobs``: train a model for a dataset (202 + a queued job), follow it, cancel it, retry it,
read its log.

The service builds the worker's full training config from the validated request (real paths to
the tenant's datasets and the gallery), commits the job row, then enqueues ``kt.run_job``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from kt_train.config import parse_config
from kt_train.errors import ConfigError
from kt_train.recipe import merge, recipe
from service import quotas, registry, storage, webhooks
from service.api.deps import CurrentTenant, ReadSessionDep, SessionDep, SettingsDep, read_session_factory
from service.api.errors import Conflict, Invalid, NotFound, Unavailable
from service.api.routes.datasets import referenced_dataset_ids
from service.db.models import (
    JOB_FINAL_STATUSES,
    JOB_STATUSES,
    Dataset,
    Gallery,
    Job,
    Model,
    Tenant,
    TransferSet,
    new_id,
    utcnow,
)
from service.queue import enqueue_job, queue_for
from service.redact import Redactor, redactor_for
from service.schemas import MAX_OFFSET, JobCreate, JobPublic, JobsPublic
from service.settings import Settings

router = APIRouter(prefix="/jobs", tags=["jobs"])

# ``jobs.params`` key noting the attempts made before a retry (``worker.liveness.ATTEMPTS_BEFORE_RETRY``;
# not imported from there, so that the API does not depend on the worker package).
ATTEMPTS_BEFORE_RETRY = "attempts_before_retry"
RETRYABLE_STATUSES = ("failed", "canceled")

# Stages of a training job, in order (``evaluate`` only with a test dataset).
PIPELINE_STAGES = ("finetune_teacher", "curate", "distill", "finetune_student", "export", "evaluate")
MAX_LOG_BYTES = 1_000_000


def job_dir(settings: Settings, job_id: str) -> Path:
    """``<data_dir>/jobs/<job_id>``: the worker's run directory and log live here."""
    return Path(settings.data_dir) / "jobs" / job_id


def owned_dataset(session: Session, tenant: Tenant, dataset_id: str, what: str = "Dataset") -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant.id:
        raise NotFound(f"{what} {dataset_id!r} not found; `GET /v1/datasets` lists your datasets.")
    if dataset.status != "ready":
        raise Conflict(
            f"{what} {dataset_id!r} is {dataset.status}, not ready; wait for it or upload it again."
        )
    return dataset


def hold_datasets(session: Session, tenant: Tenant, dataset_ids: Iterable[str]) -> None:
    """Lock the datasets a job is about to read, in the transaction that then writes the job, so
    that checking they exist and committing the job are one step for a concurrent
    ``DELETE /v1/datasets/{id}`` (which deletes the row first and then looks for jobs reading it):
    either the delete waits for this commit and then sees the job (409 there), or it deleted first
    and this answers 409. PostgreSQL: ``SELECT ... FOR SHARE`` (jobs on one dataset don't wait for
    each other; the delete does). SQLite has no row locks: a no-op ``UPDATE`` takes the database's
    write lock, held until the commit."""
    ids = sorted(set(dataset_ids))
    if not ids:
        return
    where = (Dataset.id.in_(ids), Dataset.tenant_id == tenant.id, Dataset.status == "ready")
    if session.get_bind().dialect.name == "sqlite":
        session.execute(
            update(Dataset).where(*where).values(status=Dataset.status),
            execution_options={"synchronize_session": False},
        )
        held = set(session.scalars(select(Dataset.id).where(*where)))
    else:
        held = set(session.scalars(select(Dataset.id).where(*where).with_for_update(read=True)))
    gone = [i for i in ids if i not in held]
    if gone:
        session.rollback()
        raise Conflict(
            f"Dataset {gone[0]!r} was deleted (or is no longer ready), so nothing was queued; "
            "`GET /v1/datasets` lists your datasets: upload it again and submit a new request."
        )


def refuse_if_inputs_gone(session: Session, tenant: Tenant, request: dict[str, Any]) -> None:
    """409 when a retried job's transfer set or gallery is gone (deleted, or a dataset's delete
    took it along): run again, it would only fail on the missing files. Its datasets are checked
    (and held) by ``hold_datasets``."""
    ts_id, gallery_id = request.get("transfer_set_id"), request.get("gallery_id")
    if isinstance(ts_id, str):
        ts = session.get(TransferSet, ts_id)
        if (
            ts is None
            or ts.tenant_id != tenant.id
            or not ts.manifest_path
            or not Path(ts.manifest_path).is_file()
        ):
            session.rollback()
            raise Conflict(
                f"Transfer set {ts_id!r} was deleted, so the job can't run again and was not queued; "
                "curate a new one (`POST /v1/transfer-sets`) and submit a new job (`POST /v1/jobs`)."
            )
    if isinstance(gallery_id, str):
        gallery = session.get(Gallery, gallery_id)
        if gallery is None or not Path(gallery.path).is_dir():
            session.rollback()
            raise Conflict(
                f"Gallery {gallery_id!r} was deleted, so the job can't run again and was not queued; "
                "`GET /v1/galleries` lists the galleries: submit a new request with one of them."
            )


def dataset_images(settings: Settings, dataset: Dataset) -> str:
    return str(storage.dataset_dir(settings.data_dir, dataset.tenant_id, dataset.id) / "images")


def get_gallery(session: Session, gallery_id: str) -> Gallery:
    gallery = session.get(Gallery, gallery_id)
    if gallery is None:
        raise NotFound(f"Gallery {gallery_id!r} not found; `GET /v1/galleries` lists them.")
    return gallery


def owned_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant.id:
        raise NotFound(f"Job {job_id!r} not found; `GET /v1/jobs` lists your jobs.")
    return job


def job_public(job: Job, model_id: str | None = None) -> JobPublic:
    public = JobPublic.model_validate(job)
    public.request = dict((job.params or {}).get("request") or {})
    public.model_id = model_id
    public.webhook = webhooks.public_delivery(job)
    public.webhook_secret = None  # shown once, in the answer of the submission
    return public


def _model_ids(session: Session, job_ids: list[str]) -> dict[str, str]:
    if not job_ids:
        return {}
    rows = session.execute(select(Model.job_id, Model.id).where(Model.job_id.in_(job_ids))).all()
    return {job_id: model_id for job_id, model_id in rows if job_id is not None}


def submit_job(
    session: Session,
    settings: Settings,
    tenant: Tenant,
    kind: str,
    config: dict[str, Any],
    request: dict[str, Any],
    link: Callable[[Job], None] | None = None,
    *,
    device: str | None = None,
) -> Job:
    """Commit a queued job row (and whatever ``link`` adds for it, in the same transaction), then
    enqueue it on the queue for ``device`` (``gpu`` for cuda, see ``queue_for``). The datasets the
    request reads are held until that commit (``hold_datasets``), and so is the tenant row, after
    checking its queued-jobs quota (``quotas.check_queue_room``: 429 past it, nothing created). If
    the broker is unreachable the job is marked failed (nothing will run it) and the request
    answers 503."""
    hold_datasets(session, tenant, referenced_dataset_ids(request))
    quotas.check_queue_room(session, settings, tenant)
    job = Job(
        id=new_id(),
        tenant_id=tenant.id,
        kind=kind,
        status="queued",
        queue=queue_for(device, settings),
        params={"config": config, "request": request},
    )
    session.add(job)
    if link is not None:
        link(job)
    session.commit()
    try:
        enqueue_job(settings, job.id, job.queue)
    except Exception as err:
        job.status, job.finished_at = "failed", utcnow()
        job.error = (
            f"could not be queued: {type(err).__name__}: {err}"[:3000]
            + f"; retry it with POST /v1/jobs/{job.id}/retry once the queue is back"
        )
        session.commit()
        raise Unavailable(
            f"The job queue is unreachable; job {job.id!r} was saved as failed: retry it with "
            f"POST /v1/jobs/{job.id}/retry in a moment."
        ) from err
    return job


def build_pipeline_config(
    session: Session, settings: Settings, tenant: Tenant, body: JobCreate
) -> dict[str, Any]:
    """The worker's ``TrainConfig`` (as a dict) for ``body``: the recipe of its budget, its per-job
    overrides, and the task (models, data, stages). 404/409 for unusable references, 422 for a
    combination the worker would refuse (checked here with the worker's own validation)."""
    train = owned_dataset(session, tenant, body.dataset_id)
    if train.task == "segmentation":
        return build_segmentation_config(session, settings, tenant, body, train)
    if len(train.classes or []) < 2:
        raise Invalid(f"Dataset {train.id!r} has fewer than two classes; a classifier needs at least two.")
    images = dataset_images(settings, train)
    data: dict[str, Any] = {"train": {"path": images}}
    stages = list(PIPELINE_STAGES)
    if body.test_dataset_id is not None:
        test = owned_dataset(session, tenant, body.test_dataset_id, what="Test dataset")
        if test.task != train.task:
            raise Invalid(
                f"Test dataset {test.id!r} is a {test.task} dataset and the training dataset a {train.task} "
                "one; give a test dataset of the same task."
            )
        unknown = sorted(set(test.classes or []) - set(train.classes or []))
        if unknown:
            raise Invalid(f"Test dataset has classes the training dataset lacks: {', '.join(unknown[:20])}.")
        data["test"] = {"path": dataset_images(settings, test)}
    else:
        stages.remove("evaluate")
    if not body.recipe.finetune_student.enabled:
        stages.remove("finetune_student")  # export and evaluate then take the distilled student

    curate_knobs = _set_fields(body.recipe.curate)
    curate: dict[str, Any] = {}
    if body.gallery_id is not None:
        curate["gallery"] = get_gallery(session, body.gallery_id).path
    else:
        unused = (["transfer_set_size"] if body.transfer_set_size is not None else []) + [
            f"recipe.curate.{name}" for name in curate_knobs
        ]
        if unused:
            fix = (
                "`transfer_set_id` names one curated already: remove them"
                if body.transfer_set_id is not None
                else "add a `gallery_id` to curate from, or remove them"
            )
            raise Invalid(
                f"{', '.join(f'`{u}`' for u in unused)} only apply when the job curates a transfer set; {fix}."
            )
        stages.remove("curate")
        if body.transfer_set_id is not None:
            data["transfer"] = {
                "path": _transfer_set_manifest(session, settings, tenant, body.transfer_set_id)
            }
        else:
            data["transfer"] = {"path": images}  # distill on the labeled images themselves

    task = {
        "seed": body.seed,
        "stages": stages,
        "teacher": {"model": body.teacher, "image_size": body.teacher_image_size or body.image_size},
        "student": {"model": body.student, "image_size": body.student_image_size or body.image_size},
        "data": data,
        "curate": curate,
        "export": {"formats": list(body.export_formats)},
        "device": body.device,
    }
    config = merge(merge(recipe(body.budget), _unset_removed(_overrides(body))), _unset_removed(task))
    registry.resolve_teacher(session, settings, tenant, config["teacher"])  # a registered spec -> its file
    if "curate" not in stages:
        config.pop("curate", None)  # the recipe's curation knobs would only confuse a reader
    try:
        parse_config(config, source="for this job")
    except ConfigError as err:
        raise Invalid(f"{err} (fix the request's matching field)") from err
    return config


SEGMENTATION_FORMATS = ("safetensors", "onnx")


def build_segmentation_config(
    session: Session, settings: Settings, tenant: Tenant, body: JobCreate, train: Dataset
) -> dict[str, Any]:
    """The ``TrainConfig`` of a job on a segmentation dataset (``task: segmentation``,
    ``kt_train.tasks.segmentation_stages``): the teacher finetuned on the image + mask pairs, the
    student distilled on the training dataset's own frames (``data.transfer``: its ``images/``;
    neither a gallery nor a transfer set yet), finetuned, exported (safetensors, ONNX) and
    evaluated (mIoU) on the test dataset when one is given. The input size follows the frames
    (``kt_train``: the first frame scaled to a longer side <= 320 px), so the image-size fields
    are refused, as are the curation knobs."""
    if body.gallery_id is not None or body.transfer_set_size is not None or _set_fields(body.recipe.curate):
        raise Invalid(
            "crop-level retrieval for segmentation is not available yet: a segmentation job can't curate "
            "from a gallery; remove `gallery_id` (and the curation knobs): the student distills on the "
            "training dataset's frames."
        )
    if body.transfer_set_id is not None:
        raise Invalid(
            "Transfer sets are curated for classification; a segmentation job distills on its training "
            "dataset's frames: remove `transfer_set_id`."
        )
    sizes = [
        f for f in ("image_size", "teacher_image_size", "student_image_size") if getattr(body, f) is not None
    ]
    if sizes:
        raise Invalid(
            f"{', '.join(f'`{f}`' for f in sizes)} don't apply to a segmentation job: its input size follows "
            "its frames (the first frame scaled to a longer side of at most 320 px); remove them."
        )
    formats = [f for f in body.export_formats if f in SEGMENTATION_FORMATS]
    if not formats:
        raise Invalid(
            f"A segmentation model is exported as {' or '.join(SEGMENTATION_FORMATS)}; "
            f"`export_formats` {list(body.export_formats)} has neither."
        )
    root = storage.dataset_dir(settings.data_dir, train.tenant_id, train.id)
    data: dict[str, Any] = {"train": {"path": str(root)}, "transfer": {"path": str(root / "images")}}
    stages = ["finetune_teacher", "distill", "finetune_student", "export", "evaluate"]
    if body.test_dataset_id is not None:
        test = owned_dataset(session, tenant, body.test_dataset_id, what="Test dataset")
        if test.task != "segmentation":
            raise Invalid(
                f"Test dataset {test.id!r} is a {test.task} dataset; a segmentation job is tested on a "
                "segmentation dataset with the same classes."
            )
        if list(test.classes or []) != list(train.classes or []):
            raise Invalid(
                f"Test dataset {test.id!r} has the classes {test.classes} and the training dataset "
                f"{train.classes}; their masks' values must mean the same classes, in the same order."
            )
        data["test"] = {"path": str(storage.dataset_dir(settings.data_dir, test.tenant_id, test.id))}
    else:
        stages.remove("evaluate")
    if not body.recipe.finetune_student.enabled:
        stages.remove("finetune_student")
    task = {
        "task": "segmentation",
        "seed": body.seed,
        "stages": stages,
        "teacher": {"model": body.teacher},
        "student": {"model": body.student},
        "data": data,
        "export": {"formats": formats},
        "device": body.device,
    }
    overrides = _unset_removed(_overrides(body))
    overrides.pop("curate", None)
    config = merge(merge(recipe(body.budget), overrides), _unset_removed(task))
    config.pop("curate", None)
    registry.resolve_teacher(session, settings, tenant, config["teacher"])
    try:
        parse_config(config, source="for this job")
    except ConfigError as err:
        raise Invalid(f"{err} (fix the request's matching field)") from err
    return config


def _transfer_set_manifest(session: Session, settings: Settings, tenant: Tenant, transfer_set_id: str) -> str:
    # imported here: the transfer-sets routes build on this module's helpers
    from service.api.routes.transfer_sets import ready_transfer_set

    manifest = ready_transfer_set(session, settings, tenant, transfer_set_id).manifest_path
    assert manifest is not None  # ready_transfer_set refuses a set without one
    return manifest


def _unset_removed(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` without its ``None`` values and the sections left empty (a knob the request left unset)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            value = _unset_removed(value)
            if not value:
                continue
        if value is not None:
            out[key] = value
    return out


def _set_fields(model: BaseModel) -> dict[str, Any]:
    return {k: v for k, v in model.model_dump(exclude={"enabled"}).items() if v is not None}


def _overrides(body: JobCreate) -> dict[str, Any]:
    """The request's recipe knobs as ``TrainConfig`` keys (``None``: keep the budget's value); the
    schema has already refused a legacy field and its ``recipe.*`` twin set to different values."""
    r = body.recipe
    teacher, distill, student = r.teacher, r.distill, r.finetune_student
    student_steps = _first(student.steps, body.steps.finetune_student)
    # finetune steps the request names are steps to train: the budget keeps a task-distilled student
    # as distilled, which would skip them silently (`--steps 100,2000,200` ran no finetune)
    after_distillation = _first(student.after_distillation, True if student_steps else None)
    return {
        "teacher": {"norm_eval": teacher.norm_eval},
        "finetune_teacher": {
            "linear_probe": {
                "steps": _first(teacher.linear_probe_steps, body.steps.finetune_teacher),
                "lr": _first(teacher.linear_probe_lr, body.lr.finetune_teacher),
                "batch_size": body.batch_size.finetune_teacher,
            },
            "full_finetune": {"steps": teacher.full_finetune_steps, "lr": teacher.full_finetune_lr},
            "layer_decay": teacher.layer_decay,
        },
        "distill": {
            "steps": _first(distill.steps, body.steps.distill),
            "lr": _first(distill.lr, body.lr.distill),
            "batch_size": _first(distill.batch_size, body.batch_size.distill),
            "temperature": distill.temperature,
            "ce_weight": distill.ce_weight,
            "cache": {"views": distill.cache_views, "mode": distill.cache_mode},
        },
        "finetune_student": {
            "steps": student_steps,
            "lr": _first(student.lr, body.lr.finetune_student),
            "batch_size": body.batch_size.finetune_student,
            "after_distillation": after_distillation,
        },
        "curate": {**_set_fields(r.curate), "size": _first(r.curate.size, body.transfer_set_size)},
    }


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


@router.post(
    "", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic, responses={404: {}, 409: {}, 503: {}}
)
def create_job(
    body: JobCreate, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep
) -> JobPublic:
    """Queue a training job; poll `GET /v1/jobs/{id}` for its progress, follow
    `GET /v1/jobs/{id}/events`, or give a `webhook_url` to be notified when it ends."""
    if body.webhook_url is not None:
        try:
            webhooks.check_url(body.webhook_url, settings)
        except webhooks.WebhookRefused as err:
            raise Invalid(f"`webhook_url` {err}.") from err
    config = build_pipeline_config(session, settings, tenant, body)
    request = body.model_dump(mode="json")
    secret = webhooks.new_secret() if body.webhook_url is not None else None

    def add_webhook(job: Job) -> None:
        if secret is not None:
            job.webhook_url, job.webhook_secret, job.webhook_state = body.webhook_url, secret, "waiting"

    job = submit_job(session, settings, tenant, "pipeline", config, request, add_webhook, device=body.device)
    public = job_public(job)
    public.webhook_secret = secret
    return public


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: SessionDep,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    status_: Annotated[
        str | None, Query(alias="status", pattern="^(" + "|".join(JOB_STATUSES) + ")$")
    ] = None,
) -> JobsPublic:
    """The tenant's jobs, newest first (optionally only those with ``status``)."""
    where = [Job.tenant_id == tenant.id]
    if status_ is not None:
        where.append(Job.status == status_)
    count = session.scalar(select(func.count()).select_from(Job).where(*where))
    rows = session.scalars(
        select(Job).where(*where).order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    ).all()
    models = _model_ids(session, [row.id for row in rows])
    return JobsPublic(data=[job_public(row, models.get(row.id)) for row in rows], count=count or 0)


@router.get("/{job_id}", response_model=JobPublic, responses={404: {}})
def get_job(job_id: str, session: ReadSessionDep, tenant: CurrentTenant) -> Response:
    # The status poll, so kept cheap: one autocommit SELECT (the job and its model's id), and the
    # body serialized here (a JobPublic built by us needs no second validation by FastAPI).
    model_id = select(Model.id).where(Model.job_id == Job.id).limit(1).scalar_subquery()
    row = session.execute(select(Job, model_id).where(Job.id == job_id, Job.tenant_id == tenant.id)).first()
    if row is None:
        raise NotFound(f"Job {job_id!r} not found; `GET /v1/jobs` lists your jobs.")
    return Response(job_public(row[0], row[1]).model_dump_json(), media_type="application/json")


@router.post("/{job_id}/cancel", response_model=JobPublic, responses={404: {}, 409: {}})
def cancel_job(job_id: str, session: SessionDep, tenant: CurrentTenant) -> JobPublic:
    """Cancel a job: a queued one at once, a running one at its next progress report."""
    job = owned_job(session, tenant, job_id)
    if job.status in JOB_FINAL_STATUSES:
        raise Conflict(f"Job {job_id!r} already {job.status}; only queued or running jobs can be canceled.")
    # conditional update: a worker may pick the job up between our read and this write
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == "queued")
        .values(status="canceled", cancel_requested=True, finished_at=utcnow(), eta_s=None)
    )
    session.execute(update(Job).where(Job.id == job.id).values(cancel_requested=True))
    session.commit()
    session.refresh(job)
    return job_public(job, _model_ids(session, [job.id]).get(job.id))


@router.post(
    "/{job_id}/retry",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    responses={404: {}, 409: {}, 503: {}},
)
def retry_job(job_id: str, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep) -> JobPublic:
    """Run a failed or canceled job again: it goes back to its queue and resumes where it stopped
    (stages it finished are kept, training continues from its last checkpoint), with a fresh
    allowance of attempts. 409 for a job that is queued, running or succeeded; 429 when the tenant
    has as many queued jobs as its quota allows (as at submit)."""
    job = owned_job(session, tenant, job_id)
    if job.status not in RETRYABLE_STATUSES:
        raise Conflict(
            f"Job {job_id!r} is {job.status}; only failed or canceled jobs can be retried"
            + (f" (poll it with `GET /v1/jobs/{job_id}`)." if job.status in ("queued", "running") else ".")
        )
    # a failed job's dataset may be deleted since; held until the requeue commits, as at submit
    request = (job.params or {}).get("request") or {}
    hold_datasets(session, tenant, referenced_dataset_ids(request))
    refuse_if_inputs_gone(session, tenant, request)
    quotas.check_queue_room(session, settings, tenant)
    params = dict(job.params or {})
    params[ATTEMPTS_BEFORE_RETRY] = job.attempts
    params["retries"] = int(params.get("retries") or 0) + 1
    # conditional: two concurrent retries of one job queue it once
    done = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == job.status)
        .values(
            status="queued",
            error=None,
            cancel_requested=False,
            finished_at=None,
            eta_s=None,
            heartbeat_at=None,
            run_after=None,
            params=params,
            **webhooks.rearm(job),  # it notifies again when it ends again
        )
    )
    session.commit()
    if done.rowcount != 1:  # type: ignore[attr-defined]
        raise Conflict(
            f"Job {job_id!r} changed meanwhile (retried already?); `GET /v1/jobs/{job_id}` shows it."
        )
    try:
        enqueue_job(settings, job.id, job.queue)
    except Exception as err:
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == "queued")
            .values(
                status="failed",
                finished_at=utcnow(),
                error=f"could not be queued: {type(err).__name__}: {err}"[:3000]
                + f"; retry it with POST /v1/jobs/{job.id}/retry once the queue is back",
            )
        )
        session.commit()
        raise Unavailable(f"The job queue is unreachable; retry job {job.id!r} in a moment.") from err
    session.refresh(job)
    return job_public(job, _model_ids(session, [job.id]).get(job.id))


@router.get(
    "/{job_id}/logs",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}}, 404: {}},
)
def job_logs(
    job_id: str, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep
) -> PlainTextResponse:
    """The job's log (its last megabyte); empty until the worker writes one."""
    owned_job(session, tenant, job_id)
    path = job_dir(settings, job_id) / "job.log"
    text = ""
    if path.is_file():
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - MAX_LOG_BYTES))
            text = f.read().decode("utf-8", errors="replace")
    return PlainTextResponse(text)


EVENTS_KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream


def _job_event(
    factory: sessionmaker[Session], redactor: Redactor, tenant_id: str, job_id: str
) -> dict[str, Any] | None:
    """The job as ``GET /v1/jobs/{id}`` shows it (paths rewritten), or ``None`` once it is gone."""
    model_id = select(Model.id).where(Model.job_id == Job.id).limit(1).scalar_subquery()
    with factory() as session:
        row = session.execute(
            select(Job, model_id).where(Job.id == job_id, Job.tenant_id == tenant_id)
        ).first()
        if row is None:
            return None
        value = job_public(row[0], row[1]).model_dump(mode="json")
    return dict(redactor.value(value))


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, 404: {}},
)
async def job_events(
    job_id: str,
    request: Request,
    tenant: CurrentTenant,
    settings: SettingsDep,
    poll_s: Annotated[float, Query(ge=0.1, le=60, description="Seconds between two looks at the job.")] = 1.0,
) -> StreamingResponse:
    """Server-sent events until the job ends: an `event: job` with the job's JSON (as
    `GET /v1/jobs/{id}`) at once and whenever it changes (status, stage, progress, ETA, metrics),
    then `event: end` with `{"status": ...}` once it succeeded, failed or was canceled, and the
    stream closes. `: keep-alive` comment lines every 15 s while nothing changes."""
    factory = read_session_factory(request.app)
    redactor = redactor_for(settings, factory)
    first = await run_in_threadpool(_job_event, factory, redactor, tenant.id, job_id)
    if first is None:
        raise NotFound(f"Job {job_id!r} not found; `GET /v1/jobs` lists your jobs.")

    async def stream() -> AsyncIterator[str]:
        job: dict[str, Any] | None = first
        last, quiet_s, n = "", 0.0, 0
        while True:
            if job is None:
                yield 'event: end\ndata: {"status": "deleted"}\n\n'
                return
            text = json.dumps(job, separators=(",", ":"))
            if text != last:
                n += 1
                yield f"id: {n}\nevent: job\ndata: {text}\n\n"
                last, quiet_s = text, 0.0
            elif quiet_s >= EVENTS_KEEPALIVE_S:
                yield ": keep-alive\n\n"
                quiet_s = 0.0
            if job["status"] in JOB_FINAL_STATUSES:
                yield f"event: end\ndata: {json.dumps({'status': job['status']})}\n\n"
                return
            await asyncio.sleep(poll_s)
            quiet_s += poll_s
            if await request.is_disconnected():
                return
            job = await run_in_threadpool(_job_event, factory, redactor, tenant.id, job_id)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
