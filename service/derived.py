"""Where a dataset's images live on besides its own folder, so that deleting it removes them too.

A dataset's pixels are copied (as thumbnails) or read in place by:

- the transfer sets curated for it: their report shows every labeled image as a query, and the
  curation job's folder (``jobs/<id>``) holds that report, the crops' manifest and the teacher
  finetuned on the images;
- training jobs whose own ``curate`` stage ran on it (a job with a ``gallery_id``): their
  ``jobs/<id>/run/curate`` holds the same report;
- galleries built from it (an admin's ``POST /v1/admin/galleries`` with its ``dataset_id``): they
  read its images from its folder, and every transfer set curated from them shows those images,
  whichever tenant curated it; so those transfer sets, and the curate stages of jobs that curated
  from such a gallery, go with the gallery.

``DELETE /v1/datasets/{id}`` refuses (409) while any of these exist and lists them, unless
``cascade=true``, which deletes them with the dataset. What stays: models trained on it (weights,
no images) and the jobs that trained them (their curate stage's folder removed), and other jobs'
rows; a retry of any of them is refused (409: its input is gone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from service import storage
from service.db.models import Dataset, Gallery, Job, TransferSet
from service.redact import gallery_sources
from service.settings import Settings

UNFINISHED = ("queued", "running")
LISTED = 20  # ids named in a refusal; the rest are counted


def job_dir(settings: Settings, job_id: str) -> Path:
    return Path(settings.data_dir) / "jobs" / job_id


def curated_dir(settings: Settings, job_id: str) -> Path:
    """A job's curate stage output (``service.api.routes.transfer_sets.curate_dir``)."""
    return job_dir(settings, job_id) / "run" / "curate"


@dataclass(frozen=True)
class Owned:
    """A transfer set or job (its id, its tenant, and the job that holds its files, if any)."""

    id: str
    tenant_id: str
    job_id: str | None = None


@dataclass(frozen=True)
class GalleryRef:
    id: str
    name: str
    path: str


@dataclass
class Derived:
    """What shows a dataset's images, found by ``find_derived`` (plain values: they outlive the
    transaction that deletes the rows)."""

    transfer_sets: list[Owned] = field(default_factory=list)  # the tenant's and, via galleries, any
    curated_jobs: list[Owned] = field(default_factory=list)  # training jobs with a curate stage of it
    galleries: list[GalleryRef] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.transfer_sets or self.curated_jobs or self.galleries)

    def listing(self, tenant_id: str) -> dict[str, Any]:
        """The ``dependents`` of a refusal: ids of the tenant's own things, a count of the others'
        (another tenant's ids are not ours to show)."""
        own_sets = [ts.id for ts in self.transfer_sets if ts.tenant_id == tenant_id]
        own_jobs = [job.id for job in self.curated_jobs if job.tenant_id == tenant_id]
        return {
            "transfer_sets": own_sets,
            "jobs": own_jobs,
            "galleries": [{"id": g.id, "name": g.name} for g in self.galleries],
            "other_tenants": len(self.transfer_sets) - len(own_sets) + len(self.curated_jobs) - len(own_jobs),
        }

    def describe(self, tenant_id: str) -> str:
        """What shows the images, as a phrase: "transfer sets 'a', galleries 'g' (built from it)"."""
        listed = self.listing(tenant_id)
        parts = []
        if listed["transfer_sets"]:
            parts.append(f"transfer sets {_ids(listed['transfer_sets'])}")
        if listed["jobs"]:
            parts.append(f"the transfer sets that jobs {_ids(listed['jobs'])} curated from it")
        if listed["galleries"]:
            parts.append(f"galleries {_ids([g['name'] for g in listed['galleries']])} (built from it)")
        if listed["other_tenants"]:
            parts.append(
                f"{listed['other_tenants']} transfer set(s) of other tenants curated from those galleries"
            )
        if len(parts) < 2:
            return "".join(parts)
        return ", ".join(parts[:-1]) + " and " + parts[-1]


def _ids(values: list[str]) -> str:
    shown = ", ".join(repr(v) for v in values[:LISTED])
    return shown + (f" and {len(values) - LISTED} more" if len(values) > LISTED else "")


