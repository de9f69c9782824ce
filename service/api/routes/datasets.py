"""``/v1/datasets``: upload a labeled image zip (class folders, or images + masks for
segmentation), list, read, delete."""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import JSONResponse
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service import quotas, storage
from service.api.deps import CurrentTenant, SessionDep, SettingsDep
from service.api.errors import Conflict, Invalid, NotFound
from service.db.models import Dataset, Job, Tenant, new_id, utcnow
from service.derived import delete_rows, find_derived, remove_files, unfinished_users
from service.ingest import ingest
from service.schemas import MAX_OFFSET, DatasetPublic, DatasetsPublic
from service.settings import Settings
from service.uploads import ReceivedUpload, receive_upload, remove_upload, upload_gate

router = APIRouter(prefix="/datasets", tags=["datasets"])

TASKS = ("classification", "segmentation")

# The body is parsed by hand (streamed to disk), so describe it for the OpenAPI docs.
_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "A zip: `<class>/<image>` folders (optionally inside one top "
                            "folder), or flat images plus `labels.csv` with columns `path,label`.",
                        },
                        "name": {"type": "string", "maxLength": 200, "description": "Dataset name."},
                        "task": {
                            "type": "string",
                            "enum": list(TASKS),
                            "default": "classification",
                            "description": "`segmentation`: the zip holds `images/<path>.jpg|png` and "
                            "`masks/<path>.png` (single-channel index masks, same path and stem) and "
                            '`classes.json` (`{"classes": [...], "void_index": 255}`) or the fields '
                            "`classes` / `void_index`.",
                        },
                        "classes": {
                            "type": "string",
                            "description": "Segmentation only, without classes.json: the class names "
                            "(mask value 0, 1, ...), a JSON list or comma-separated.",
                        },
                        "void_index": {
                            "type": "integer",
                            "minimum": 0,
                            "maximum": 255,
                            "description": "Segmentation only, with `classes`: the mask value that marks "
                            "unlabeled pixels.",
                        },
                    },
                }
            }
        },
    }
}


def name_from_filename(filename: str | None) -> str:
    """A dataset name from the uploaded file's name: its last component (either separator; the
    client's directories, ``..`` included, mean nothing here), without the suffix or control
    characters, cut to the 200 characters a name may have."""
    last = re.split(r"[/\\]", filename or "")[-1]
    stem = PurePath(last).stem if last not in ("", ".", "..") else ""
    return re.sub(r"[\x00-\x1f\x7f]", "", stem).strip()[:200]


def _get_owned(session: SessionDep, tenant: Tenant, dataset_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant.id:
        raise NotFound(f"Dataset {dataset_id!r} not found; `GET /v1/datasets` lists your datasets.")
    return dataset


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    openapi_extra=_UPLOAD_BODY,
    responses={400: {}, 401: {}, 408: {}, 413: {}, 422: {}, 503: {}},
)
async def create_dataset(
    request: Request, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep
) -> Dataset:
    """Upload a zip of labeled images; it is validated, every image decoded, and stored. 413 when
    the images would take the tenant's datasets past its storage quota (nothing is kept).
    `task=segmentation`: images + index masks, each mask checked against its image (size, values;
    a colour mask is refused), 422 naming the file. Each API process takes a few uploads at a time
    (`KT_CONCURRENT_UPLOADS`); the next ones wait their turn, and past the queue answer 503 with
    `Retry-After` (nothing read or kept: send the upload again after the wait); a body that sends
    nothing for `KT_UPLOAD_IDLE_TIMEOUT_S` answers 408."""
    await run_in_threadpool(quotas.refuse_if_storage_full, session, settings, tenant)
    async with upload_gate(request, settings).slot():
        upload = await receive_upload(request, settings)
        return await store_dataset(session, settings, tenant, upload)


