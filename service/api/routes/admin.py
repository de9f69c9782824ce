"""``/v1/admin``: operator actions. Only admin API keys may call them.

An admin key is an ordinary tenant key with the ``is_admin`` flag, created by an operator with
``python -m service.admin create-key --tenant NAME --admin``. The jobs it starts belong to that
tenant (follow them at ``GET /v1/jobs/{id}``); what they build (galleries) is shared by every
tenant. A missing or bad key answers 401 like everywhere; a valid key without the flag, 403.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy import select

from service.api.deps import CurrentTenant, SessionDep, SettingsDep, _bearer
from service.api.errors import Conflict, Invalid
from service.api.routes.jobs import dataset_images, job_public, owned_dataset, submit_job
from service.db.models import ApiKey, Gallery, Job, Tenant
from service.registry import resolve_encoder
from service.schemas import GalleryBuildCreate, JobPublic
from service.security import api_key_matches, api_key_prefix
from service.settings import Settings

router = APIRouter(prefix="/admin", tags=["admin"])

ADMIN_KEY_HOWTO = "an operator creates one with `python -m service.admin create-key --tenant NAME --admin`"


def get_admin_tenant(
    session: SessionDep,
    tenant: CurrentTenant,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    """The tenant of an admin key; 403 for a valid key without the admin flag.

    ``CurrentTenant`` has already answered 401 for a missing, unknown or revoked key; this looks
    the (rarely used) admin key up once more for its flag."""
    key = credentials.credentials if credentials is not None else ""
    prefix = api_key_prefix(key)
    rows = (
        session.scalars(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.tenant_id == tenant.id)).all()
        if prefix
        else []
    )
    if not any(
        row.is_admin and row.revoked_at is None and api_key_matches(key, row.key_hash) for row in rows
    ):
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN,
            detail=f"This route needs an admin API key; {ADMIN_KEY_HOWTO}.",
        )
    return tenant


AdminTenant = Annotated[Tenant, Depends(get_admin_tenant)]


def server_path(path: str, settings: Settings) -> str:
    """The gallery source ``path`` as the worker will read it, symlinks resolved; 422 unless it is
    absolute, free of ``..``, present on this server, inside one of ``KT_GALLERY_ROOTS`` and
    neither inside nor around ``KT_DATA_DIR`` (every tenant's uploads, models and galleries live
    there: those are read by ``dataset_id``, with ownership checked). A brace pattern such as
    ``/data/shards/{00000..00009}.tar`` is checked by the folder before its first brace, and
    whatever lies inside a root (links, manifests) is the operator's to vouch for."""
    parsed = PurePosixPath(path)
    if not parsed.is_absolute() or ".." in parsed.parts:
        raise Invalid(
            f"Source path {path!r} must be absolute and free of '..' (e.g. /data/images); "
            "or upload the images and give `dataset_id`."
        )
    roots = settings.gallery_roots
    if not roots:
        raise Invalid(
            f"Source path {path!r} is refused: this server reads no server paths for galleries "
            "(KT_GALLERY_ROOTS is empty); upload the images as a dataset and give `dataset_id`, or ask "
            "the operator to list the folder in KT_GALLERY_ROOTS."
        )
    folder, rest = path, ""
    if "{" in path:  # the folder before the first brace; the pattern after it is kept as given
        folder = path.split("{", 1)[0].rpartition("/")[0] or "/"
        rest = path[len(folder) :] if folder != "/" else path
    probe = Path(folder)
    if not probe.exists():
        raise Invalid(
            f"Source path {path!r} does not exist on the server; give a path under one of "
            f"KT_GALLERY_ROOTS ({_listed(roots)}) that the API and the workers can both read, or upload "
            "the images and give `dataset_id`."
        )
    real = probe.resolve()
    data_dir = settings.data_dir.resolve()
    if real.is_relative_to(data_dir) or data_dir.is_relative_to(real):
        where = "is inside" if real.is_relative_to(data_dir) else "contains"
        raise Invalid(
            f"Source path {path!r} {where} the service's data directory (KT_DATA_DIR), which holds "
            "every tenant's uploads; give an uploaded dataset by `dataset_id` instead, or a folder of "
            f"KT_GALLERY_ROOTS ({_listed(roots)})."
        )
    if not any(real.is_relative_to(root) for root in roots):
        raise Invalid(
            f"Source path {path!r} (resolved: {str(real)!r}) is outside the folders this server reads "
            f"galleries from; use a path under one of KT_GALLERY_ROOTS ({_listed(roots)}), or upload the "
            "images and give `dataset_id`."
        )
    return str(real).rstrip("/") + rest if rest else str(real)


def _listed(roots: list[Path]) -> str:
    return ", ".join(str(root) for root in roots)


@router.post(
    "/galleries",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    responses={403: {}, 404: {}, 409: {}, 503: {}},
)
def build_gallery(
    body: GalleryBuildCreate, session: SessionDep, tenant: AdminTenant, settings: SettingsDep
) -> JobPublic:
    """Queue a `build_gallery` job: embed the sources with the encoder, index them, and register
    the gallery under `name` when done (`GET /v1/galleries`). Poll `GET /v1/jobs/{id}`."""
    if session.scalar(select(Gallery.id).where(Gallery.name == body.name)) is not None:
        raise Conflict(
            f"A gallery named {body.name!r} exists already; choose another name (`GET /v1/galleries` lists them)."
        )
    building = session.scalars(
        select(Job).where(Job.kind == "build_gallery", Job.status.in_(("queued", "running")))
    ).all()
    for job in building:
        if ((job.params or {}).get("request") or {}).get("name") == body.name:
            raise Conflict(
                f"Job {job.id!r} is already building gallery {body.name!r}; follow it at "
                f"`GET /v1/jobs/{job.id}`, or choose another name."
            )
    sources: list[str] = []
    for source in body.sources:
        if source.dataset_id is not None:
            sources.append(dataset_images(settings, owned_dataset(session, tenant, source.dataset_id)))
        else:
            assert source.path is not None  # GallerySource holds exactly one of the two
            sources.append(server_path(source.path, settings))
    config = {
        "name": body.name,
        "sources": sources,
        "encoder": resolve_encoder(session, settings, tenant, body.encoder),  # a registered spec -> its file
        "image_size": body.image_size,
        "index_kind": body.index_kind,
        "batch_size": body.batch_size,
        "shard_size": body.shard_size,
        "device": body.device,
        "distributed": body.distributed,
    }
    request = body.model_dump(mode="json")
    job = submit_job(session, settings, tenant, "build_gallery", config, request, device=body.device)
    return job_public(job)
