"""``/v1/transfer-sets``: curate unlabeled images from a gallery for a dataset (a ``curate`` job),
then read its summary, manifest and report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, status
from fastapi.responses import FileResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kt_train.recipe import DEFAULT_BUDGET, merge, recipe
from service import registry
from service.api.deps import CurrentTenant, SessionDep, SettingsDep
from service.api.errors import Conflict, Invalid, NotFound
from service.api.routes.jobs import dataset_images, get_gallery, job_dir, owned_dataset, submit_job
from service.db.models import Job, Tenant, TransferSet, new_id
from service.redact import public_copy, session_redactor
from service.schemas import (
    MAX_OFFSET,
    ManifestFormat,
    TransferSetCreate,
    TransferSetPublic,
    TransferSetsPublic,
)
from service.settings import Settings

router = APIRouter(prefix="/transfer-sets", tags=["transfer sets"])

# job status -> transfer set status
_STATUS = {
    "queued": "queued",
    "running": "running",
    "succeeded": "ready",
    "failed": "failed",
    "canceled": "failed",
}
_MEDIA = {"jsonl": "application/x-ndjson", "csv": "text/csv", "parquet": "application/vnd.apache.parquet"}
# The curation report is self-contained (data: images, inline CSS/JS) and shows names taken from the
# tenant's data and the gallery: it may load nothing and run nothing but its own inline code, may be
# framed only by our pages, and is never sniffed as another type. The same headers on /v1 and /ui.
REPORT_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "frame-ancestors 'self'"
)
REPORT_HEADERS = {
    "Content-Security-Policy": REPORT_CSP,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "private, no-cache",
}


def curate_dir(settings: Settings, job_id: str) -> Path:
    return job_dir(settings, job_id) / "run" / "curate"


def _owned(session: Session, tenant: Tenant, transfer_set_id: str) -> TransferSet:
    ts = session.get(TransferSet, transfer_set_id)
    if ts is None or ts.tenant_id != tenant.id:
        raise NotFound(f"Transfer set {transfer_set_id!r} not found; `GET /v1/transfer-sets` lists yours.")
    return ts


def _sync(session: Session, settings: Settings, ts: TransferSet) -> TransferSet:
    """Bring the row up to date with its job (status; summary and file paths once done)."""
    job = session.get(Job, ts.job_id) if ts.job_id else None
    new_status = _STATUS.get(job.status, "failed") if job is not None else "failed"
    if new_status == ts.status:
        return ts
    ts.status = new_status
    if new_status == "ready" and ts.job_id:
        out = curate_dir(settings, ts.job_id)
        summary_path = out / "summary.json"
        if summary_path.is_file():
            ts.summary = json.loads(summary_path.read_text())
        for fmt in ("jsonl", "csv", "parquet"):
            if (out / f"manifest.{fmt}").is_file():
                ts.manifest_path = str(out / f"manifest.{fmt}")
                break
        if (out / "report.html").is_file():
            ts.report_path = str(out / "report.html")
    session.commit()
    return ts


def _ready_dir(session: Session, settings: Settings, tenant: Tenant, transfer_set_id: str) -> Path:
    ts = _sync(session, settings, _owned(session, tenant, transfer_set_id))
    if ts.status != "ready" or ts.job_id is None:
        raise Conflict(f"Transfer set {transfer_set_id!r} is {ts.status}, not ready; poll it until it is.")
    return curate_dir(settings, ts.job_id)


def ready_transfer_set(
    session: Session, settings: Settings, tenant: Tenant, transfer_set_id: str
) -> TransferSet:
    """The tenant's transfer set ``transfer_set_id`` for a job to distill on: 404 for an unknown id
    or another tenant's, 409 until it is ready (and has a manifest)."""
    ts = session.get(TransferSet, transfer_set_id)
    if ts is None or ts.tenant_id != tenant.id:
        raise NotFound(
            f"Transfer set {transfer_set_id!r} not found; `kt transfer-sets list` (GET /v1/transfer-sets) "
            "lists yours."
        )
    ts = _sync(session, settings, ts)
    if ts.status != "ready":
        raise Conflict(
            f"Transfer set {transfer_set_id!r} is {ts.status}, not ready; wait for it "
            f"(`kt transfer-sets show {transfer_set_id}`) and submit the job again."
        )
    if not ts.manifest_path:
        raise Conflict(
            f"Transfer set {transfer_set_id!r} has no manifest (its curation job wrote none); "
            "curate a new one with `kt transfer-sets create`."
        )
    return ts


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TransferSetPublic,
    responses={404: {}, 409: {}, 503: {}},
)
def create_transfer_set(
    body: TransferSetCreate, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep
) -> TransferSet:
    """Queue the curation of a transfer set; poll `GET /v1/transfer-sets/{id}` until it is ready."""
    dataset = owned_dataset(session, tenant, body.dataset_id)
    if dataset.task == "segmentation":
        raise Invalid(
            "crop-level retrieval for segmentation is not available yet: transfer sets are curated for "
            "classification datasets; a segmentation job distills on its training dataset's frames."
        )
    gallery = get_gallery(session, body.gallery_id)
    base = recipe(DEFAULT_BUDGET)
    curate = merge(
        base["curate"],
        {
            "gallery": gallery.path,
            "size": body.size,
            "method": body.method,
            "crops": body.crops,
            "dedup_threshold": body.dedup_threshold,
            "leakage_threshold": body.leakage_threshold,
            "min_score": body.min_score,
            "teacher_min_prob": body.teacher_min_prob,
            "top_up": body.top_up,
            "seed": body.seed,
            "formats": ["jsonl", "csv", "parquet"],
            "report": True,
        },
    )
    config: dict[str, Any] = {
        "stages": ["curate"],
        "data": {"train": {"path": dataset_images(settings, dataset)}},
        "curate": curate,
    }
    if body.teacher is not None:
        teacher: dict[str, Any] = {**base.get("teacher", {}), "model": body.teacher}
        registry.resolve_teacher(session, settings, tenant, teacher)
        config.update(
            stages=["finetune_teacher", "curate"], teacher=teacher, finetune_teacher=base["finetune_teacher"]
        )
    else:  # no teacher to filter or re-rank with: the gallery encoder's similarity alone
        curate.update(teacher_filter=False, teacher_rerank=0.0)
    if body.device is not None:
        config["device"] = body.device
    request = body.model_dump(mode="json")
    ts = TransferSet(
        id=new_id(),
        tenant_id=tenant.id,
        dataset_id=dataset.id,
        gallery_id=gallery.id,
        params=request,
        size=body.size,
        status="queued",
    )

    def link(job: Job) -> None:  # committed with the job, before it is enqueued
        ts.job_id = job.id
        session.add(ts)

    submit_job(session, settings, tenant, "curate", config, request, link=link, device=body.device)
    return ts


