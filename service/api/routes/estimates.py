"""``GET /v1/jobs/estimate``: how long a training job would take, before submitting it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from service import estimates
from service.api.deps import CurrentTenant, SessionDep, SettingsDep
from service.api.errors import NotFound
from service.db.models import TransferSet
from service.queue import queue_for
from service.schemas import DEVICE_PATTERN, Budget, JobCreate

# Mounted before the jobs router, whose `/jobs/{job_id}` would take `estimate` for an id.
router = APIRouter(prefix="/jobs", tags=["jobs"])


class JobEstimate(BaseModel):
    budget: str = Field(description="The budget estimated.")
    seconds: float | None = Field(
        description="Estimated wall-clock seconds; null while no finished job has measured the speed."
    )
    stage_seconds: dict[str, float] = Field(description="The estimate per stage.")
    steps: dict[str, int] = Field(description="Steps per training stage at this budget.")
    batch_size: dict[str, int] = Field(description="Images per step of each training stage.")
    stages: list[str] = Field(description="The stages the job would run, in order.")
    measured_jobs: int = Field(description="Finished jobs the speed was measured on.")
    same_models: bool = Field(description="Those jobs had the same teacher and student.")
    unmeasured: list[str] = Field(description="Stages without steps no finished job ran yet (left out).")
    basis: str = Field(description="What the speed was measured on, or `no measurement yet`.")
    text: str = Field(description="The estimate in one line, as the web form shows it.")


@router.get("/estimate", response_model=JobEstimate, responses={404: {}})
def estimate_job(
    session: SessionDep,
    tenant: CurrentTenant,
    settings: SettingsDep,
    budget: Annotated[Budget, Query(description="The job's `budget`.")] = "balanced",
    teacher: Annotated[
        str,
        Query(max_length=200, description="The job's `teacher` (jobs with the same models are preferred)."),
    ] = str(JobCreate.model_fields["teacher"].default),
    student: Annotated[str, Query(max_length=200, description="The job's `student`.")] = str(
        JobCreate.model_fields["student"].default
    ),
    distill_steps: Annotated[
        int | None, Query(ge=0, le=1_000_000, description="= `recipe.distill.steps` (unset: the budget's).")
    ] = None,
    transfer_set_id: Annotated[
        str | None,
        Query(max_length=32, description="Train on this transfer set of yours: no curate stage."),
    ] = None,
    curate: Annotated[
        bool, Query(description="The job curates its own transfer set (`gallery_id`).")
    ] = False,
    test: Annotated[bool, Query(description="The job has a test dataset (an evaluate stage).")] = False,
    device: Annotated[
        str | None,
        Query(
            pattern=DEVICE_PATTERN,
            description="The job's `device`: only jobs of its queue measure the speed.",
        ),
    ] = None,
) -> dict[str, Any]:
    """The time a `POST /v1/jobs` with these settings would take: the steps of the budget's recipe
    (`kt_train/recipe.py`) at the speed this deployment measured on its finished jobs (their stage
    timings) on the job's queue, preferring jobs with the same teacher and student. `seconds` is null (and `text`
    says "no measurement yet", with the steps) until a job has finished here."""
    if transfer_set_id is not None:
        ts = session.get(TransferSet, transfer_set_id)
        if ts is None or ts.tenant_id != tenant.id:
            raise NotFound(
                f"Transfer set {transfer_set_id!r} not found; `GET /v1/transfer-sets` lists yours."
            )
        curate = False
    overrides = {"distill": {"steps": distill_steps}}
    found = estimates.estimate(
        session,
        budget,
        overrides,
        teacher=teacher,
        student=student,
        curate=curate,
        evaluate=test,
        queue=queue_for(device, settings),
    )
    return found.public()
