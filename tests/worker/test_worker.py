"""The worker: ``worker.runner.run_job`` in-process on SQLite (success, cancel, user and unexpected
errors, progress accounting), and a real Celery worker process on Redis + PostgreSQL."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from kt_train import pipeline
from kt_train.config import STAGES, parse_config
from kt_train.progress import plan_phases
from service.db.models import Job, Model, utcnow
from service.db.session import init_db, make_engine, make_session_factory
from tests.conftest import VENV_BIN
from tests.worker.conftest import add_job, add_tenant, get_job, make_settings
from worker import runner


def test_run_job_succeeds_and_records_everything(session_factory, worker_settings, tenant_id, job_config):
    job_id = add_job(session_factory, tenant_id, job_config())
    assert runner.run_job(session_factory, job_id, worker_settings, log_interval_s=0) == "succeeded"

    job = get_job(session_factory, job_id)
    assert (job.status, job.progress, job.eta_s, job.error, job.attempts) == ("succeeded", 1.0, None, None, 1)
    assert job.stage == "export" and job.started_at and job.finished_at  # evaluate runs before export
    assert set(job.stage_timings) == {*STAGES, "workers"}
    # where each stage ran: the host (a Celery worker records its node name, test_stage_chain)
    assert job.stage_timings["workers"] == dict.fromkeys(STAGES, socket.gethostname())
    assert 0.0 <= job.metrics["student_top1"] <= 100.0  # percent and "student" in job.metrics["test"]
    run_dir = worker_settings.data_dir / "jobs" / job_id / "run"
    assert (run_dir / "export" / "_SUCCESS").is_file()
    with session_factory() as s:
        models = s.scalars(select(Model).where(Model.job_id == job_id)).all()
    assert len(models) == 1 and models[0].tenant_id == tenant_id
    weights = Path(models[0].files["safetensors"])
    assert weights.name == "model.safetensors" and weights.is_file()
    assert weights.parent == run_dir / "export"
    assert len(models[0].card["classes"]) == 4 and models[0].card["preprocessing"]
    assert models[0].card["metrics"]["test"]["top1"] == job.metrics["student_top1"]
    assert models[0].card["failed_formats"] == {} and "warnings" not in job.metrics
    assert job.heartbeat_at is not None and job.heartbeat_at >= job.started_at

    # the log the API serves: the attempt, every stage's start and end, training progress, the end
    log = (worker_settings.data_dir / "jobs" / job_id / "job.log").read_text()
    assert "attempt 1 of pipeline job started" in log and "(queue cpu)" in log
    for stage in STAGES:
        assert f"stage {stage}: started" in log and f"stage {stage}: finished in" in log, stage
    assert log.index("stage finetune_teacher: started") < log.index("stage distill: started")
    assert log.index("stage evaluate: finished in") < log.index("stage export: started")
    assert "distill: distill started, 3 steps" in log and "distill: distill finished" in log
    # progress lines: step, the loop's metrics, the job's share done
    assert re.search(r"distill: distill step 3/3 \S+=\S+.* \(job \d+%", log), log
    assert log.rstrip().endswith("job succeeded")

    # a re-delivered task for a finished job is a no-op
    assert runner.run_job(session_factory, job_id, worker_settings) == "succeeded"
    assert get_job(session_factory, job_id).attempts == 1
    with session_factory() as s:
        assert len(s.scalars(select(Model).where(Model.job_id == job_id)).all()) == 1


def test_cancel_before_start(session_factory, worker_settings, tenant_id, job_config):
    job_id = add_job(session_factory, tenant_id, job_config(), cancel_requested=True)
    assert runner.run_job(session_factory, job_id, worker_settings) == "canceled"
    job = get_job(session_factory, job_id)
    assert job.status == "canceled" and job.finished_at is not None and job.attempts == 0
    assert not (worker_settings.data_dir / "jobs" / job_id / "run").exists()
    log = (worker_settings.data_dir / "jobs" / job_id / "job.log").read_text()
    assert "job canceled before it started" in log


def test_cancel_while_running_stops_between_steps_and_keeps_finished_stages(
    session_factory, worker_settings, tenant_id, job_config, monkeypatch
):
    job_id = add_job(session_factory, tenant_id, job_config(stages=["finetune_teacher", "distill", "export"]))
    real_distill = pipeline.STAGE_FUNCS["distill"]
    seen: dict[str, Any] = {}

    def distill_then_cancel(cfg, inputs, out_dir, reporter=None):
        seen["stage"] = get_job(session_factory, job_id).stage
        with session_factory() as s:
            job = s.get(Job, job_id)
            assert job is not None
            job.cancel_requested = True
            s.commit()
        return real_distill(cfg, inputs, out_dir, reporter)

    monkeypatch.setitem(pipeline.STAGE_FUNCS, "distill", distill_then_cancel)
    status = runner.run_job(session_factory, job_id, worker_settings, progress_interval_s=0)
    assert status == "canceled" and seen["stage"] == "distill"
    job = get_job(session_factory, job_id)
    assert job.status == "canceled" and job.stage == "distill"
    assert 0.0 < job.progress < 1.0
    assert set(job.stage_timings) == {"finetune_teacher", "workers"}
    run_dir = worker_settings.data_dir / "jobs" / job_id / "run"
    assert (run_dir / "finetune_teacher" / "_SUCCESS").is_file()
    assert not (run_dir / "distill" / "_SUCCESS").exists()
    with session_factory() as s:
        assert s.scalars(select(Model).where(Model.job_id == job_id)).first() is None


def test_user_error_fails_with_message_without_retry(session_factory, worker_settings, tenant_id, job_config):
    cfg = job_config(stages=["finetune_student"], student__model="timm:not_a_model")
    job_id = add_job(session_factory, tenant_id, cfg)
    # even when retries are allowed, a user error is final
    assert runner.run_job(session_factory, job_id, worker_settings, can_retry=True) == "failed"
    job = get_job(session_factory, job_id)
    assert job.status == "failed" and job.attempts == 1 and job.finished_at is not None
    assert "not_a_model" in (job.error or "") and "timm.list_models" in (job.error or "")
    log = (worker_settings.data_dir / "jobs" / job_id / "job.log").read_text()
    assert "stage finetune_student: started" in log and "job failed: " in log and "not_a_model" in log

    bad = add_job(session_factory, tenant_id, {**cfg, "studnet": {}})
    assert runner.run_job(session_factory, bad, worker_settings) == "failed"
    assert "did you mean 'student'" in (get_job(session_factory, bad).error or "")


@pytest.mark.timeout(120)
def test_missing_weights_say_how_to_register_them_not_to_name_a_path(
    session_factory, worker_settings, tenant_id, job_config, tmp_path, monkeypatch
):
    """The tutorial's DINOv2 teacher on a server without it: the library's hint to pass a local file
    after '@' is refused by the API (422), so the job's error names the registered-model way."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    cfg = job_config(stages=["finetune_teacher"], teacher__model="timm:test_vit@r160_in1k")
    job_id = add_job(session_factory, tenant_id, cfg)
    assert runner.run_job(session_factory, job_id, worker_settings) == "failed"
    error = get_job(session_factory, job_id).error or ""
    assert "not available offline" in error and "timm.create_model('test_vit.r160_in1k'" in error
    assert "kt admin register-model" in error and "@registered:NAME" in error
    assert "/path/to" not in error and "pass a local file" not in error


