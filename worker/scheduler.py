"""Which queued job a free worker starts next: fair across tenants, each tenant's running jobs capped.

The job rows decide, not the order of the broker's messages. A ``kt.run_job`` message only wakes a
worker on its queue; whatever id it carries, the worker asks ``claim_next`` for the job to start,
and when that job ends it asks again before taking another message (``worker.tasks``). So 90 jobs
one tenant queued first do not run before a job another tenant queued later.

The order, among the tenants with a job waiting on the queue (``queued``, not waiting out a
retry's backoff, ``jobs.run_after``) and fewer running jobs than their cap
(``KT_MAX_RUNNING_JOBS_PER_TENANT`` or the tenant's own, ``service.quotas``):

1. fewest running jobs first;
2. then the tenant whose last job start (``tenants.last_started_at``) is oldest, never first: a
   round robin, so with one worker tenants take turns;
3. then the tenant with the oldest waiting job; within a tenant, its oldest job first.

Each try is one short transaction: the tenant row locked (``quotas.lock_tenant``), its running jobs
counted again under that lock (two workers cannot both take its last slot), its oldest waiting
job selected ``FOR UPDATE SKIP LOCKED`` on PostgreSQL (a row another worker or the API holds is
passed over, never waited for; SQLite's write lock serializes claims instead), set ``running`` by
a conditional UPDATE, and the tenant's ``last_started_at`` set. A tenant at its cap, or whose job
was just taken by another worker, is skipped for the next one in the order.

A pipeline job whose stages run on different queues (``KT_STAGE_QUEUES``) is a chain of stage tasks:
between two of them it waits ``queued`` on the next stage's queue, marked as handed off
(``HANDOFF`` in its params, ``waiting_stage``). Whoever takes it there, the chain's next link
(``claim_stage``) or a worker asking for the next job on that queue (``claim_next``), continues the
same attempt (its count of attempts is not raised) under the same cap and in the same fair order.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service import quotas
from service.api.errors import Conflict
from service.db.models import Job, Tenant, utcnow
from service.settings import Settings

log = logging.getLogger(__name__)

_NEVER = datetime.min.replace(tzinfo=timezone.utc)

# ``jobs.params`` key of a pipeline job handed off between two of its stage tasks (``worker.runner``):
# {"stage", "queue", "attempt", "retries", "at", "state": "queued" until a worker takes it, then "claimed"}
HANDOFF = "handoff"


def waiting_stage(job: Job) -> str | None:
    """The stage a queued job waits to go on at, when its last stage task handed it off to the next
    one (the same attempt goes on); ``None`` for a job to start, or start again as a new attempt. A
    mark left by an attempt that was since taken for lost or retried (``POST /v1/jobs/{id}/retry``
    counts ``retries``) no longer counts."""
    params = job.params or {}
    mark = params.get(HANDOFF)
    if job.status != "queued" or not isinstance(mark, dict) or mark.get("state") != "queued":
        return None
    if mark.get("attempt") != job.attempts or mark.get("retries") != int(params.get("retries") or 0):
        return None
    stage = mark.get("stage")
    return stage if isinstance(stage, str) else None


def continues_at(job: Job) -> str | None:
    """The stage a job just claimed goes on at, when it was claimed as a continuation of its chain
    (``waiting_stage`` when it was claimed); ``None`` for a new attempt."""
    mark = (job.params or {}).get(HANDOFF)
    if job.status != "running" or not isinstance(mark, dict) or mark.get("state") != "claimed":
        return None
    return mark.get("stage") if mark.get("attempt") == job.attempts else None


def waiting(queue: str, now: datetime) -> list[ColumnElement[bool]]:
    """The jobs a worker on ``queue`` may start now: queued there, past any retry backoff, and
    not asked to cancel (``cancel_stale_queued`` finishes those)."""
    return [
        Job.status == "queued",
        Job.queue == queue,
        Job.cancel_requested.is_(False),
        or_(Job.run_after.is_(None), Job.run_after <= now),
    ]


def tenant_order(session: Session, settings: Settings, queue: str, now: datetime) -> list[str]:
    """The tenants with a job to start on ``queue``, below their running cap, in the order they
    are served (see the module docstring)."""
    oldest = dict(
        session.execute(
            select(Job.tenant_id, func.min(Job.created_at))
            .where(*waiting(queue, now))
            .group_by(Job.tenant_id)
        ).all()
    )
    if not oldest:
        return []
    ids = sorted(oldest)
    running: dict[str, int] = dict(
        session.execute(  # type: ignore[arg-type]
            select(Job.tenant_id, func.count())
            .where(Job.status == "running", Job.tenant_id.in_(ids))
            .group_by(Job.tenant_id)
        ).all()
    )
    rows = session.execute(
        select(Tenant.id, Tenant.last_started_at, Tenant.max_running_jobs).where(Tenant.id.in_(ids))
    ).all()
    candidates: list[tuple[int, datetime, datetime, str]] = []
    for tenant_id, last_started, own_cap in rows:
        cap = quotas.limits_for(settings, own_cap, None, None).running_jobs
        busy = running.get(tenant_id, 0)
        if cap == 0 or busy < cap:
            candidates.append((busy, last_started or _NEVER, oldest[tenant_id], tenant_id))
    return [tenant_id for *_, tenant_id in sorted(candidates)]


def cancel_stale_queued(session_factory: sessionmaker[Session], now: datetime) -> None:
    """Finish the queued jobs that were asked to cancel (a requeue that raced a cancel request):
    nothing would otherwise start or end them."""
    with session_factory() as session:
        session.execute(
            update(Job)
            .where(Job.status == "queued", Job.cancel_requested.is_(True))
            .values(status="canceled", finished_at=now, eta_s=None)
        )
        session.commit()


def claim_for_tenant(
    session_factory: sessionmaker[Session],
    settings: Settings,
    tenant_id: str,
    queue: str,
    now: datetime,
    *,
    job_id: str | None = None,
    stage: str | None = None,
) -> Job | None:
    """Start the tenant's oldest waiting job on ``queue`` (the row set ``running``, its attempt
    counted, heartbeat fresh), unless the tenant is at its running cap or another worker took the
    job first: then ``None``. ``job_id``: that job only; ``stage``: only if it waits to go on at
    that stage (``waiting_stage``). A job handed off between two stage tasks goes on as the same
    attempt (not counted again)."""
    with session_factory() as session:
        try:
            limits = quotas.lock_tenant(session, settings, tenant_id)
        except Conflict:  # the tenant was deleted meanwhile (its jobs with it)
            return None
        if limits.running_jobs and quotas.count_jobs(session, tenant_id, "running") >= limits.running_jobs:
            session.rollback()
            return None
        pick = select(Job).where(Job.tenant_id == tenant_id, *waiting(queue, now))
        if job_id is not None:
            pick = pick.where(Job.id == job_id)
        pick = pick.order_by(Job.created_at, Job.id).limit(1)
        if session.get_bind().dialect.name != "sqlite":
            pick = pick.with_for_update(skip_locked=True, of=Job)
        job = session.scalars(pick).first()
        goes_on = None if job is None else waiting_stage(job)
        if job is None or (stage is not None and goes_on != stage):
            session.rollback()
            return None
        values: dict[str, Any] = {
            "status": "running",
            "attempts": Job.attempts + 1,
            "started_at": job.started_at or now,
            "heartbeat_at": now,
            "run_after": None,
            "error": None,
        }
        if goes_on is not None:  # the next stage task of the same attempt
            mark = {**job.params[HANDOFF], "state": "claimed"}
            values.update(attempts=Job.attempts, params={**job.params, HANDOFF: mark})
        taken = session.execute(update(Job).where(Job.id == job.id, Job.status == "queued").values(**values))
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            return None
        session.execute(update(Tenant).where(Tenant.id == tenant_id).values(last_started_at=now))
        session.commit()
        session.refresh(job)
        return job


def claim_next(session_factory: sessionmaker[Session], settings: Settings, queue: str) -> Job | None:
    """Start the next job on ``queue`` in the fair order (see the module docstring); ``None`` when
    no tenant has one this worker may start now."""
    now = utcnow()
    cancel_stale_queued(session_factory, now)
    with session_factory() as session:
        order = tenant_order(session, settings, queue, now)
    for tenant_id in order:
        job = claim_for_tenant(session_factory, settings, tenant_id, queue, now)
        if job is not None:
            log.info(
                "job %s of tenant %s started (fair order: %d tenant(s) waiting)",
                job.id,
                tenant_id,
                len(order),
            )
            return job
    return None


def claim_stage(
    session_factory: sessionmaker[Session], settings: Settings, job_id: str, stage: str, queue: str
) -> Job | None:
    """Go on with job ``job_id`` at ``stage`` on ``queue`` (a link of its chain of stage tasks), if
    it waits there for that stage (``waiting_stage``) and its tenant is below its running cap;
    otherwise ``None`` (canceled meanwhile, taken by another worker, or its tenant at its cap: then
    a worker asking ``claim_next`` on that queue takes it in the fair order)."""
    now = utcnow()
    with session_factory() as session:
        job = session.get(Job, job_id)
        if job is None or waiting_stage(job) != stage or job.queue != queue:
            return None
        tenant_id = job.tenant_id
    return claim_for_tenant(session_factory, settings, tenant_id, queue, now, job_id=job_id, stage=stage)
