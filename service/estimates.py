"""How long a training job will take, before it is submitted ("review before you spend GPU").

The service cannot run the models (no torch here), so the estimate is arithmetic: the work a job's
recipe plans (steps x batch size per training stage, from ``kt_train.recipe`` at the job's budget
and its overrides) at the speed *this deployment* reached on the jobs it already finished. Each
finished pipeline job records, in its row, the wall-clock seconds of every stage
(``jobs.stage_timings``, written by the worker) and the config it ran (``jobs.params.config``),
so a stage's measured rate is the images it trained on divided by its seconds (which includes
what the stage does besides the training loop: the teacher-output cache, validation). The stages
without steps (curate, export, evaluate) take their measured mean seconds.

The speed is the deployment's (its machines), so every tenant's finished jobs count; only their
timings and step counts are read, and nothing of them is shown but the resulting number. Jobs with
the same teacher and student are preferred (another model pair runs at another speed);
without them, every finished job counts and the estimate says so. With no finished job at all there
is no number: the estimate gives the step counts and says "no measurement yet", never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from kt_train.config import STAGES
from kt_train.recipe import merge, recipe
from service.db.models import Job

TRAINING_STAGES = ("finetune_teacher", "distill", "finetune_student")
FIXED_STAGES = ("curate", "export", "evaluate")  # no steps: their measured seconds are used as they are
MEASURED_JOBS = 20  # the latest finished jobs a rate is taken from
NO_MEASUREMENT = "no measurement yet"


@dataclass(frozen=True)
class Plan:
    """The work a job's config plans: steps, batch size and images per training stage, and which
    of the other stages it runs."""

    steps: dict[str, int]
    batch_size: dict[str, int]  # the teacher's: the mean of its two phases (shown, not computed with)
    images: dict[str, int]  # steps x batch size, phase by phase
    stages: tuple[str, ...]


@dataclass(frozen=True)
class Estimate:
    budget: str
    plan: Plan
    seconds: float | None  # None: no finished job to measure the speed on
    stage_seconds: dict[str, float] = field(default_factory=dict)
    measured_jobs: int = 0
    same_models: bool = False  # the rates come from jobs with the same teacher and student
    unmeasured: tuple[str, ...] = ()  # stages without steps that no finished job ran yet (left out)

    @property
    def basis(self) -> str:
        if self.seconds is None:
            return NO_MEASUREMENT
        jobs = f"{self.measured_jobs} finished job{'s' if self.measured_jobs != 1 else ''}"
        text = f"measured on {jobs} " + (
            "with the same teacher and student" if self.same_models else "of this deployment (other models)"
        )
        return text + (f"; {', '.join(self.unmeasured)} not measured yet" if self.unmeasured else "")

    def steps_text(self) -> str:
        parts = [
            f"{self.plan.steps[stage]:,} {label} steps of {self.plan.batch_size[stage]}"
            for stage, label in (
                ("finetune_teacher", "teacher"),
                ("distill", "distillation"),
                ("finetune_student", "student finetune"),
            )
            if self.plan.steps.get(stage)
        ]
        return ", ".join(parts) or "no training steps"

    def text(self) -> str:
        """One line for a person: the time (or that there is none yet) and the steps it is for."""
        if self.seconds is None:
            return f"{NO_MEASUREMENT}: {self.steps_text()}"
        return f"about {duration(self.seconds)} ({self.basis}): {self.steps_text()}"

    def public(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "seconds": None if self.seconds is None else round(self.seconds, 1),
            "stage_seconds": {k: round(v, 1) for k, v in self.stage_seconds.items()},
            "steps": dict(self.plan.steps),
            "batch_size": dict(self.plan.batch_size),
            "stages": list(self.plan.stages),
            "measured_jobs": self.measured_jobs,
            "same_models": self.same_models,
            "unmeasured": list(self.unmeasured),
            "basis": self.basis,
            "text": self.text(),
        }


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``2 h 05 min``: as precise as an estimate deserves."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def plan_of(config: dict[str, Any]) -> Plan:
    """The training work of a worker config (``TrainConfig`` keys, as a job row stores them)."""
    stages = tuple(config.get("stages") or STAGES)  # a config without `stages` runs them all
    ft = config.get("finetune_teacher") or {}
    probe, full = ft.get("linear_probe") or {}, ft.get("full_finetune") or {}
    distill = config.get("distill") or {}
    student = config.get("finetune_student") or {}
    probe_images = _int(probe.get("steps")) * _int(probe.get("batch_size"))
    full_images = _int(full.get("steps")) * _int(full.get("batch_size"))
    teacher_steps = _int(probe.get("steps")) + _int(full.get("steps"))
    steps = {
        "finetune_teacher": teacher_steps if "finetune_teacher" in stages else 0,
        "distill": _int(distill.get("steps")) if "distill" in stages else 0,
        "finetune_student": 0,
    }
    # a task-distilled student is kept as distilled unless asked (kt_train.pipeline.finetune_student)
    if "finetune_student" in stages and (student.get("after_distillation") or not steps["distill"]):
        steps["finetune_student"] = _int(student.get("steps"))
    batch = {
        "finetune_teacher": round((probe_images + full_images) / teacher_steps) if teacher_steps else 0,
        "distill": _int(distill.get("batch_size")),
        "finetune_student": _int(student.get("batch_size")),
    }
    images = {
        "finetune_teacher": probe_images + full_images if steps["finetune_teacher"] else 0,
        "distill": steps["distill"] * batch["distill"],
        "finetune_student": steps["finetune_student"] * batch["finetune_student"],
    }
    return Plan(steps=steps, batch_size=batch, images=images, stages=stages)


def planned(
    budget: str, overrides: dict[str, Any] | None = None, *, curate: bool = False, evaluate: bool = False
) -> Plan:
    """The plan of a training job at ``budget`` with ``overrides`` (``TrainConfig`` keys, ``None``
    values kept at the budget's), as ``service.api.routes.jobs.build_pipeline_config`` orders it."""
    config = merge(recipe(budget), overrides or {})
    stages = ["finetune_teacher", *(["curate"] if curate else []), "distill", "finetune_student", "export"]
    config["stages"] = stages + (["evaluate"] if evaluate else [])
    return plan_of(config)


def _models(job: Job) -> tuple[Any, Any]:
    request = (job.params or {}).get("request") or {}
    return request.get("teacher"), request.get("student")


def _finished_jobs(session: Session, queue: str | None) -> list[Job]:
    where = [Job.kind == "pipeline", Job.status == "succeeded"]
    if queue is not None:  # a GPU worker and a CPU one run at other speeds
        where.append(Job.queue == queue)
    return list(
        session.scalars(
            select(Job)
            .where(*where)
            .order_by(Job.finished_at.desc(), Job.id)
            .limit(5 * MEASURED_JOBS)  # enough to find MEASURED_JOBS of the same models among them
        ).all()
    )


def _rates(jobs: list[Job]) -> tuple[dict[str, float], dict[str, float]]:
    """(seconds per trained image of each training stage, mean seconds of each fixed stage)."""
    images: dict[str, float] = {}
    seconds: dict[str, float] = {}
    fixed: dict[str, list[float]] = {}
    for job in jobs:
        timings = job.stage_timings or {}
        plan = plan_of((job.params or {}).get("config") or {})
        for stage, n in plan.images.items():
            took = timings.get(stage)
            if n > 0 and isinstance(took, int | float) and took > 0:
                images[stage] = images.get(stage, 0.0) + n
                seconds[stage] = seconds.get(stage, 0.0) + float(took)
        for stage in FIXED_STAGES:
            took = timings.get(stage)
            if isinstance(took, int | float) and took >= 0:
                fixed.setdefault(stage, []).append(float(took))
    per_image = {stage: seconds[stage] / images[stage] for stage in images}
    return per_image, {stage: sum(v) / len(v) for stage, v in fixed.items()}


def estimate(
    session: Session,
    budget: str,
    overrides: dict[str, Any] | None = None,
    *,
    teacher: str | None = None,
    student: str | None = None,
    curate: bool = False,
    evaluate: bool = False,
    queue: str | None = None,
) -> Estimate:
    """How long a training job at ``budget`` (and ``overrides``) takes at the speed measured on the
    finished jobs of ``queue`` (the job's queue, ``service.queue.queue_for``; None: every queue)."""
    plan = planned(budget, overrides, curate=curate, evaluate=evaluate)
    jobs = _finished_jobs(session, queue)
    same = [job for job in jobs if _models(job) == (teacher, student)][:MEASURED_JOBS]
    every = jobs[:MEASURED_JOBS]
    (same_image, same_fixed), (all_image, all_fixed) = _rates(same), _rates(every)
    stage_seconds: dict[str, float] = {}
    used_other = False
    for stage, n in plan.images.items():
        if n == 0:
            continue
        rate = same_image.get(stage)
        if rate is None:
            rate, used_other = all_image.get(stage), True
        if rate is None:  # this stage never ran here: no honest number
            return Estimate(budget, plan, None)
        stage_seconds[stage] = n * rate
    unmeasured = []
    for stage in FIXED_STAGES:
        if stage in plan.stages:
            took = same_fixed.get(stage, all_fixed.get(stage))
            if took is None:
                unmeasured.append(stage)
            else:
                stage_seconds[stage] = took
    if not stage_seconds:
        return Estimate(budget, plan, None)
    return Estimate(
        budget,
        plan,
        sum(stage_seconds.values()),
        stage_seconds,
        measured_jobs=len(same) if same and not used_other else len(every),
        same_models=bool(same) and not used_other,
        unmeasured=tuple(unmeasured),
    )