def test_a_format_failing_its_check_keeps_the_model_and_warns(
    session_factory, worker_settings, tenant_id, job_config, monkeypatch
):
    """ONNX disagreeing with torch: the job still succeeds, the model is registered with the formats
    that passed, its card says why ONNX is missing, and the job's metrics carry a warning."""
    from kt_train import export as E

    real = E._run_onnx

    def argmax_flipped(path, xs):
        got, opset = real(path, xs)
        return [g.flip(-1) * 10 for g in got], opset

    monkeypatch.setattr(E, "_run_onnx", argmax_flipped)
    cfg = job_config(
        stages=["finetune_student", "export", "evaluate"], export__formats=["safetensors", "onnx"]
    )
    job_id = add_job(session_factory, tenant_id, cfg)
    assert runner.run_job(session_factory, job_id, worker_settings, log_interval_s=0) == "succeeded"

    job = get_job(session_factory, job_id)
    assert job.status == "succeeded" and job.error is None
    (warning,) = job.metrics["warnings"]
    assert "export format onnx was left out" in warning and "argmax disagrees" in warning
    assert "test" in job.metrics  # evaluate ran (before export)
    with session_factory() as s:
        (model,) = s.scalars(select(Model).where(Model.job_id == job_id)).all()
    assert set(model.files) == {"safetensors", "card"}
    assert Path(model.files["safetensors"]).is_file()
    assert set(model.card["failed_formats"]) == {"onnx"} and set(model.card["files"]) == {"safetensors"}
    assert model.card["metrics"]["test"]["top1"] == job.metrics["student_top1"]
    log = (worker_settings.data_dir / "jobs" / job_id / "job.log").read_text()
    assert "warning: export format onnx was left out" in log and log.rstrip().endswith("job succeeded")