@router.get("", response_model=TransferSetsPublic)
def list_transfer_sets(
    session: SessionDep,
    tenant: CurrentTenant,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> TransferSetsPublic:
    """The tenant's transfer sets, newest first."""
    where = TransferSet.tenant_id == tenant.id
    count = session.scalar(select(func.count()).select_from(TransferSet).where(where))
    rows = session.scalars(
        select(TransferSet)
        .where(where)
        .order_by(TransferSet.created_at.desc(), TransferSet.id)
        .limit(limit)
        .offset(offset)
    ).all()
    data = [TransferSetPublic.model_validate(_sync(session, settings, row)) for row in rows]
    return TransferSetsPublic(data=data, count=count or 0)


@router.get("/{transfer_set_id}", response_model=TransferSetPublic, responses={404: {}})
def get_transfer_set(
    transfer_set_id: str, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep
) -> TransferSet:
    return _sync(session, settings, _owned(session, tenant, transfer_set_id))


@router.get("/{transfer_set_id}/manifest", response_class=FileResponse, responses={404: {}, 409: {}})
def get_manifest(
    transfer_set_id: str,
    session: SessionDep,
    tenant: CurrentTenant,
    settings: SettingsDep,
    format: Annotated[ManifestFormat, Query()] = "jsonl",
) -> FileResponse:
    """The manifest (one row per item: path, score, query, class, ...)."""
    path = _ready_dir(session, settings, tenant, transfer_set_id) / f"manifest.{format}"
    if not path.is_file():
        raise NotFound(
            f"Transfer set {transfer_set_id!r} has no {format} manifest; ask for another `format` "
            "(jsonl, csv, parquet)."
        )
    path = public_copy(path, session_redactor(settings, session))  # its `source`s name no server path
    return FileResponse(path, media_type=_MEDIA[format], filename=f"transfer-set-{transfer_set_id}.{format}")


@router.get("/{transfer_set_id}/report", response_class=FileResponse, responses={404: {}, 409: {}})
def get_report(
    transfer_set_id: str, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep
) -> FileResponse:
    """The HTML report: per-class counts, score histograms, an image grid."""
    path = _ready_dir(session, settings, tenant, transfer_set_id) / "report.html"
    if not path.is_file():
        raise NotFound(
            f"Transfer set {transfer_set_id!r} has no report (its job wrote none); the manifest has the items."
        )
    path = public_copy(path, session_redactor(settings, session))
    return FileResponse(path, media_type="text/html; charset=utf-8", headers=REPORT_HEADERS)
