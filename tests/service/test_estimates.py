"""``service.estimates``: the planned work of a budget (``kt_train.recipe``), divided by the speed
measured on the deployment's finished jobs (their rows' stage timings and configs); no number
before a job has finished; ``GET /v1/jobs/estimate`` answers the same."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from kt_train.recipe import recipe
from service import estimates
from service.admin import create_tenant_key
from service.app import create_app
from service.db.models import Dataset, Gallery, Job, Tenant, TransferSet, utcnow
from service.settings import Settings

TEACHER, STUDENT = "timm:test_vit", "timm:test_efficientnet"


def finished_job(
    session: Session,
    tenant_id: str,
    timings: dict[str, float],
    *,
    distill_steps: int,
    teacher: str = TEACHER,
    student: str = STUDENT,
    status: str = "succeeded",
    age_s: float = 0.0,
) -> Job:
    config = recipe("fast")
    config["distill"]["steps"] = distill_steps
    config["stages"] = ["finetune_teacher", "distill", "finetune_student", "export", "evaluate"]
    job = Job(
        tenant_id=tenant_id,
        kind="pipeline",
        status=status,
        stage_timings=timings,
        params={"config": config, "request": {"teacher": teacher, "student": student, "budget": "fast"}},
        finished_at=utcnow() - timedelta(seconds=age_s),
    )
    session.add(job)
    session.commit()
    return job


@pytest.fixture
def tenant_id(db: Session) -> str:
    create_tenant_key(db, "acme")
    tenant = db.query(Tenant).filter_by(name="acme").one()
    return str(tenant.id)


def test_the_plan_is_the_budgets_steps_and_batch_sizes() -> None:
    for budget, distill_steps in (("fast", 1000), ("balanced", 8000), ("best", 16000)):
        plan = estimates.planned(budget)
        assert plan.steps["distill"] == distill_steps
        assert plan.batch_size["distill"] == 64
        assert plan.steps["finetune_teacher"] == 100 + 150  # linear probe, then full finetune
        # 100 probe steps of 64 and 150 full-finetune steps of 32: the images are exact
        assert plan.images["finetune_teacher"] == 100 * 64 + 150 * 32
        assert plan.steps["finetune_student"] == 0  # a task-distilled student is kept as distilled
        assert plan.stages == ("finetune_teacher", "distill", "finetune_student", "export")
    changed = estimates.planned("fast", {"distill": {"steps": 30, "batch_size": None}}, evaluate=True)
    assert changed.steps["distill"] == 30 and changed.batch_size["distill"] == 64
    assert changed.stages[-1] == "evaluate"
    # no distillation: the student trains from scratch in finetune_student
    scratch = estimates.planned("balanced", {"distill": {"steps": 0}})
    assert scratch.steps["finetune_student"] == 200 and scratch.batch_size["finetune_student"] == 32


def test_no_finished_job_means_no_number(db: Session, tenant_id: str) -> None:
    finished_job(db, tenant_id, {"distill": 10.0}, distill_steps=100, status="failed")
    found = estimates.estimate(db, "fast", teacher=TEACHER, student=STUDENT)
    assert found.seconds is None
    assert found.text() == ("no measurement yet: 250 teacher steps of 45, 1,000 distillation steps of 64")
    assert found.public()["seconds"] is None and found.public()["steps"]["distill"] == 1000


def test_the_time_is_the_plan_at_the_measured_speed(db: Session, tenant_id: str) -> None:
    # 500 distillation steps of 64 in 40 s: 1.25 ms per image; the teacher's 11,200 images in 14 s
    timings = {
        "finetune_teacher": 14.0,
        "distill": 40.0,
        "finetune_student": 0.1,
        "export": 6.0,
        "evaluate": 2.0,
    }
    finished_job(db, tenant_id, timings, distill_steps=500)
    fast = estimates.estimate(db, "fast", teacher=TEACHER, student=STUDENT)
    assert fast.stage_seconds == pytest.approx({"finetune_teacher": 14.0, "distill": 80.0, "export": 6.0})
    assert fast.seconds == pytest.approx(100.0)
    assert fast.same_models and fast.measured_jobs == 1
    assert fast.text() == (
        "about 2 min (measured on 1 finished job with the same teacher and student): "
        "250 teacher steps of 45, 1,000 distillation steps of 64"
    )
    best = estimates.estimate(db, "best", teacher=TEACHER, student=STUDENT, evaluate=True)
    assert best.seconds == pytest.approx(14.0 + 1280.0 + 6.0 + 2.0)  # 16x the distillation, + evaluate
    assert best.seconds > fast.seconds


def test_jobs_with_the_same_models_are_preferred(db: Session, tenant_id: str) -> None:
    finished_job(
        db, tenant_id, {"finetune_teacher": 1.0, "distill": 4.0}, distill_steps=500, student="timm:other"
    )
    finished_job(db, tenant_id, {"finetune_teacher": 1.0, "distill": 40.0}, distill_steps=500, age_s=60)
    same = estimates.estimate(db, "fast", teacher=TEACHER, student=STUDENT)
    assert same.stage_seconds["distill"] == pytest.approx(80.0) and same.same_models
    # another pair: every finished job counts (both here: 44 s for 1,000 steps), and it says so
    other = estimates.estimate(db, "fast", teacher=TEACHER, student="timm:resnet18")
    assert other.stage_seconds["distill"] == pytest.approx(44.0)
    assert not other.same_models and other.measured_jobs == 2
    assert "of this deployment (other models)" in other.text()
    # a stage no finished job ran: its time is unknown, and so is the total
    unmeasured = estimates.estimate(db, "fast", {"distill": {"steps": 0}}, teacher=TEACHER, student=STUDENT)
    assert unmeasured.seconds is None and unmeasured.text().startswith("no measurement yet: ")


def test_durations_read_as_an_estimate() -> None:
    assert [estimates.duration(s) for s in (0.2, 45, 89.6, 600, 7199, 7500)] == [
        "1 s", "45 s", "90 s", "10 min", "2 h 00 min", "2 h 05 min"
    ]  # fmt: skip


def test_the_api_answers_the_estimate(tmp_path: Path, db: Session, tenant_id: str, sqlite_url: str) -> None:
    key = create_tenant_key(db, "acme")
    other_key = create_tenant_key(db, "globex")
    settings = Settings(data_dir=tmp_path / "data", database_url=sqlite_url)
    with TestClient(create_app(settings)) as client:
        auth = {"Authorization": f"Bearer {key}"}
        r = client.get(
            "/v1/jobs/estimate",
            params={"budget": "fast", "teacher": TEACHER, "student": STUDENT},
            headers=auth,
        )
        assert r.status_code == 200, r.text
        assert r.json()["seconds"] is None and r.json()["text"].startswith("no measurement yet")
        finished_job(
            db, tenant_id, {"finetune_teacher": 14.0, "distill": 40.0, "export": 6.0}, distill_steps=500
        )
        r = client.get(
            "/v1/jobs/estimate",
            params={"budget": "fast", "teacher": TEACHER, "student": STUDENT, "distill_steps": 2000},
            headers=auth,
        )
        body = r.json()
        assert body["seconds"] == pytest.approx(14.0 + 160.0 + 6.0) and body["steps"]["distill"] == 2000
        assert client.get("/v1/jobs/estimate", params={"budget": "huge"}, headers=auth).status_code == 422
        # a GPU job is measured only on the jobs of the gpu queue: none finished there yet
        gpu = client.get("/v1/jobs/estimate", params={"budget": "fast", "device": "cuda"}, headers=auth)
        assert gpu.status_code == 200 and gpu.json()["seconds"] is None
        ds = Dataset(tenant_id=tenant_id, name="shapes", status="ready")
        gallery = Gallery(name="web", path=str(tmp_path), encoder=TEACHER, index_kind="flat", dim=8)
        db.add_all([ds, gallery])
        db.flush()
        ts = TransferSet(tenant_id=tenant_id, dataset_id=ds.id, gallery_id=gallery.id, params={})
        db.add(ts)
        db.commit()
        mine = client.get("/v1/jobs/estimate", params={"transfer_set_id": ts.id}, headers=auth)
        assert mine.status_code == 200 and "curate" not in mine.json()["stages"]
        theirs = client.get(
            "/v1/jobs/estimate",
            params={"transfer_set_id": ts.id},
            headers={"Authorization": f"Bearer {other_key}"},
        )
        assert theirs.status_code == 404
