"""Caches shared across jobs (issue 16, part 4): every job's teacher-output cache lives in its
tenant's content-addressed store (``<data_dir>/tenants/<tenant>/cache/teacher_outputs``), so a
second job of the tenant with the same teacher and transfer set skips the build (its stage timings
say so), while another tenant's job builds its own; in-process and through a real Celery worker."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from kt_train.cache_store import entries
from service.db.session import init_db, make_engine, make_session_factory
from tests.conftest import VENV_BIN
from tests.worker.conftest import add_job, add_tenant, get_job, make_settings
from worker import runner

STAGES = ["finetune_teacher", "distill", "export"]


def _config(job_config: Any, **kw: Any) -> dict[str, Any]:
    # the cache always (16 images x 1 view), and a short full finetune of the teacher
    kw = {"distill__cache": {"mode": "cached", "views": 1}, **kw}
    return job_config(stages=STAGES, finetune_teacher__full_finetune__steps=2, **kw)


def _store(settings: Any, tenant: str) -> Path:
    return Path(settings.data_dir) / "tenants" / tenant / "cache" / "teacher_outputs"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_jobs(factory: Any, settings: Any, tenant_a: str, tenant_b: str, a1: str, a2: str, b1: str) -> None:
    jobs = {j: get_job(factory, j) for j in (a1, a2, b1)}
    for j, job in jobs.items():
        assert job.status == "succeeded", (j, job.error)
        assert set(job.stage_timings) == {*STAGES, "teacher_cache", "workers"}
    first, second = sorted([a1, a2], key=lambda j: jobs[j].finished_at)
    built, reused = jobs[first].stage_timings["teacher_cache"], jobs[second].stage_timings["teacher_cache"]
    assert built["built"] is True and built["seconds"] >= 0  # (rounded to 0.01 s: 16 tiny views)
    # the tenant's second job: the same teacher (byte-identical finetuned checkpoint) and transfer set
    assert reused == {"seconds": 0.0, "built": False, "key": built["key"], "saved_seconds": built["seconds"]}
    teacher = [
        Path(settings.data_dir) / "jobs" / j / "run" / "finetune_teacher" / "teacher.pt" for j in (a1, a2)
    ]
    assert _sha(teacher[0]) == _sha(teacher[1])
    # the distill stage's outputs (the model card's lineage) say the same
    lineage = {
        j: json.loads((Path(settings.data_dir) / "jobs" / j / "run" / "distill" / "outputs.json").read_text())
        for j in (first, second)
    }
    assert lineage[first]["teacher_cache"]["built"] is True
    assert lineage[second]["teacher_cache"]["built"] is False
    assert lineage[second]["teacher_cache"]["build_seconds"] == 0.0
    assert lineage[second]["lineage"]["teacher_outputs"] == "cached"
    # one cache in tenant A's store, used by both; tenant B built its own (same key) in its own store
    store_a, store_b = _store(settings, tenant_a), _store(settings, tenant_b)
    assert [e.key for e in entries(store_a)] == [built["key"]]
    other = jobs[b1].stage_timings["teacher_cache"]
    assert other["built"] is True and other["key"] == built["key"]
    assert [e.key for e in entries(store_b)] == [built["key"]]
    assert not (Path(settings.data_dir) / "jobs" / a1 / "run" / "teacher_cache").exists()


def test_jobs_of_a_tenant_share_its_teacher_cache_and_no_other_tenant_does(
    session_factory, worker_settings, job_config, tmp_path
):
    tenant_a = add_tenant(session_factory, "acme")
    tenant_b = add_tenant(session_factory, "globex")
    a1 = add_job(session_factory, tenant_a, _config(job_config))
    a2 = add_job(session_factory, tenant_a, _config(job_config))
    # a config naming another tenant's store gets its own tenant's all the same
    b1 = add_job(
        session_factory,
        tenant_b,
        _config(
            job_config,
            distill__cache={"mode": "cached", "views": 1, "dir": str(_store(worker_settings, tenant_a))},
        ),
    )
    # the worker's config: both caches (teacher outputs, curate embeddings) in the tenant's store
    cfg = runner._build_config(get_job(session_factory, b1), worker_settings)
    root = Path(worker_settings.data_dir) / "tenants" / tenant_b / "cache"
    assert (cfg.distill.cache.dir, cfg.curate.cache_dir) == (
        str(root / "teacher_outputs"),
        str(root / "embeddings"),
    )
    cap = worker_settings.max_cache_bytes_per_tenant
    assert cfg.distill.cache.max_bytes == cfg.curate.cache_max_bytes == cap > 0
    for j in (a1, a2, b1):
        assert runner.run_job(session_factory, j, worker_settings, log_interval_s=0) == "succeeded"
    _check_jobs(session_factory, worker_settings, tenant_a, tenant_b, a1, a2, b1)


def test_the_store_is_capped_per_tenant(session_factory, worker_settings, job_config, tmp_path):
    """KT_MAX_CACHE_BYTES_PER_TENANT: past it, the job's new cache evicts the tenant's least
    recently used one (none in use)."""
    settings = worker_settings.model_copy(update={"max_cache_bytes_per_tenant": 1})
    tenant = add_tenant(session_factory, "acme")
    first = add_job(session_factory, tenant, _config(job_config))
    second = add_job(session_factory, tenant, _config(job_config, seed=1))  # another seed: another cache
    for j in (first, second):
        assert runner.run_job(session_factory, j, settings, log_interval_s=0) == "succeeded"
    keys = [get_job(session_factory, j).stage_timings["teacher_cache"]["key"] for j in (first, second)]
    assert keys[0] != keys[1]
    # over the cap with one entry: the newest stays (it was in use when evict ran), the older went
    assert [e.key for e in entries(_store(settings, tenant))] == [keys[1]]


@pytest.mark.e2e
def test_a_celery_worker_reuses_a_tenants_teacher_cache_for_its_second_job(
    job_config, tmp_path, subprocess_env, redis_url, postgres_url
):
    """Three jobs through a real `celery worker` process on Redis + PostgreSQL: tenant A's two
    jobs with the same teacher and transfer set build the teacher-output cache once; tenant B's
    job, the same config, builds its own."""
    from worker.app import make_celery

    init_db(postgres_url)
    engine = make_engine(postgres_url)
    factory = make_session_factory(engine)
    tenant_a = add_tenant(factory, name=f"cache-a-{tmp_path.name}")
    tenant_b = add_tenant(factory, name=f"cache-b-{tmp_path.name}")
    a1 = add_job(factory, tenant_a, _config(job_config))
    a2 = add_job(factory, tenant_a, _config(job_config))
    b1 = add_job(factory, tenant_b, _config(job_config))
    settings = make_settings(tmp_path / "data", postgres_url, broker_url=redis_url, result_backend=redis_url)
    env = {
        **subprocess_env,
        "KT_DATA_DIR": str(settings.data_dir),
        "KT_DATABASE_URL": postgres_url,
        "KT_BROKER_URL": redis_url,
        "KT_RESULT_BACKEND": redis_url,
    }
    log_path = tmp_path / "worker.log"
    cmd = [str(VENV_BIN / "celery"), "-A", "worker.app:celery_app", "worker", "-Q", "cpu"]
    cmd += ["--pool", "solo", "-c", "1", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    app = make_celery(settings)
    try:
        for j in (a1, a2, b1):
            app.send_task("kt.run_job", args=[j], queue="cpu")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if all(get_job(factory, j).status in ("succeeded", "failed", "canceled") for j in (a1, a2, b1)):
                break
            time.sleep(0.5)
        tail = log_path.read_text(errors="replace")[-3000:]
        for j in (a1, a2, b1):
            job = get_job(factory, j)
            assert job.status == "succeeded", f"{j}: {job.status} {job.error}\n{tail}"
        _check_jobs(factory, settings, tenant_a, tenant_b, a1, a2, b1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        app.close()
        engine.dispose()