def galleries_built_from(session: Session, images: Path) -> list[GalleryRef]:
    """The galleries one of whose sources is the folder ``images`` (as their ``gallery.json`` says)."""
    target = images.resolve()
    found = []
    for gallery in session.scalars(select(Gallery).order_by(Gallery.name)):
        if any(_same(source, target) for source in gallery_sources(gallery.path)):
            found.append(GalleryRef(gallery.id, gallery.name, gallery.path))
    return found


def _same(source: str, target: Path) -> bool:
    try:
        return Path(source).resolve() == target
    except OSError:
        return False


def find_derived(session: Session, settings: Settings, dataset: Dataset) -> Derived:
    images = storage.dataset_dir(settings.data_dir, dataset.tenant_id, dataset.id) / "images"
    galleries = galleries_built_from(session, images)
    gallery_ids = [g.id for g in galleries]
    sets = session.scalars(
        select(TransferSet)
        .where(or_(TransferSet.dataset_id == dataset.id, TransferSet.gallery_id.in_(gallery_ids)))
        .order_by(TransferSet.created_at, TransferSet.id)
    ).all()
    reads_it = (Job.tenant_id == dataset.tenant_id) & (
        Job.params[("request", "dataset_id")].as_string() == dataset.id
    )
    curated_from = Job.params[("request", "gallery_id")].as_string().in_(gallery_ids)
    candidates = session.scalars(
        select(Job)
        .where(Job.kind == "pipeline", or_(reads_it, curated_from))
        .order_by(Job.created_at, Job.id)
    ).all()
    curated = [Owned(job.id, job.tenant_id) for job in candidates if curated_dir(settings, job.id).exists()]
    return Derived(
        transfer_sets=[Owned(ts.id, ts.tenant_id, ts.job_id) for ts in sets],
        curated_jobs=curated,
        galleries=galleries,
    )


def unfinished_users(session: Session, derived: Derived) -> list[Job]:
    """Queued or running jobs that read one of ``derived``'s transfer sets or galleries (curating
    from a gallery, training on a set): removing their input under them would fail them midway."""
    set_ids = [ts.id for ts in derived.transfer_sets]
    gallery_ids = [g.id for g in derived.galleries]
    set_jobs = [ts.job_id for ts in derived.transfer_sets if ts.job_id]
    if not (set_ids or gallery_ids):
        return []
    request = Job.params
    return list(
        session.scalars(
            select(Job).where(
                Job.status.in_(UNFINISHED),
                or_(
                    request[("request", "transfer_set_id")].as_string().in_(set_ids),
                    request[("request", "gallery_id")].as_string().in_(gallery_ids),
                    Job.id.in_(set_jobs),
                ),
            )
        )
    )


def delete_rows(session: Session, derived: Derived) -> None:
    """Delete the transfer sets, their curation jobs and the galleries (in the caller's transaction)."""
    set_ids = [ts.id for ts in derived.transfer_sets]
    curation_jobs = [ts.job_id for ts in derived.transfer_sets if ts.job_id]
    if set_ids:
        session.execute(delete(TransferSet).where(TransferSet.id.in_(set_ids)), execution_options=_NO_SYNC)
    if curation_jobs:
        session.execute(
            delete(Job).where(Job.id.in_(curation_jobs), Job.kind == "curate"), execution_options=_NO_SYNC
        )
    if derived.galleries:
        ids = [g.id for g in derived.galleries]
        session.execute(delete(Gallery).where(Gallery.id.in_(ids)), execution_options=_NO_SYNC)


_NO_SYNC = {"synchronize_session": False}


def remove_files(settings: Settings, derived: Derived) -> None:
    """After the commit: the curation jobs' folders, the curate stages of training jobs, and the
    galleries' folders inside the data dir (a gallery registered from elsewhere keeps its files,
    which are not the service's; only its row is gone)."""
    for ts in derived.transfer_sets:
        if ts.job_id:
            storage.remove_tree(job_dir(settings, ts.job_id))
    for job in derived.curated_jobs:
        storage.remove_tree(curated_dir(settings, job.id))
    data_dir = Path(settings.data_dir)
    for gallery in derived.galleries:
        path = Path(gallery.path)
        if path.is_relative_to(data_dir) and path != data_dir:
            storage.remove_tree(path)