def upload_task(upload: ReceivedUpload) -> str:
    """The upload's ``task`` form field (default ``classification``); 422 for another value, or
    for segmentation fields on a classification upload."""
    task = (upload.fields.get("task") or "classification").strip() or "classification"
    if task not in TASKS:
        raise Invalid(f"Form field `task` is {task[:40]!r}; use one of: {', '.join(TASKS)}.")
    if task == "classification":
        given = [f for f in ("classes", "void_index") if (upload.fields.get(f) or "").strip()]
        if given:
            raise Invalid(
                f"Form field(s) {', '.join(f'`{f}`' for f in given)} only apply to `task=segmentation` "
                "(a classification dataset's classes are its folders): add `task=segmentation` or remove them."
            )
    return task


async def store_dataset(
    session: Session, settings: Settings, tenant: Tenant, upload: ReceivedUpload
) -> Dataset:
    """Validate and store a received upload as the tenant's dataset (what ``POST /v1/datasets`` and
    the upload form of ``/ui/datasets`` do): every image decoded, the row committed only when the
    images fit the tenant's storage quota. The uploaded file is removed either way."""
    try:
        name = upload.name or name_from_filename(upload.filename) or "dataset"
        if len(name) > 200:
            raise Invalid("`name` is longer than 200 characters; choose a shorter dataset name.")
        task = upload_task(upload)
        dataset_id = new_id()
        dest = storage.dataset_dir(settings.data_dir, tenant.id, dataset_id)
        ingested = await ingest(upload.path, dest, settings, task=task, fields=upload.fields)
    finally:
        await remove_upload(upload.path)
    dataset = Dataset(
        id=dataset_id,
        tenant_id=tenant.id,
        name=name,
        task=task,
        status="ready",
        num_images=ingested.num_images,
        classes=ingested.classes,
        class_counts=ingested.class_counts,
        bytes=ingested.bytes,
        created_at=utcnow(),
    )
    try:
        await run_in_threadpool(quotas.check_storage_room, session, settings, tenant, ingested.bytes)
        session.add(dataset)
        await run_in_threadpool(session.commit)
    except BaseException:
        storage.remove_tree(dest)
        raise
    return dataset


@router.get("", response_model=DatasetsPublic)
def list_datasets(
    session: SessionDep,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> DatasetsPublic:
    """The tenant's datasets, newest first."""
    count = session.scalar(select(func.count()).select_from(Dataset).where(Dataset.tenant_id == tenant.id))
    rows = session.scalars(
        select(Dataset)
        .where(Dataset.tenant_id == tenant.id)
        .order_by(Dataset.created_at.desc(), Dataset.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return DatasetsPublic(data=[DatasetPublic.model_validate(row) for row in rows], count=count or 0)


@router.get("/{dataset_id}", response_model=DatasetPublic, responses={404: {}})
def get_dataset(dataset_id: str, session: SessionDep, tenant: CurrentTenant) -> Dataset:
    return _get_owned(session, tenant, dataset_id)


def referenced_dataset_ids(request: dict[str, Any]) -> set[str]:
    """The dataset ids a job's request reads (training/test datasets, gallery sources)."""
    ids = {request.get("dataset_id"), request.get("test_dataset_id")}
    for source in request.get("sources") or []:
        if isinstance(source, dict):
            ids.add(source.get("dataset_id"))
    return {i for i in ids if isinstance(i, str)}


_DEPENDENTS_409: dict[str, Any] = {
    "description": "A queued or running job reads the dataset, or (without `cascade=true`) things "
    "derived from it still show its images: `dependents` lists them.",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "detail": {"type": "string"},
                    "dependents": {
                        "type": "object",
                        "description": "Your transfer sets and jobs (ids) and the galleries that show the "
                        "dataset's images, and how many transfer sets of other tenants were curated from "
                        "those galleries.",
                    },
                },
            }
        }
    },
}