def test_unexpected_error_is_retried_then_fails(
    session_factory, worker_settings, tenant_id, job_config, monkeypatch
):
    def boom(cfg, inputs, out_dir, reporter=None):
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(pipeline.STAGE_FUNCS, "finetune_teacher", boom)
    job_id = add_job(session_factory, tenant_id, job_config())
    with pytest.raises(runner.JobRetry, match="disk on fire"):
        runner.run_job(session_factory, job_id, worker_settings, can_retry=True)
    job = get_job(session_factory, job_id)
    assert job.status == "queued" and "disk on fire" in (job.error or "") and job.attempts == 1
    assert runner.run_job(session_factory, job_id, worker_settings, can_retry=False) == "failed"
    job = get_job(session_factory, job_id)
    assert job.status == "failed" and job.attempts == 2 and job.error == "RuntimeError: disk on fire"
    log = (worker_settings.data_dir / "jobs" / job_id / "job.log").read_text()
    # both attempts, each error with its traceback, the requeue in between
    assert "attempt 1 of pipeline job started" in log and "attempt 2 of pipeline job started" in log
    assert log.count("Traceback (most recent call last)") == 2 and 'raise RuntimeError("disk on fire")' in log
    assert (
        log.index("job requeued")
        < log.index("attempt 2")
        < log.index("job failed: RuntimeError: disk on fire")
    )


def test_progress_is_weighted_by_work(job_config):
    """Each phase weighs its model passes over images (kt_train.progress.plan_phases); the
    teacher-output cache is a phase of the distill stage."""
    cfg = parse_config(job_config(stages=["finetune_teacher", "distill", "export"]))
    plan = plan_phases(cfg)
    probe, cache, distill, export = plan
    assert (probe.name, cache.name, distill.name, export.name) == (
        "teacher linear probe",
        "teacher cache",
        "distill",
        "export",
    )
    assert probe.work == 4 * 8 and distill.work == 3 * 8 * 3  # steps x batch (x 3: forward + backward)
    assert export.work == pytest.approx(0.02 * (probe.work + cache.work + distill.work))
    assert runner.stage_weights(cfg) == {
        "finetune_teacher": probe.work,
        "distill": cache.work + distill.work,
        "export": export.work,
    }
    rep = runner.JobReporter(None, "x", plan)  # type: ignore[arg-type]
    total = probe.work + distill.work + export.work + 16 * 2  # the cache's real size: 16 images x 2
    rep.tracker.begin_stage("finetune_teacher")
    rep.start("teacher linear probe", 4)
    rep.tracker.update("teacher linear probe", 2)
    assert rep.progress() == pytest.approx(16 / (probe.work + cache.work + distill.work + export.work))
    rep.finish("teacher linear probe")
    rep.end_stage("finetune_teacher")
    rep.tracker.begin_stage("distill")
    rep.start("teacher cache", 32)  # the plan's estimate replaced: progress so far stays
    p = rep.progress()
    rep.tracker.update("teacher cache", 32)
    assert rep.progress() == pytest.approx(p + (1 - p) * 32 / (total - probe.work))


def test_backoff_is_exponential_and_capped():
    from worker.tasks import MAX_RETRIES, backoff_s

    assert [backoff_s(i) for i in range(3)] == [10, 20, 40] and backoff_s(20) == 600
    assert MAX_RETRIES == 3


@pytest.fixture(params=["redis+postgres", "embedded-sqlite"])
def worker_backend(request, tmp_path) -> dict[str, str]:
    """Production wiring (Redis broker and results, PostgreSQL jobs) and the embedded default
    (kombu's SQLite-backed broker, SQLite results and jobs)."""
    if request.param == "redis+postgres":
        redis_url = request.getfixturevalue("redis_url")
        pg = request.getfixturevalue("postgres_url")
        return {"database_url": pg, "broker_url": redis_url, "result_backend": redis_url}
    return {
        "database_url": f"sqlite:///{tmp_path / 'kt.db'}",
        "broker_url": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        "result_backend": f"db+sqlite:///{tmp_path / 'results.db'}",
    }


