"""The service's tables (SQLAlchemy 2 typed ORM).

Portable across SQLite (embedded default) and PostgreSQL (production): ids are 32-char
``uuid4().hex`` strings, JSON columns use ``sqlalchemy.JSON``, timestamps are timezone-aware UTC.
Constraint names follow ``NAMING_CONVENTION`` so Alembic autogenerate is stable on both backends.
Every tenant-owned table carries ``tenant_id`` and an index on ``(tenant_id, created_at)`` for
listings. Deleting a tenant deletes what it owns (``ON DELETE CASCADE``).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any, Literal, get_args

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID_LENGTH = 32
API_KEY_PREFIX_LENGTH = 8

DatasetStatus = Literal["uploading", "ready", "failed"]
TransferSetStatus = Literal["queued", "running", "ready", "failed"]
JobKind = Literal["pipeline", "curate", "build_gallery"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]

DATASET_STATUSES: tuple[str, ...] = get_args(DatasetStatus)
TRANSFER_SET_STATUSES: tuple[str, ...] = get_args(TransferSetStatus)
JOB_KINDS: tuple[str, ...] = get_args(JobKind)
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
JOB_FINAL_STATUSES: tuple[str, ...] = ("succeeded", "failed", "canceled")


def new_id() -> str:
    """A fresh public id: 32 lowercase hex chars."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that always hands back aware UTC datetimes. SQLite has no
    time zone type and returns naive values; this stores UTC and re-attaches the zone on load."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware one (datetime.now(timezone.utc))")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        datetime: UTCDateTime,
        dict[str, Any]: JSON,
        list[Any]: JSON,
    }


def _id_column() -> Mapped[str]:
    return mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)


def _created_at_column() -> Mapped[datetime]:
    return mapped_column(UTCDateTime, default=utcnow, nullable=False)


def _tenant_fk() -> Mapped[str]:
    return mapped_column(String(ID_LENGTH), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False)


class Tenant(Base):
    """A tenant. The ``max_*`` columns override the service-wide quotas (``KT_MAX_*_PER_TENANT``)
    for this tenant (``None``: the setting's; 0: no limit); ``kt admin set-limits`` writes them.
    ``last_started_at`` is when a worker last started one of its jobs: the fair scheduler
    (``worker.scheduler``) serves the tenant that waited longest among those with fewest running."""

    __tablename__ = "tenants"

    id: Mapped[str] = _id_column()
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = _created_at_column()
    max_running_jobs: Mapped[int | None] = mapped_column(Integer, default=None)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer, default=None)
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    last_started_at: Mapped[datetime | None] = mapped_column(default=None)


class ApiKey(Base):
    """An API key, stored hashed. ``prefix`` (its first characters) finds candidate rows; the
    sha256 ``key_hash`` decides."""

    __tablename__ = "api_keys"

    id: Mapped[str] = _id_column()
    tenant_id: Mapped[str] = _tenant_fk()
    prefix: Mapped[str] = mapped_column(String(API_KEY_PREFIX_LENGTH), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = _created_at_column()
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    # may call the /v1/admin routes (build galleries); `python -m service.admin create-key --admin`
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    __table_args__ = (Index("ix_api_keys_tenant_id_created_at", "tenant_id", "created_at"),)


class Dataset(Base):
    """A labeled image dataset uploaded by a tenant: class folders, or image + mask pairs."""

    __tablename__ = "datasets"

    id: Mapped[str] = _id_column()
    tenant_id: Mapped[str] = _tenant_fk()
    name: Mapped[str] = mapped_column(String(200))
    # classification (image folders) or segmentation (images/ + masks/ + classes.json)
    task: Mapped[str] = mapped_column(String(16), default="classification", server_default="classification")
    status: Mapped[str] = mapped_column(String(16), default="uploading")
    num_images: Mapped[int] = mapped_column(Integer, default=0)
    classes: Mapped[list[Any]] = mapped_column(JSON, default=list)
    class_counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = _created_at_column()

    __table_args__ = (Index("ix_datasets_tenant_id_created_at", "tenant_id", "created_at"),)


class Gallery(Base):
    """A shared retrieval gallery (embedded unlabeled images + an index); not tenant-owned."""

    __tablename__ = "galleries"

    id: Mapped[str] = _id_column()
    name: Mapped[str] = mapped_column(String(200), unique=True)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer, default=0)
    encoder: Mapped[str] = mapped_column(String(200))
    index_kind: Mapped[str] = mapped_column(String(64))
    dim: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = _created_at_column()