def _refuse_while_a_job_reads(session: Session, tenant_id: str, dataset_id: str) -> None:
    """409 (and roll back) when a queued or running job of the tenant reads the dataset."""
    unfinished = session.scalars(
        select(Job).where(Job.tenant_id == tenant_id, Job.status.in_(("queued", "running")))
    ).all()
    for job in unfinished:
        if dataset_id in referenced_dataset_ids((job.params or {}).get("request") or {}):
            session.rollback()
            raise Conflict(
                f"Dataset {dataset_id!r} is used by {job.status} job {job.id!r}; wait for it to finish "
                f"or cancel it (`POST /v1/jobs/{job.id}/cancel`), then delete the dataset."
            )


def _refuse_while_a_job_reads_derived(session: Session, tenant_id: str, dataset_id: str, found: Any) -> None:
    """409 (and roll back) when a queued or running job reads a transfer set or gallery made from it."""
    busy = unfinished_users(session, found)
    if busy:
        session.rollback()
        mine = [job.id for job in busy if job.tenant_id == tenant_id]
        which = f"job {mine[0]!r}" if mine else "a job of another tenant"
        raise Conflict(
            f"Dataset {dataset_id!r} is not deleted: {which} is {busy[0].status} on a transfer set or "
            "gallery made from it; wait for it to finish"
            + (f" or cancel it (`POST /v1/jobs/{mine[0]}/cancel`)" if mine else "")
            + ", then delete the dataset."
        )


@router.delete(
    "/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, responses={404: {}, 409: _DEPENDENTS_409}
)
def delete_dataset(
    dataset_id: str,
    session: SessionDep,
    tenant: CurrentTenant,
    settings: SettingsDep,
    cascade: Annotated[
        bool,
        Query(
            description="Also delete what shows the dataset's images: transfer sets curated for it "
            "(their reports and files), the curate stage of jobs that curated from it, and galleries "
            "built from it with the transfer sets curated from those. Without it, the delete is "
            "refused (409) while any of these exist. Models trained on the dataset are kept."
        ),
    ] = False,
) -> Response:
    """Delete the dataset and its files; never while a queued or running job reads it (or what
    is derived from it). Transfer sets, curated sets of jobs and galleries made from its images
    show them too: the delete is refused (409, listing them) unless `cascade=true` deletes them
    with it."""
    dataset = _get_owned(session, tenant, dataset_id)
    # a job reading it first: waiting for (or cancelling) it is what to do, cascade or not
    _refuse_while_a_job_reads(session, tenant.id, dataset_id)
    found = find_derived(session, settings, dataset)
    _refuse_while_a_job_reads_derived(session, tenant.id, dataset_id, found)
    if found and not cascade:
        session.rollback()
        return _refused(
            f"Dataset {dataset_id!r} is not deleted: its images are shown by {found.describe(tenant.id)}. "
            f"To delete those with it, use `DELETE /v1/datasets/{dataset_id}?cascade=true` (models "
            "trained on it are kept).",
            found.listing(tenant.id),
        )
    # Delete first, then look for jobs, in one transaction: the DELETE locks the row (PostgreSQL) or
    # the database (SQLite) until the commit, and a job being submitted holds the row the same way
    # (``jobs.hold_datasets``), so a job committed before this look is seen here, and one that
    # commits after it finds the dataset gone.
    deleted = session.execute(
        delete(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant.id),
        execution_options={"synchronize_session": False},
    )
    if deleted.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()  # a concurrent delete won
        raise NotFound(f"Dataset {dataset_id!r} not found; `GET /v1/datasets` lists your datasets.")
    _refuse_while_a_job_reads(session, tenant.id, dataset_id)
    _refuse_while_a_job_reads_derived(session, tenant.id, dataset_id, found)
    delete_rows(session, found)
    session.commit()
    storage.remove_tree(storage.dataset_dir(settings.data_dir, tenant.id, dataset_id))
    remove_files(settings, found)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _refused(detail: str, dependents: dict[str, Any]) -> JSONResponse:
    return JSONResponse(
        status_code=status.HTTP_409_CONFLICT, content={"detail": detail, "dependents": dependents}
    )