@pytest.mark.e2e
def test_celery_worker_runs_a_job(worker_backend, job_config, tmp_path, subprocess_env):
    """A real `celery worker` process takes the job id from the broker and runs it to success; its
    reaper, at start, requeues a job whose worker died (runs it) and fails one out of attempts."""
    from worker.app import make_celery

    db_url = worker_backend["database_url"]
    init_db(db_url)
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    tenant = add_tenant(factory, name=f"worker-e2e-{tmp_path.name}")
    job_id = add_job(factory, tenant, job_config(stages=["finetune_teacher", "distill", "export"]))
    # rows left `running` by a worker that died an hour ago (no message for them in the broker)
    an_hour_ago = utcnow() - timedelta(hours=1)
    lost = add_job(factory, tenant, job_config(stages=["finetune_teacher"]), status="running", attempts=1)
    exhausted = add_job(factory, tenant, job_config(), status="running", attempts=3)
    with factory() as s:
        s.execute(update(Job).where(Job.id.in_([lost, exhausted])).values(heartbeat_at=an_hour_ago))
        s.commit()
    settings = make_settings(
        tmp_path / "data",
        db_url,
        broker_url=worker_backend["broker_url"],
        result_backend=worker_backend["result_backend"],
    )
    env = {
        **subprocess_env,
        "KT_DATA_DIR": str(settings.data_dir),
        "KT_DATABASE_URL": db_url,
        "KT_BROKER_URL": settings.broker_url,
        "KT_RESULT_BACKEND": settings.result_backend,
        "KT_JOB_HEARTBEAT_TIMEOUT_S": "60",
        "KT_REAPER_INTERVAL_S": "1",
    }
    log_path = tmp_path / "worker.log"
    cmd = [str(VENV_BIN / "celery"), "-A", "worker.app:celery_app", "worker", "-Q", "cpu"]
    cmd += ["--pool", "solo", "-c", "1", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    app = make_celery(settings)
    try:
        app.send_task("kt.run_job", args=[job_id], queue="cpu")
        deadline, job = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            job = get_job(factory, job_id)
            if job.status in ("succeeded", "failed", "canceled") and get_job(factory, lost).status in (
                "succeeded",
                "failed",
            ):
                break
            time.sleep(0.5)
        tail = log_path.read_text(errors="replace")[-3000:]
        assert job is not None and job.status == "succeeded", (
            f"job: {job and job.status} {job and job.error}\n{tail}"
        )
        assert job.attempts == 1 and set(job.stage_timings) == {
            "finetune_teacher",
            "distill",
            "export",
            "workers",
        }
        # every stage ran on this one worker, which records its Celery node name per stage
        assert set(job.stage_timings["workers"]) == {"finetune_teacher", "distill", "export"}
        assert {name.split("@")[0] for name in job.stage_timings["workers"].values()} == {"celery"}
        # the worker lowered its own CPU priority (KT_WORKER_NICE, default 19): the API's requests go first
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == 19
        with factory() as s:
            model = s.scalars(select(Model).where(Model.job_id == job_id)).one()
        assert Path(model.files["safetensors"]).is_file()
        requeued = get_job(factory, lost)
        assert (requeued.status, requeued.attempts) == ("succeeded", 2), f"{requeued.error}\n{tail}"
        failed = get_job(factory, exhausted)
        assert failed.status == "failed" and "all 3 attempts" in (failed.error or "")
        lost_log = (settings.data_dir / "jobs" / lost / "job.log").read_text()
        assert lost_log.index("reaper: requeued to 'cpu'") < lost_log.index(
            "attempt 2 of pipeline job started"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        app.close()
        engine.dispose()


def test_celery_app_configuration():
    import worker.tasks  # noqa: F401 - registers kt.run_job (a shared task) with every app
    from worker.app import VISIBILITY_TIMEOUT_S, make_celery

    redis = make_celery(
        make_settings(
            Path("/tmp/kt"), "sqlite://", broker_url="redis://h:6379/0", result_backend="redis://h/1"
        )
    )
    conf = redis.conf
    assert {q.name for q in conf.task_queues} == {"cpu", "gpu"} and conf.task_create_missing_queues is False
    # a task sent to "gpu" is routed to the gpu queue, not the default one
    assert {q.name: q.routing_key for q in conf.task_queues} == {"cpu": "cpu", "gpu": "gpu"}
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options == {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert "kt.run_job" in redis.tasks
    embedded = make_celery(make_settings(Path("/tmp/kt"), "sqlite://"))
    assert (
        embedded.conf.broker_url.startswith("sqla+sqlite:///") and not embedded.conf.broker_transport_options
    )