class Job(Base):
    """A unit of long work. This row is the source of truth; Celery only carries its id."""

    __tablename__ = "jobs"

    id: Mapped[str] = _id_column()
    tenant_id: Mapped[str] = _tenant_fk()
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    stage: Mapped[str | None] = mapped_column(String(64), default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    eta_s: Mapped[float | None] = mapped_column(Float, default=None)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    stage_timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # the Celery queue the job is sent to (again, when the reaper requeues it): "cpu" or "gpu"
    queue: Mapped[str] = mapped_column(String(16), default="cpu", server_default="cpu")
    # written by the worker holding a running job; a stale one means the worker is gone (the reaper)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    # a job waiting out a retry's backoff is not started before this (None: at once)
    run_after: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = _created_at_column()
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow, nullable=False)
    # job-finished notification (``service.webhooks``): where to POST, the HMAC key the request got
    # back at submit, and the delivery's state: ``waiting`` (job not final yet), ``sending`` (a
    # dispatcher holds it until ``webhook_next_at``), ``retrying`` (next try at ``webhook_next_at``),
    # ``delivered`` or ``failed``; ``webhook_delivery`` records the attempts
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)
    webhook_secret: Mapped[str | None] = mapped_column(String(64), default=None)
    webhook_state: Mapped[str | None] = mapped_column(String(16), default=None)
    webhook_next_at: Mapped[datetime | None] = mapped_column(default=None)
    webhook_delivery: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)

    __table_args__ = (
        Index("ix_jobs_tenant_id_created_at", "tenant_id", "created_at"),
        # workers and the reaper look for unfinished jobs by status
        Index("ix_jobs_status", "status"),
        # the webhook dispatcher looks for notifications to send by state
        Index("ix_jobs_webhook_state", "webhook_state"),
    )


class TransferSet(Base):
    """A curated transfer set: images retrieved from a gallery for a dataset."""

    __tablename__ = "transfer_sets"

    id: Mapped[str] = _id_column()
    tenant_id: Mapped[str] = _tenant_fk()
    dataset_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("datasets.id", ondelete="CASCADE"), index=True
    )
    gallery_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("galleries.id", ondelete="RESTRICT"), index=True
    )
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    size: Mapped[int] = mapped_column(Integer, default=0)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    manifest_path: Mapped[str | None] = mapped_column(Text, default=None)
    report_path: Mapped[str | None] = mapped_column(Text, default=None)
    job_id: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("jobs.id", ondelete="SET NULL"), default=None
    )
    created_at: Mapped[datetime] = _created_at_column()

    __table_args__ = (Index("ix_transfer_sets_tenant_id_created_at", "tenant_id", "created_at"),)


class Model(Base):
    """A trained student model: its card (classes, preprocessing, metrics, lineage) and files."""

    __tablename__ = "models"

    id: Mapped[str] = _id_column()
    tenant_id: Mapped[str] = _tenant_fk()
    job_id: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("jobs.id", ondelete="SET NULL"), index=True, default=None
    )
    card: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    files: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = _created_at_column()

    __table_args__ = (Index("ix_models_tenant_id_created_at", "tenant_id", "created_at"),)


class RegisteredModel(Base):
    """Teacher weights an operator registered (``kt admin register-model``): a safetensors file
    and its card, copied to ``<data_dir>/registry/<name>/``. ``tenant_id`` None: every tenant may
    use it; else only that tenant (to the others it does not exist)."""

    __tablename__ = "registered_models"

    id: Mapped[str] = _id_column()
    name: Mapped[str] = mapped_column(String(64), unique=True)
    arch: Mapped[str] = mapped_column(String(200))
    tenant_id: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("tenants.id", ondelete="CASCADE"), index=True, default=None
    )
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    card: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = _created_at_column()


class Worker(Base):
    """A Celery worker process that is (or was) alive: the one sign of life that does not depend
    on where the worker runs. It writes ``heartbeat_at`` every few seconds (``worker.liveness.WorkerBeat``)
    and names the job attempt it holds, so ``/readyz`` can tell whether any worker is alive and
    ``kt serve`` can hand back the job of a worker process it saw die (``service.workers``).
    A worker that stops cleanly deletes its row; one that dies leaves it (silent, or marked
    ``stopped_at`` with the cause by the supervisor that saw it)."""

    __tablename__ = "workers"

    id: Mapped[str] = _id_column()
    name: Mapped[str] = mapped_column(String(255))  # Celery's node name, e.g. kt-worker0@host
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = _created_at_column()
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, nullable=False)
    # the job attempt this process runs now (None when idle)
    job_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), default=None)
    attempt: Mapped[int | None] = mapped_column(Integer, default=None)
    stopped_at: Mapped[datetime | None] = mapped_column(default=None)
    stop_reason: Mapped[str | None] = mapped_column(Text, default=None)

    __table_args__ = (Index("ix_workers_host_pid", "host", "pid"),)


class UiSession(Base):
    """A login to the ``/ui`` pages: the cookie holds a random token, this row its sha256 (so the
    table gives no usable session to whoever reads it) and the API key it was opened with, which
    every page authenticates again (revoking the key ends its sessions). Logging out deletes the
    row; a row past ``expires_at`` is refused, and removed at the next login."""

    __tablename__ = "ui_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the cookie's token
    api_key_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("api_keys.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = _created_at_column()
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
