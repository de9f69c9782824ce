"""Per-tenant quotas: how many jobs a tenant may have waiting and running, and how many bytes its
datasets may hold, so that one tenant can neither flood the queue nor fill the disk.

Each limit is a setting (``KT_MAX_QUEUED_JOBS_PER_TENANT``, ``KT_MAX_RUNNING_JOBS_PER_TENANT``,
``KT_MAX_STORAGE_BYTES_PER_TENANT``) that a tenant's own ``tenants.max_*`` column overrides
(``kt admin set-limits``); 0 means no limit. The API checks the queued and storage limits when a job
is submitted (or retried) and when a dataset is stored, under a lock on the tenant row
(``lock_tenant``) held until the new row commits: two concurrent requests cannot together pass a
limit that each alone would not. The running limit is the scheduler's (``worker.scheduler``): a
tenant at it keeps its other jobs ``queued`` while free workers start other tenants' jobs.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session

from service.api.errors import Conflict, QuotaExceeded, TooLarge
from service.db.models import Dataset, Job, Tenant
from service.settings import Settings

# Retry-After of a submission refused for the queued-jobs limit: jobs take minutes, so polling
# faster only spends the rate limit.
QUEUE_FULL_RETRY_AFTER_S = 60
SETTING = {
    "running_jobs": "KT_MAX_RUNNING_JOBS_PER_TENANT",
    "queued_jobs": "KT_MAX_QUEUED_JOBS_PER_TENANT",
    "storage_bytes": "KT_MAX_STORAGE_BYTES_PER_TENANT",
}


@dataclass(frozen=True)
class Limits:
    """A tenant's limits in force (0: none), and which of them the tenant's own row sets."""

    running_jobs: int
    queued_jobs: int
    storage_bytes: int
    own: frozenset[str] = frozenset()

    def source(self, name: str) -> str:
        """Where limit ``name`` comes from, for messages: who can change it."""
        return "set for this tenant by the operator" if name in self.own else SETTING[name]


def limits_for(settings: Settings, running: int | None, queued: int | None, storage: int | None) -> Limits:
    """The limits of a tenant whose row holds these overrides (``None``: the setting's)."""
    own = {name for name, value in zip(SETTING, (running, queued, storage), strict=True) if value is not None}
    return Limits(
        running_jobs=settings.max_running_jobs_per_tenant if running is None else running,
        queued_jobs=settings.max_queued_jobs_per_tenant if queued is None else queued,
        storage_bytes=settings.max_storage_bytes_per_tenant if storage is None else storage,
        own=frozenset(own),
    )


def _overrides(tenant_id: str) -> Select[int | None, int | None, int | None]:
    return select(Tenant.max_running_jobs, Tenant.max_queued_jobs, Tenant.max_storage_bytes).where(
        Tenant.id == tenant_id
    )


def tenant_limits(session: Session, settings: Settings, tenant_id: str) -> Limits:
    """The tenant's limits, read without a lock (for a cheap early refusal, and for reports)."""
    row = session.execute(_overrides(tenant_id)).first()
    if row is None:
        raise Conflict(f"Tenant {tenant_id!r} no longer exists; ask the operator for a new API key.")
    running, queued, storage = row
    return limits_for(settings, running, queued, storage)


def lock_tenant(session: Session, settings: Settings, tenant_id: str) -> Limits:
    """Lock the tenant row until the session's transaction ends, and return its limits: what is
    counted after this and written before the commit is one step for every other request or worker
    that locks it. PostgreSQL: ``SELECT ... FOR NO KEY UPDATE`` (it does not wait for, nor block,
    the key-share locks that inserting a job or dataset of the tenant takes). SQLite has no row
    locks: a no-op ``UPDATE`` takes the database's write lock, held until the commit."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name))
        row = session.execute(_overrides(tenant_id)).first()
    else:
        row = session.execute(_overrides(tenant_id).with_for_update(key_share=True)).first()
    if row is None:
        session.rollback()
        raise Conflict(f"Tenant {tenant_id!r} no longer exists; ask the operator for a new API key.")
    running, queued, storage = row
    return limits_for(settings, running, queued, storage)


def count_jobs(session: Session, tenant_id: str, status: str) -> int:
    return int(
        session.scalar(
            select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status == status)
        )
        or 0
    )


def stored_bytes(session: Session, tenant_id: str) -> int:
    """Bytes of images the tenant's datasets hold on disk (``datasets.bytes``, summed)."""
    return int(session.scalar(select(func.sum(Dataset.bytes)).where(Dataset.tenant_id == tenant_id)) or 0)


def human_bytes(n: int) -> str:
    """``n`` bytes the way people read them: ``512 B``, ``3.4 MiB``, ``20.0 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def check_queue_room(session: Session, settings: Settings, tenant: Tenant, adding: int = 1) -> None:
    """Lock the tenant (``lock_tenant``) and refuse, with 429 and ``Retry-After``, ``adding`` more
    queued jobs past its queued-jobs limit. On refusal the transaction is rolled back: nothing of
    the request is written. The caller commits (releasing the lock) right after adding its job."""
    limits = lock_tenant(session, settings, tenant.id)
    if limits.queued_jobs == 0:
        return
    queued = count_jobs(session, tenant.id, "queued")
    if queued + adding <= limits.queued_jobs:
        return
    running = count_jobs(session, tenant.id, "running")
    session.rollback()
    cap = f"at most {limits.running_jobs} run at once" if limits.running_jobs else "no cap on running jobs"
    raise QuotaExceeded(
        f"Tenant {tenant.name!r} already has {queued} queued job(s), its limit of "
        f"{limits.queued_jobs} ({limits.source('queued_jobs')}), and {running} running ({cap}); "
        "nothing was created. Wait for queued jobs to start (`GET /v1/jobs?status=queued` lists them) "
        f"and submit again (retry after {QUEUE_FULL_RETRY_AFTER_S} s), or cancel one you no longer need "
        "(`POST /v1/jobs/{id}/cancel`).",
        retry_after_s=QUEUE_FULL_RETRY_AFTER_S,
    )


def _storage_advice(limits: Limits) -> str:
    where = "ask the operator" if "storage_bytes" in limits.own else f"raise {SETTING['storage_bytes']}"
    return (
        "Delete datasets you no longer need (`GET /v1/datasets` lists them with their bytes; "
        f"`DELETE /v1/datasets/{{id}}`) and upload again, or {where} for a larger quota."
    )


def refuse_if_storage_full(session: Session, settings: Settings, tenant: Tenant) -> None:
    """413 before an upload is read when the tenant's datasets already fill its storage quota (no
    dataset can fit); a read without a lock: ``check_storage_room`` decides at the commit."""
    limits = tenant_limits(session, settings, tenant.id)
    if limits.storage_bytes == 0:
        return
    used = stored_bytes(session, tenant.id)
    session.rollback()  # end the read transaction: the upload that follows may take long
    if used >= limits.storage_bytes:
        raise TooLarge(
            f"Tenant {tenant.name!r}'s datasets already hold {human_bytes(used)} ({used} bytes), its "
            f"storage quota of {human_bytes(limits.storage_bytes)} ({limits.source('storage_bytes')}); "
            f"the upload was not read. {_storage_advice(limits)}"
        )


def check_storage_room(session: Session, settings: Settings, tenant: Tenant, adding: int) -> None:
    """Lock the tenant (``lock_tenant``) and refuse, with 413, a dataset of ``adding`` bytes that
    would take its datasets past its storage quota (the transaction is rolled back; the caller
    removes the dataset's files). The caller commits the dataset row right after."""
    limits = lock_tenant(session, settings, tenant.id)
    if limits.storage_bytes == 0:
        return
    used = stored_bytes(session, tenant.id)
    if used + adding <= limits.storage_bytes:
        return
    session.rollback()
    raise TooLarge(
        f"This dataset ({human_bytes(adding)}, {adding} bytes of images) does not fit in tenant "
        f"{tenant.name!r}'s storage quota of {human_bytes(limits.storage_bytes)} "
        f"({limits.source('storage_bytes')}): its datasets already hold {human_bytes(used)} ({used} bytes); "
        f"nothing was kept. {_storage_advice(limits)}"
    )
