"""``/ui``: server-rendered pages over the same tables and files as the JSON API.

Jobs (live status), a job (stage timeline, loss and accuracy curves, test metrics with per-class
accuracy and the confusion matrix), transfer sets (the curation report ``kt_train`` wrote, served
as is), models (the card, download buttons) and datasets (per-class counts, thumbnails). Every
page is the tenant's own: an id of another tenant is a 404 page, a missing login a redirect.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from kt_train.recipe import BUDGETS, DEFAULT_BUDGET
from service import estimates, quotas, storage
from service.api.deps import SessionDep, SettingsDep
from service.api.errors import Invalid, UserError, readable_errors
from service.api.routes.datasets import store_dataset
from service.api.routes.jobs import (
    PIPELINE_STAGES,
    RETRYABLE_STATUSES,
    cancel_job,
    create_job,
    job_dir,
    retry_job,
)
from service.api.routes.models import EXPORT_FORMATS
from service.api.routes.transfer_sets import REPORT_HEADERS, create_transfer_set, curate_dir
from service.api.routes.transfer_sets import _sync as sync_transfer_set
from service.db.models import (
    JOB_FINAL_STATUSES,
    Dataset,
    Gallery,
    Job,
    Model,
    RegisteredModel,
    Tenant,
    TransferSet,
)
from service.queue import queue_for
from service.redact import Redactor, public_copy, session_redactor
from service.registry import visible_to
from service.schemas import ExportFormat, JobCreate, TransferSetCreate
from service.settings import Settings
from service.thumbnails import thumb_path, thumbnails
from service.ui.auth import (
    COOKIE_MAX_AGE_S,
    COOKIE_NAME,
    COOKIE_PATH,
    FORM_TOKEN_FIELD,
    LEGACY_COOKIE_NAME,
    FormRefused,
    LoginRequired,
    PageNotFound,
    TooManyRequests,
    UiTenant,
    authenticate,
    close_session,
    form_token,
    form_token_matches,
    login_url,
    open_session,
    safe_next,
)
from service.ui.charts import Chart, line_chart
from service.uploads import receive_upload, remove_upload, upload_gate

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(prefix="/ui", include_in_schema=False)

CROSS_SITE = "This form was sent from another site; open this page here and send it again."
STALE_FORM = (
    "This form does not belong to your current session (it was opened before you logged in again, "
    "or sent from elsewhere); reload the page and send it again."
)
TRAINING_STAGES = ("finetune_teacher", "distill", "finetune_student")
THUMBS_PER_CLASS = 8
THUMB_PX = 96
LIST_LIMIT = 200
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Pages: own scripts and styles inline only, images from here or data: URIs, frames from here.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; frame-src 'self'; frame-ancestors 'self'; form-action 'self'"
)
HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "Cache-Control": "no-store",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}


def _page(
    request: Request, template: str, status_code: int = 200, tenant: Tenant | None = None, **ctx: Any
) -> HTMLResponse:
    token = request.cookies.get(COOKIE_NAME)
    csrf = form_token(token) if tenant is not None and token else ""
    return templates.TemplateResponse(
        request,
        template,
        {"tenant": tenant, "csrf": csrf, "csrf_field": FORM_TOKEN_FIELD, **ctx},
        status_code=status_code,
        headers=HEADERS,
    )


def _check_form(request: Request, csrf: str | None) -> None:
    """Every form that changes something: sent from our own pages (``Origin``, as the login form
    checks it) and carrying the session's form token (``service.ui.auth.form_token``)."""
    if _cross_site(request):
        raise FormRefused(CROSS_SITE)
    if not form_token_matches(request, csrf):
        raise FormRefused(STALE_FORM)


def _form_error(err: Exception) -> tuple[str, int]:
    """(message, status) of a refused submission, as the JSON API would answer it."""
    if isinstance(err, ValidationError):
        return f"Invalid request: {readable_errors(err.errors())}", 422
    assert isinstance(err, UserError)
    return str(err), err.status_code


CsrfField = Annotated[str | None, Form(alias=FORM_TOKEN_FIELD, max_length=200)]


# --------------------------------------------------------------------------- login


@router.get("", response_class=RedirectResponse)
@router.get("/", response_class=RedirectResponse)
def home() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=303)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]", "testserver"})


def _over_https(request: Request) -> bool:
    """Whether the browser talks https to us (directly or through a TLS-terminating proxy), or to a
    loopback address, where browsers keep ``Secure`` cookies over plain http too."""
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https" or request.url.hostname in LOOPBACK_HOSTS


def _cross_site(request: Request) -> bool:
    """A form posted from another site (a login CSRF: logging the victim in with the attacker's
    key); ``SameSite=Strict`` guards the pages, this guards the login and logout forms."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin == "null"
    hosts = {
        request.headers.get("host", ""),
        request.headers.get("x-forwarded-host", "").split(",")[0].strip(),
    }
    return origin.split("://", 1)[-1].rstrip("/") not in hosts - {""}


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "") -> HTMLResponse:
    return _page(request, "login.html", next=safe_next(next), insecure=not _over_https(request))


@router.post("/login", response_class=HTMLResponse)
async def login(
    request: Request, api_key: Annotated[str, Form(max_length=200)], next: Annotated[str, Form()] = ""
) -> Response:
    if _cross_site(request):
        return _page(request, "login.html", status_code=403, next="/ui/jobs", error=CROSS_SITE)
    key = api_key.strip()
    try:
        await authenticate(request, key)
        token = await run_in_threadpool(open_session, request.app.state.session_factory, key)
    except HTTPException as err:
        page = _page(
            request, "login.html", status_code=err.status_code, next=safe_next(next), error=err.detail
        )
        if err.headers and "Retry-After" in err.headers:
            page.headers["Retry-After"] = err.headers["Retry-After"]
        return page
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=COOKIE_MAX_AGE_S,
        path=COOKIE_PATH,
        secure=True,
        httponly=True,
        samesite="strict",
    )
    _forget_legacy_cookie(request, response)
    return response


def _forget_legacy_cookie(request: Request, response: Response) -> None:
    """Clear the cookie of older versions, which held the API key itself."""
    if LEGACY_COOKIE_NAME in request.cookies:
        response.delete_cookie(
            LEGACY_COOKIE_NAME, path=COOKIE_PATH, secure=True, httponly=True, samesite="strict"
        )


@router.post("/logout", response_class=RedirectResponse)
def logout(request: Request) -> Response:
    """End the session: its row is deleted (so the cookie is dead wherever it was copied), then
    the cookie is cleared."""
    if _cross_site(request):
        return _page(request, "error.html", status_code=403, title="Forbidden", message=CROSS_SITE)
    token = request.cookies.get(COOKIE_NAME)
    if token:
        close_session(request.app.state.session_factory, token)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE_NAME, path=COOKIE_PATH, secure=True, httponly=True, samesite="strict")
    _forget_legacy_cookie(request, response)
    return response


@router.get("/static/style.css")
def stylesheet() -> FileResponse:
    return FileResponse(HERE / "static" / "style.css", media_type="text/css")


# --------------------------------------------------------------------------- jobs


def _owned(session: Session, model: Any, tenant: Tenant, item_id: str) -> Any:
    row = session.get(model, item_id) if len(item_id) <= 64 else None
    if row is None or row.tenant_id != tenant.id:
        raise PageNotFound(item_id)
    return row


def _jobs(session: Session, tenant: Tenant) -> list[Job]:
    return list(
        session.scalars(
            select(Job)
            .where(Job.tenant_id == tenant.id)
            .order_by(Job.created_at.desc(), Job.id)
            .limit(LIST_LIMIT)
        ).all()
    )


def _pct(progress: float | None) -> int:
    return max(0, min(100, round((progress or 0.0) * 100)))


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, session: SessionDep, tenant: UiTenant) -> HTMLResponse:
    jobs = _jobs(session, tenant)
    live = any(j.status not in JOB_FINAL_STATUSES for j in jobs)
    return _page(request, "jobs.html", tenant=tenant, jobs=jobs, pct=_pct, live=live, section="jobs")


@router.get("/jobs/rows", response_class=HTMLResponse)
def jobs_rows(request: Request, session: SessionDep, tenant: UiTenant) -> HTMLResponse:
    """The table body of the jobs page (what its script polls every 2 s)."""
    jobs = _jobs(session, tenant)
    response = _page(request, "_job_rows.html", tenant=tenant, jobs=jobs, pct=_pct)
    response.headers["X-Jobs-Live"] = "1" if any(j.status not in JOB_FINAL_STATUSES for j in jobs) else "0"
    return response


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stage_names(job: Job) -> list[str]:
    if job.kind == "build_gallery":
        return ["build_gallery"]
    config = (job.params or {}).get("config") or {}
    stages = config.get("stages") if isinstance(config, dict) else None
    if isinstance(stages, list) and all(isinstance(s, str) for s in stages):
        return stages
    return list(PIPELINE_STAGES)


def _timeline(job: Job) -> list[dict[str, Any]]:
    timings = job.stage_timings or {}
    out = []
    for name in _stage_names(job):
        if name in timings:
            state = "done"
        elif job.stage == name and job.status == "running":
            state = "running"
        elif job.stage == name and job.status in ("failed", "canceled"):
            state = job.status
        else:
            state = "pending"
        seconds = timings.get(name)
        out.append(
            {"name": name, "state": state, "seconds": seconds if isinstance(seconds, int | float) else None}
        )
    return out


def _curves(settings: Settings, job: Job) -> list[dict[str, Any]]:
    """Per training stage: a loss chart and an accuracy chart, one series per training loop."""
    out = []
    for stage in TRAINING_STAGES:
        history = _read_json(job_dir(settings, job.id) / "run" / stage / "history.json")
        if not isinstance(history, dict) or not history:
            continue
        charts: list[Chart] = []
        for metric, label, scale in (("loss", "loss", 1.0), ("acc", "train accuracy %", 100.0)):
            series = {
                loop: [
                    (row["step"], row[metric] * scale)
                    for row in rows
                    if isinstance(row, dict)
                    and isinstance(row.get("step"), int | float)
                    and isinstance(row.get(metric), int | float)
                ]
                for loop, rows in history.items()
                if isinstance(rows, list)
            }
            if any(series.values()):
                charts.append(line_chart(f"{stage}: {label}", series))
        val = (job.metrics or {}).get(f"{stage}_val")
        scalars = (
            {k: v for k, v in val.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            if isinstance(val, dict)
            else {}
        )
        out.append({"stage": stage, "charts": charts, "val": scalars})
    return out


def _shade(count: int, row_total: int) -> str:
    share = count / row_total if row_total else 0.0
    return f"rgba(37, 99, 235, {0.08 + 0.8 * share:.2f})" if count else "transparent"


def _test_metrics(job: Job) -> list[dict[str, Any]]:
    test = (job.metrics or {}).get("test")
    if not isinstance(test, dict):
        return []
    out = []
    for role in ("student", "teacher"):
        m = test.get(role)
        if not isinstance(m, dict):
            continue
        classes = [str(c) for c in m.get("classes") or []]
        confusion = m.get("confusion") or []
        rows = []
        for i, cls in enumerate(classes):
            counts = confusion[i] if i < len(confusion) else []
            total = sum(counts)
            rows.append(
                {
                    "cls": cls,
                    "cells": [{"n": n, "bg": _shade(n, total), "diag": i == j} for j, n in enumerate(counts)],
                    "n": total,
                    "acc": (m.get("per_class") or {}).get(cls),
                }
            )
        out.append({"role": role, "top1": m.get("top1"), "n": m.get("n"), "classes": classes, "rows": rows})
    return out


def _teacher_specs(session: Session, tenant: Tenant) -> list[str]:
    """What the teacher fields suggest: the registered models the tenant may name, then the default."""
    rows = session.scalars(
        select(RegisteredModel).where(visible_to(tenant)).order_by(RegisteredModel.name).limit(LIST_LIMIT)
    ).all()
    return [f"timm:{row.arch}@registered:{row.name}" for row in rows] + [DEFAULT_TEACHER]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _job_facts(session: Session, tenant: Tenant, job: Job) -> list[dict[str, Any]]:
    """What the job trains (or curates) with: its models, budget and steps, as submitted (the
    request's model specs; the steps of the config the worker runs)."""
    params = job.params or {}
    request = _dict(params.get("request"))
    config = _dict(params.get("config"))
    facts: list[dict[str, Any]] = []

    def spec(role: str) -> Any:
        section = config.get(role)
        return request.get(role) or (section.get("model") if isinstance(section, dict) else None)

    if job.kind == "curate":
        facts.append(
            {
                "id": "job-teacher",
                "label": "Teacher",
                "value": spec("teacher") or "none (gallery similarity only)",
            }
        )
        if request.get("size"):
            facts.append(
                {"id": "job-size", "label": "Transfer set size", "value": f"{request['size']:,} requested"}
            )
        return facts
    if job.kind != "pipeline":
        return facts
    plan = estimates.plan_of(config)
    facts += [
        {"id": "job-teacher", "label": "Teacher", "value": spec("teacher") or ""},
        {"id": "job-student", "label": "Student", "value": spec("student") or ""},
        {"id": "job-budget", "label": "Budget", "value": request.get("budget") or "not recorded"},
        {
            "id": "job-distill-steps",
            "label": "Distillation steps",
            "value": f"{plan.steps['distill']:,} of {plan.batch_size['distill']} images",
        },
        {
            "id": "job-teacher-steps",
            "label": "Teacher finetune steps",
            "value": f"{plan.steps['finetune_teacher']:,}",
        },
    ]
    if plan.steps["finetune_student"]:
        facts.append(
            {
                "id": "job-student-steps",
                "label": "Student finetune steps",
                "value": f"{plan.steps['finetune_student']:,}",
            }
        )
    ts_id = request.get("transfer_set_id")
    ts = session.get(TransferSet, ts_id) if isinstance(ts_id, str) else None
    if ts is not None and ts.tenant_id == tenant.id:
        facts.append(
            {
                "id": "job-trained-on",
                "label": "Trained on",
                "value": f"transfer set {ts.id[:8]}",
                "href": f"/ui/transfer-sets/{ts.id}",
            }
        )
    return facts


def _job_page(
    request: Request,
    session: Session,
    settings: Settings,
    tenant: Tenant,
    job: Job,
    error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    models = session.scalars(select(Model).where(Model.job_id == job.id)).all()
    transfer_sets = session.scalars(
        select(TransferSet).where(TransferSet.job_id == job.id, TransferSet.tenant_id == tenant.id)
    ).all()
    request_params = (job.params or {}).get("request") or {}
    datasets = []
    for key in ("dataset_id", "test_dataset_id"):
        ds_id = request_params.get(key) if isinstance(request_params, dict) else None
        ds = session.get(Dataset, ds_id) if isinstance(ds_id, str) else None
        if ds is not None and ds.tenant_id == tenant.id:
            datasets.append((key.replace("_id", "").replace("_", " "), ds))
    has_report = not transfer_sets and (curate_dir(settings, job.id) / "report.html").is_file()
    return _page(
        request,
        "job.html",
        status_code=status_code,
        tenant=tenant,
        section="jobs",
        job=job,
        pct=_pct,
        live=job.status not in JOB_FINAL_STATUSES,
        timeline=_timeline(job),
        curves=_curves(settings, job),
        tests=_test_metrics(job),
        models=models,
        transfer_sets=transfer_sets,
        datasets=datasets,
        has_report=has_report,
        facts=_job_facts(session, tenant, job),
        can_cancel=job.status not in JOB_FINAL_STATUSES and not job.cancel_requested,
        can_retry=job.status in RETRYABLE_STATUSES,
        error=error,
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(
    request: Request, job_id: str, session: SessionDep, settings: SettingsDep, tenant: UiTenant
) -> HTMLResponse:
    return _job_page(request, session, settings, tenant, _owned(session, Job, tenant, job_id))


@router.post("/jobs/{job_id}/cancel", response_class=HTMLResponse)
def job_cancel(
    request: Request,
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    tenant: UiTenant,
    csrf: CsrfField = None,
) -> Response:
    """The job page's Cancel button: ``POST /v1/jobs/{id}/cancel``."""
    _check_form(request, csrf)
    job: Job = _owned(session, Job, tenant, job_id)
    try:
        cancel_job(job.id, session, tenant)
    except UserError as err:
        message, code = _form_error(err)
        session.refresh(job)
        return _job_page(request, session, settings, tenant, job, error=message, status_code=code)
    return RedirectResponse(f"/ui/jobs/{job.id}", status_code=303)


@router.post("/jobs/{job_id}/retry", response_class=HTMLResponse)
def job_retry(
    request: Request,
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    tenant: UiTenant,
    csrf: CsrfField = None,
) -> Response:
    """The job page's Retry button: ``POST /v1/jobs/{id}/retry`` (it resumes where it stopped)."""
    _check_form(request, csrf)
    job: Job = _owned(session, Job, tenant, job_id)
    try:
        retry_job(job.id, session, tenant, settings)
    except UserError as err:
        message, code = _form_error(err)
        session.rollback()
        session.refresh(job)
        return _job_page(request, session, settings, tenant, job, error=message, status_code=code)
    return RedirectResponse(f"/ui/jobs/{job.id}", status_code=303)


@router.get("/jobs/{job_id}/status.json")
def job_status(job_id: str, session: SessionDep, tenant: UiTenant) -> dict[str, Any]:
    """What the job page's script polls every 2 s while the job runs."""
    job: Job = _owned(session, Job, tenant, job_id)
    return {
        "status": job.status,
        "stage": job.stage,
        "progress": job.progress,
        "eta_s": job.eta_s,
        "final": job.status in JOB_FINAL_STATUSES,
    }


def _report_response(path: Path, redactor: Redactor) -> Response:
    """The report, from its copy that names no server path (``service.redact.public_copy``)."""
    if not path.is_file():
        raise PageNotFound(str(path.name))
    path = public_copy(path, redactor)
    return FileResponse(path, media_type="text/html; charset=utf-8", headers=REPORT_HEADERS)


@router.get("/jobs/{job_id}/transfer-set", response_class=HTMLResponse)
def job_transfer_set_page(
    request: Request, job_id: str, session: SessionDep, settings: SettingsDep, tenant: UiTenant
) -> HTMLResponse:
    """The transfer set a pipeline job curated in its own ``curate`` stage."""
    job: Job = _owned(session, Job, tenant, job_id)
    summary = _read_json(curate_dir(settings, job.id) / "summary.json") or {}
    if not (curate_dir(settings, job.id) / "report.html").is_file():
        raise PageNotFound(job_id)
    return _page(
        request,
        "transfer_set.html",
        tenant=tenant,
        section="transfer_sets",
        title=f"Transfer set of job {job.id[:8]}",
        ts=None,
        job=job,
        summary=summary if isinstance(summary, dict) else {},
        report_url=f"/ui/jobs/{job.id}/transfer-set/report",
    )


@router.get("/jobs/{job_id}/transfer-set/report", response_class=HTMLResponse)
def job_transfer_set_report(
    job_id: str, session: SessionDep, settings: SettingsDep, tenant: UiTenant
) -> Response:
    job: Job = _owned(session, Job, tenant, job_id)
    return _report_response(curate_dir(settings, job.id) / "report.html", session_redactor(settings, session))


# --------------------------------------------------------------------------- transfer sets


@router.get("/transfer-sets", response_class=HTMLResponse)
def transfer_sets_page(
    request: Request, session: SessionDep, settings: SettingsDep, tenant: UiTenant
) -> HTMLResponse:
    rows = session.scalars(
        select(TransferSet)
        .where(TransferSet.tenant_id == tenant.id)
        .order_by(TransferSet.created_at.desc(), TransferSet.id)
        .limit(LIST_LIMIT)
    ).all()
    rows = [sync_transfer_set(session, settings, ts) for ts in rows]
    return _page(request, "transfer_sets.html", tenant=tenant, section="transfer_sets", transfer_sets=rows)


TRAIN_FIELDS = ("teacher", "student", "budget", "test_dataset_id", "distill_steps", "teacher_steps",
                "full_finetune_steps", "image_size")  # fmt: skip
DEFAULT_STUDENT = str(JobCreate.model_fields["student"].default)
DEFAULT_TEACHER = str(JobCreate.model_fields["teacher"].default)


def _blank(value: Any) -> Any:
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def _recipe_steps(form: dict[str, Any]) -> dict[str, Any]:
    """The train form's optional step fields as ``JobCreate.recipe`` (unset: the budget's)."""
    return {
        "teacher": {
            "linear_probe_steps": _blank(form.get("teacher_steps")),
            "full_finetune_steps": _blank(form.get("full_finetune_steps")),
        },
        "distill": {"steps": _blank(form.get("distill_steps"))},
    }


def _train_request(ts: TransferSet, form: dict[str, Any]) -> dict[str, Any]:
    """The ``POST /v1/jobs`` body the train form stands for: train on exactly this transfer set."""
    body: dict[str, Any] = {
        "dataset_id": ts.dataset_id,
        "transfer_set_id": ts.id,
        "teacher": (form.get("teacher") or "").strip() or DEFAULT_TEACHER,
        "student": (form.get("student") or "").strip() or DEFAULT_STUDENT,
        "budget": form.get("budget") or DEFAULT_BUDGET,
        "recipe": _recipe_steps(form),
    }
    for key in ("test_dataset_id", "image_size"):
        if _blank(form.get(key)) is not None:
            body[key] = form[key]
    return body


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if _blank(value) is not None else None
    except (TypeError, ValueError):
        return None


def _train_estimate(session: Session, settings: Settings, form: dict[str, Any]) -> estimates.Estimate:
    """The estimate the train form shows for its current values (a field that is no number yet
    counts as unset: the submission itself says what is wrong with it)."""
    budget = form.get("budget") if form.get("budget") in BUDGETS else DEFAULT_BUDGET
    overrides = {
        "finetune_teacher": {
            "linear_probe": {"steps": _int_or_none(form.get("teacher_steps"))},
            "full_finetune": {"steps": _int_or_none(form.get("full_finetune_steps"))},
        },
        "distill": {"steps": _int_or_none(form.get("distill_steps"))},
    }
    return estimates.estimate(
        session,
        str(budget),
        overrides,
        teacher=(form.get("teacher") or "").strip() or DEFAULT_TEACHER,
        student=(form.get("student") or "").strip() or DEFAULT_STUDENT,
        evaluate=_blank(form.get("test_dataset_id")) is not None,
        queue=queue_for(None, settings),  # the form's jobs go to the default queue
    )


def _transfer_set_page(
    request: Request,
    session: Session,
    settings: Settings,
    tenant: Tenant,
    ts: TransferSet,
    form: dict[str, Any] | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    has_report = (
        ts.status == "ready" and ts.job_id and (curate_dir(settings, ts.job_id) / "report.html").is_file()
    )
    params = ts.params or {}
    form = dict(form or {})
    form.setdefault("teacher", params.get("teacher") or DEFAULT_TEACHER)
    form.setdefault("student", DEFAULT_STUDENT)
    form.setdefault("budget", DEFAULT_BUDGET)
    test_datasets = session.scalars(
        select(Dataset)
        .where(Dataset.tenant_id == tenant.id, Dataset.status == "ready", Dataset.id != ts.dataset_id)
        .order_by(Dataset.created_at.desc(), Dataset.id)
        .limit(LIST_LIMIT)
    ).all()
    return _page(
        request,
        "transfer_set.html",
        status_code=status_code,
        tenant=tenant,
        section="transfer_sets",
        title=f"Transfer set {ts.id[:8]}",
        ts=ts,
        job=None,
        summary=ts.summary or {},
        report_url=f"/ui/transfer-sets/{ts.id}/report" if has_report else None,
        live=ts.status in ("queued", "running"),
        form=form,
        budgets=BUDGETS,
        test_datasets=test_datasets,
        estimate=_train_estimate(session, settings, form) if ts.status == "ready" else None,
        teacher_specs=_teacher_specs(session, tenant),
        error=error,
    )


@router.get("/transfer-sets/{transfer_set_id}", response_class=HTMLResponse)
def transfer_set_page(
    request: Request, transfer_set_id: str, session: SessionDep, settings: SettingsDep, tenant: UiTenant
) -> HTMLResponse:
    ts: TransferSet = sync_transfer_set(
        session, settings, _owned(session, TransferSet, tenant, transfer_set_id)
    )
    return _transfer_set_page(request, session, settings, tenant, ts)


@router.get("/transfer-sets/{transfer_set_id}/estimate")
def transfer_set_estimate(
    request: Request, transfer_set_id: str, session: SessionDep, settings: SettingsDep, tenant: UiTenant
) -> JSONResponse:
    """What the train form's script asks when a field changes: the estimate for those values."""
    _owned(session, TransferSet, tenant, transfer_set_id)
    form = {k: v[:200] for k, v in request.query_params.items() if k in TRAIN_FIELDS}
    return JSONResponse(
        _train_estimate(session, settings, form).public(), headers={"Cache-Control": "no-store"}
    )


@router.post("/transfer-sets/{transfer_set_id}/train", response_class=HTMLResponse)
async def transfer_set_train(
    request: Request, transfer_set_id: str, session: SessionDep, settings: SettingsDep, tenant: UiTenant
) -> Response:
    """The train form: ``POST /v1/jobs`` with ``transfer_set_id``, the reviewed set itself."""
    async with request.form(max_files=0, max_fields=50) as data:
        form = {k: str(v)[:4096] for k, v in data.items() if isinstance(v, str)}
    _check_form(request, form.get(FORM_TOKEN_FIELD))

    def submit() -> Response:
        ts: TransferSet = _owned(session, TransferSet, tenant, transfer_set_id)
        shown = {k: form.get(k, "") for k in TRAIN_FIELDS}
        try:
            body = JobCreate.model_validate(_train_request(ts, form))
            job = create_job(body, session, tenant, settings)
        except (UserError, ValidationError) as err:
            message, code = _form_error(err)
            session.rollback()
            ts = sync_transfer_set(session, settings, ts)
            return _transfer_set_page(
                request, session, settings, tenant, ts, shown, error=message, status_code=code
            )
        return RedirectResponse(f"/ui/jobs/{job.id}", status_code=303)

    return await run_in_threadpool(submit)


@router.get("/transfer-sets/{transfer_set_id}/report", response_class=HTMLResponse)
def transfer_set_report(
    transfer_set_id: str, session: SessionDep, settings: SettingsDep, tenant: UiTenant
) -> Response:
    ts: TransferSet = sync_transfer_set(
        session, settings, _owned(session, TransferSet, tenant, transfer_set_id)
    )
    if ts.status != "ready" or ts.job_id is None:
        raise PageNotFound(transfer_set_id)
    return _report_response(
        curate_dir(settings, ts.job_id) / "report.html", session_redactor(settings, session)
    )


# --------------------------------------------------------------------------- models


def _formats(model: Model) -> list[str]:
    return [fmt for fmt in EXPORT_FORMATS if (model.files or {}).get(fmt)]


def _student(model: Model) -> str:
    """The model's architecture as it was asked for: the student spec the export recorded in the
    card's lineage (``timm:<name>``), else the timm name it was exported as."""
    card = model.card or {}
    lineage = _dict(card.get("lineage"))
    spec = lineage.get("student")
    if isinstance(spec, str) and spec:
        return spec
    name = card.get("timm_name")
    return f"timm:{name}" if isinstance(name, str) and name else ""


SUFFIXES = {"torchscript": ".pt"}


def _download_name(model: Model, fmt: str) -> str:
    """What a download is saved as: the name ``kt models download`` gives it (``model-<id>.<ext>``),
    whose card, saved beside it, ``kt predict`` finds by itself."""
    return f"model-{model.id}{SUFFIXES.get(fmt, '.' + fmt)}"


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, session: SessionDep, tenant: UiTenant) -> HTMLResponse:
    rows = session.scalars(
        select(Model)
        .where(Model.tenant_id == tenant.id)
        .order_by(Model.created_at.desc(), Model.id)
        .limit(LIST_LIMIT)
    ).all()
    return _page(
        request,
        "models.html",
        tenant=tenant,
        section="models",
        models=rows,
        formats=_formats,
        student=_student,
    )


def _card_items(card: dict[str, Any]) -> list[tuple[str, str]]:
    """The card's fields, nested values as indented JSON."""
    out = []
    for key, value in card.items():
        if key in ("classes", "metrics"):
            continue
        text = value if isinstance(value, str) else json.dumps(value, indent=2, sort_keys=True, default=str)
        out.append((key, text))
    return out


def _flat_metrics(metrics: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(metrics, dict):
        for k, v in metrics.items():
            if k in ("confusion", "classes", "per_class"):
                continue
            out.extend(_flat_metrics(v, f"{prefix}{k}."))
    elif isinstance(metrics, int | float) and not isinstance(metrics, bool):
        out.append((prefix.rstrip("."), metrics))
    return out


@router.get("/models/{model_id}", response_class=HTMLResponse)
def model_page(request: Request, model_id: str, session: SessionDep, tenant: UiTenant) -> HTMLResponse:
    model: Model = _owned(session, Model, tenant, model_id)
    card = model.card or {}
    job = session.get(Job, model.job_id) if model.job_id else None
    return _page(
        request,
        "model.html",
        tenant=tenant,
        section="models",
        model=model,
        card_items=_card_items(card),
        classes=[str(c) for c in card.get("classes") or []],
        metrics=_flat_metrics(card.get("metrics") or {}),
        formats=_formats(model),
        job=job if job is not None and job.tenant_id == tenant.id else None,
        tests=_test_metrics(job) if job is not None and job.tenant_id == tenant.id else [],
        student=_student(model),
        base_url=str(request.base_url).rstrip("/"),
        predict_format="onnx" if "onnx" in _formats(model) else next(iter(_formats(model)), "onnx"),
        download_name=lambda fmt: _download_name(model, fmt),
        card_name=f"model-{model.id}.model_card.json",
    )


@router.get("/models/{model_id}/card")
def model_card_download(model_id: str, session: SessionDep, tenant: UiTenant) -> Response:
    """The card as ``kt models download`` saves it beside the model: ``model-<id>.model_card.json``
    (where ``kt predict model-<id>.onnx ...`` looks for its preprocessing and classes)."""
    model: Model = _owned(session, Model, tenant, model_id)
    return Response(
        json.dumps(model.card or {}, indent=2) + "\n",
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="model-{model.id}.model_card.json"'},
    )


@router.get("/models/{model_id}/download")
def model_download(
    model_id: str,
    session: SessionDep,
    tenant: UiTenant,
    format: Annotated[ExportFormat, Query()] = "safetensors",
) -> FileResponse:
    """The download buttons' target: ``GET /v1/models/{id}/download`` with the cookie's key."""
    model: Model = _owned(session, Model, tenant, model_id)
    stored = (model.files or {}).get(format)
    path = Path(stored) if stored else None
    if path is None or not path.is_file():
        raise PageNotFound(model_id)
    return FileResponse(path, media_type="application/octet-stream", filename=_download_name(model, format))


# --------------------------------------------------------------------------- datasets


def _images_dir(settings: Settings, ds: Dataset) -> Path:
    return storage.dataset_dir(settings.data_dir, ds.tenant_id, ds.id) / "images"


def _class_files(folder: Path, limit: int) -> list[str]:
    if not folder.is_dir():
        return []
    names = sorted(
        p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    return names[:limit]


def _datasets_page(
    request: Request,
    session: Session,
    tenant: Tenant,
    error: str | None = None,
    status_code: int = 200,
    name: str = "",
) -> HTMLResponse:
    rows = session.scalars(
        select(Dataset)
        .where(Dataset.tenant_id == tenant.id)
        .order_by(Dataset.created_at.desc(), Dataset.id)
        .limit(LIST_LIMIT)
    ).all()
    return _page(
        request,
        "datasets.html",
        status_code=status_code,
        tenant=tenant,
        section="datasets",
        datasets=rows,
        error=error,
        name=name,
    )


@router.get("/datasets", response_class=HTMLResponse)
def datasets_page(request: Request, session: SessionDep, tenant: UiTenant) -> HTMLResponse:
    return _datasets_page(request, session, tenant)


@router.post("/datasets", response_class=HTMLResponse)
async def dataset_upload(
    request: Request, session: SessionDep, settings: SettingsDep, tenant: UiTenant
) -> Response:
    """The upload form: the zip streamed to disk and stored exactly as ``POST /v1/datasets`` does
    (``service.api.routes.datasets.store_dataset``); a refused upload is the page with the reason."""
    if _cross_site(request):  # before reading a byte of the body
        raise FormRefused(CROSS_SITE)
    name = ""
    try:
        await run_in_threadpool(quotas.refuse_if_storage_full, session, settings, tenant)
        async with upload_gate(request, settings).slot():  # the API's turns for uploads
            upload = await receive_upload(request, settings)
            name = upload.name or ""
            if not form_token_matches(request, upload.fields.get(FORM_TOKEN_FIELD)):
                await remove_upload(upload.path)
                raise FormRefused(STALE_FORM)
            if not upload.filename and upload.size == 0:
                await remove_upload(upload.path)
                raise Invalid("Choose a zip file to upload (the form was sent without one).")
            dataset = await store_dataset(session, settings, tenant, upload)
    except UserError as err:
        message, code = _form_error(err)
        await run_in_threadpool(session.rollback)
        page = await run_in_threadpool(_datasets_page, request, session, tenant, message, code, name)
        page.headers.update(getattr(err, "headers", None) or {})  # a busy server's Retry-After
        return page
    return RedirectResponse(f"/ui/datasets/{dataset.id}", status_code=303)


def _dataset_page(
    request: Request,
    session: Session,
    settings: Settings,
    tenant: Tenant,
    ds: Dataset,
    form: dict[str, Any] | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    counts = {str(k): int(v) for k, v in (ds.class_counts or {}).items()}
    classes = [str(c) for c in ds.classes or []] or sorted(counts)
    top = max(counts.values(), default=0)
    images = _images_dir(settings, ds)
    rows = [
        {
            "cls": cls,
            "n": counts.get(cls, 0),
            "bar": round(100 * counts.get(cls, 0) / top) if top else 0,
            "thumbs": _class_files(images / cls, THUMBS_PER_CLASS) if ds.status == "ready" else [],
        }
        for cls in classes
    ]
    galleries = session.scalars(select(Gallery).order_by(Gallery.name).limit(LIST_LIMIT)).all()
    transfer_sets = session.scalars(
        select(TransferSet)
        .where(TransferSet.tenant_id == tenant.id, TransferSet.dataset_id == ds.id)
        .order_by(TransferSet.created_at.desc(), TransferSet.id)
        .limit(LIST_LIMIT)
    ).all()
    form = dict(form or {})
    form.setdefault("size", str(TransferSetCreate.model_fields["size"].default))
    return _page(
        request,
        "dataset.html",
        status_code=status_code,
        tenant=tenant,
        section="datasets",
        ds=ds,
        rows=rows,
        galleries=galleries,
        transfer_sets=transfer_sets,
        form=form,
        teacher_specs=_teacher_specs(session, tenant),
        error=error,
    )


@router.get("/datasets/{dataset_id}", response_class=HTMLResponse)
def dataset_page(
    request: Request, dataset_id: str, session: SessionDep, settings: SettingsDep, tenant: UiTenant
) -> HTMLResponse:
    ds: Dataset = _owned(session, Dataset, tenant, dataset_id)
    return _dataset_page(request, session, settings, tenant, ds)


CURATE_FIELDS = ("gallery_id", "size", "teacher")


@router.post("/datasets/{dataset_id}/curate", response_class=HTMLResponse)
def dataset_curate(
    request: Request,
    dataset_id: str,
    session: SessionDep,
    settings: SettingsDep,
    tenant: UiTenant,
    csrf: CsrfField = None,
    gallery_id: Annotated[str, Form(max_length=200)] = "",
    size: Annotated[str, Form(max_length=200)] = "",
    teacher: Annotated[str, Form(max_length=400)] = "",
) -> Response:
    """The curate form: ``POST /v1/transfer-sets`` for this dataset; then the set's page, where
    its report appears when the curation is done."""
    _check_form(request, csrf)
    ds: Dataset = _owned(session, Dataset, tenant, dataset_id)
    shown = {"gallery_id": gallery_id, "size": size, "teacher": teacher}
    body: dict[str, Any] = {"dataset_id": ds.id, "gallery_id": gallery_id.strip()}
    if size.strip():
        body["size"] = size.strip()
    if teacher.strip():
        body["teacher"] = teacher.strip()
    try:
        if not body["gallery_id"]:
            raise Invalid("Choose a gallery to curate from (`GET /v1/galleries` lists them).")
        ts = create_transfer_set(TransferSetCreate.model_validate(body), session, tenant, settings)
    except (UserError, ValidationError) as err:
        message, code = _form_error(err)
        session.rollback()
        return _dataset_page(request, session, settings, tenant, ds, shown, error=message, status_code=code)
    return RedirectResponse(f"/ui/transfer-sets/{ts.id}", status_code=303)


def _dataset_image(settings: Settings, ds: Dataset, cls: str, name: str) -> Path:
    """The stored image ``<cls>/<name>`` of ``ds``; ``PageNotFound`` for anything else (another
    class, a hidden file, a path that leaves the dataset's folder)."""
    if cls not in (ds.classes or []) or "/" in name or "\\" in name or name.startswith("."):
        raise PageNotFound(name)
    root = _images_dir(settings, ds).resolve()
    path = (root / cls / name).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise PageNotFound(name)
    return path


@router.get("/datasets/{dataset_id}/thumbs/{cls}/{name}")
async def dataset_thumb(
    request: Request,
    dataset_id: str,
    cls: str,
    name: str,
    session: SessionDep,
    settings: SettingsDep,
    tenant: UiTenant,
) -> Response:
    """A JPEG thumbnail (at most ``THUMB_PX`` px) of one image of the tenant's dataset: made once,
    on a bounded pool of decoders, then read from its cache beside the dataset (``service.thumbnails``).
    Async, so a request waiting for a decode holds no thread."""
    ds: Dataset = await run_in_threadpool(_owned, session, Dataset, tenant, dataset_id)
    source = await run_in_threadpool(_dataset_image, settings, ds, cls, name)
    folder = storage.dataset_dir(settings.data_dir, ds.tenant_id, ds.id)
    thumb = await thumbnails(request.app, THUMB_PX).get(source, thumb_path(folder, cls, name, THUMB_PX))
    if thumb is None:
        raise PageNotFound(name)
    return Response(thumb, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


# --------------------------------------------------------------------------- wiring


def _not_found(request: Request, _exc: Exception) -> Response:
    return _page(
        request,
        "error.html",
        status_code=404,
        title="Not found",
        message="No such page, or it is not yours. The lists in the menu show what you have.",
    )


def _login_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    response = RedirectResponse(login_url(exc.next_path), status_code=303)
    if exc.message:
        response.delete_cookie(COOKIE_NAME, path=COOKIE_PATH, secure=True, httponly=True, samesite="strict")
    return response


def _too_many(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TooManyRequests)
    response = _page(request, "error.html", status_code=429, title="Too many requests", message=str(exc))
    response.headers["Retry-After"] = exc.retry_after
    return response


def _form_refused(request: Request, exc: Exception) -> Response:
    return _page(request, "error.html", status_code=403, title="Forbidden", message=str(exc))


def install_ui(app: FastAPI) -> None:
    """Serve the pages under ``/ui`` (and their error pages: 404, 403 for a foreign form, the login
    redirect, 429)."""
    app.include_router(router)
    app.add_exception_handler(PageNotFound, _not_found)
    app.add_exception_handler(FormRefused, _form_refused)
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(TooManyRequests, _too_many)
