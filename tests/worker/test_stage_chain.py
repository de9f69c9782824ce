"""Per-stage tasks (issue 16 part 3): with ``KT_STAGE_QUEUES`` a pipeline job is a Celery chain of
stage tasks, each on its stage's queue. In-process first (the runner hands a job off at a queue
boundary, the next link or a worker asking the fair scheduler goes on with the same attempt; the
reaper leaves a handed-off job alone; cancel and retry through the API act across the chain), then
with real ``celery worker`` processes: a ``cpu`` and a ``gpu`` worker on Redis run one job's stages
between them while another job is canceled mid-chain, and the embedded default (SQLite database and
broker) runs a chain on its one worker."""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kt_train import pipeline
from kt_train.errors import ConfigError
from service.admin import create_tenant_key
from service.app import create_app
from service.db.models import Job, Model, Tenant, utcnow
from service.db.session import init_db, make_engine, make_session_factory
from service.queue import enqueue_job, stage_queue
from service.settings import Settings
from tests.reliability.conftest import running, start_worker, wait_until, worker_env
from tests.service.conftest import fresh_postgres_database
from tests.worker.conftest import add_job, get_job
from worker import liveness, runner, scheduler, tasks
from worker.app import make_celery

FINAL = ("succeeded", "failed", "canceled")
# The workers take a job for lost after 60 s without a heartbeat (not worker_env's 10 s), and run at
# nice 10 (not KT_WORKER_NICE's 19): on a 2-core machine loaded by other work, a nice-19 worker went
# 11 s, and once over 60 s, without a turn. These tests are not about the reaper nor priorities.
HEARTBEAT = {"KT_JOB_HEARTBEAT_TIMEOUT_S": "60", "KT_THREADS": "1", "KT_WORKER_NICE": "10"}
# the documented example (docs/scale.md): curation on CPU workers, distillation on GPU workers;
# the stages it does not name run on KT_DEFAULT_QUEUE (cpu)
STAGE_QUEUES = {"curate": "cpu", "distill": "gpu"}
ENCODER = "timm:test_efficientnet"  # random init, 32 px: seconds on CPU


def chained(settings: Settings, stage_queues: dict[str, str] | None = None) -> Settings:
    return settings.model_copy(update={"stage_queues": stage_queues or STAGE_QUEUES})


def logged(settings: Settings, job_id: str) -> str:
    return (Path(settings.data_dir) / "jobs" / job_id / "job.log").read_text()


class Sent(list[tuple[str, list[tuple[str, str]]]]):
    """The chains a task would have sent: (job id, links)."""

    def __call__(self, job_id: str, links: list[tuple[str, str]]) -> None:
        self.append((job_id, links))


def run_on(factory: sessionmaker[Session], settings: Settings, job: Job, queue: str, sent: Sent) -> str:
    """What a Celery task serving ``queue`` on worker ``<queue>-w`` does with a claimed job."""
    return runner.run_claimed(
        factory, job, settings, serving=queue, dispatch=sent, worker_name=f"{queue}-w", log_interval_s=0
    )


# --- routing -------------------------------------------------------------------------------------


def test_stage_queues_route_the_stages_of_jobs_that_name_no_device(tmp_path: Path, monkeypatch) -> None:
    routed = Settings(data_dir=tmp_path, stage_queues="curate=cpu, distill=gpu")
    assert routed.stage_queues == STAGE_QUEUES
    assert [stage_queue(s, "auto", routed) for s in ("curate", "distill", "export")] == ["cpu", "gpu", "cpu"]
    assert stage_queue("distill", None, routed) == "gpu"
    # a job that names its device stays on that device's queue; no stage queues: nothing is routed
    assert stage_queue("distill", "cpu", routed) is None and stage_queue("curate", "cuda:1", routed) is None
    assert stage_queue("distill", None, Settings(data_dir=tmp_path)) is None
    monkeypatch.setenv("KT_STAGE_QUEUES", '{"distill": "gpu"}')
    assert Settings(data_dir=tmp_path).stage_queues == {"distill": "gpu"}
    with pytest.raises(ValidationError, match=r"names no stage \['cache'\]; the stages are finetune_teacher"):
        Settings(data_dir=tmp_path, stage_queues="cache=gpu")
    with pytest.raises(ValidationError, match="'cpu' or 'gpu'"):
        Settings(data_dir=tmp_path, stage_queues="distill=tpu")
    # one link per run of consecutive stages on one queue; a stage routed nowhere joins the run before it
    routes = [("curate", None), ("distill", "gpu"), ("finetune_student", "cpu"), ("export", "cpu")]
    assert runner.chain_links(routes, "cpu") == [
        ("curate", "cpu"),
        ("distill", "gpu"),
        ("finetune_student", "cpu"),
    ]
    assert runner.chain_links(routes[1:], "cpu") == [("distill", "gpu"), ("finetune_student", "cpu")]


def test_a_hand_off_forwards_the_chain_the_link_came_with(tmp_path: Path, monkeypatch) -> None:
    """``send_chain``: a new chain of ``kt.run_stage`` links, one per queue run, each on its queue;
    at the next hop the link forwards the chain it came with (the same pre-assigned task ids)."""
    settings = Settings(data_dir=tmp_path, broker_url="memory://", result_backend="cache+memory://")
    app = make_celery(settings)
    monkeypatch.setattr(tasks, "celery_app", app)

    def drain(queue: str) -> list[Any]:
        with app.connection_for_read() as conn:
            q = conn.SimpleQueue(queue)
            messages = []
            while len(q):
                message = q.get(timeout=1)
                message.ack()
                messages.append(message)
            q.close()
            return messages

    tasks.send_chain("j1", [("distill", "gpu"), ("finetune_student", "cpu")])
    (first,) = drain("gpu")
    assert drain("cpu") == []
    args, _, embed = first.payload
    assert (first.headers["task"], args) == ("kt.run_stage", ["j1", "distill"])
    (rest,) = embed["chain"]
    assert (rest["args"], rest["options"]["queue"]) == (["j1", "finetune_student"], "cpu")
    tasks.send_chain("j1", [("finetune_student", "cpu")], carried=embed["chain"])
    (second,) = drain("cpu")
    assert second.headers["id"] == rest["options"]["task_id"] and second.payload[0] == [
        "j1",
        "finetune_student",
    ]
    # a carried chain that does not go on with that stage there: a new chain instead
    tasks.send_chain("j1", [("finetune_student", "gpu")], carried=embed["chain"])
    (third,) = drain("gpu")
    assert third.headers["id"] != rest["options"]["task_id"] and third.payload[0] == [
        "j1",
        "finetune_student",
    ]


def test_a_job_ending_wakes_its_tenants_other_queues(
    session_factory, worker_settings, tenant_id, monkeypatch
):
    """A job that waited on another queue for its tenant's running slot is started by a message
    there; a tenant that was below its cap (2) has none sent."""
    woken: list[tuple[str, str]] = []
    monkeypatch.setattr(tasks, "enqueue_job", lambda settings, job_id, queue: woken.append((job_id, queue)))
    done = add_job(session_factory, tenant_id, {}, status="succeeded")
    waiting_gpu = add_job(session_factory, tenant_id, {}, queue="gpu")
    add_job(session_factory, tenant_id, {}, queue="cpu")  # this worker's own queue: it serves it next
    tasks._wake_tenant(session_factory, worker_settings, get_job(session_factory, done), "cpu")
    assert woken == []
    add_job(session_factory, tenant_id, {}, status="running")  # with the one that ended: at its cap
    tasks._wake_tenant(session_factory, worker_settings, get_job(session_factory, done), "cpu")
    assert woken == [(waiting_gpu, "gpu")]


# --- one job's chain, in-process -------------------------------------------------------------------


def test_a_job_goes_from_stage_task_to_stage_task_as_one_attempt(
    session_factory, worker_settings, tenant_id, job_config
):
    settings = chained(worker_settings, {"distill": "gpu"})
    job_id = add_job(session_factory, tenant_id, job_config(device="auto"))
    sent = Sent()

    # the task that started the job on cpu runs finetune_teacher (and curate: no gallery, nothing to
    # route), then hands the job to the gpu queue at distill
    job = scheduler.claim_next(session_factory, settings, "cpu")
    assert job is not None and job.attempts == 1 and scheduler.continues_at(job) is None
    assert run_on(session_factory, settings, job, "cpu", sent) == "queued"
    assert sent == [(job_id, [("distill", "gpu"), ("finetune_student", "cpu")])]
    row = get_job(session_factory, job_id)
    assert (row.status, row.queue, row.stage, row.attempts, row.eta_s) == (
        "queued",
        "gpu",
        "distill",
        1,
        None,
    )
    assert 0.0 < row.progress < 1.0 and scheduler.waiting_stage(row) == "distill"
    assert row.stage_timings["workers"] == {"finetune_teacher": "cpu-w", "curate": "cpu-w"}

    # queued between two stage tasks: the reaper (which looks at running jobs) leaves it alone
    later = utcnow() + timedelta(hours=1)
    requeue: list[tuple[str, str]] = []
    found = liveness.reap_lost_jobs(
        session_factory, settings, now=later, enqueue=lambda s, j, q: requeue.append((j, q))
    )
    assert (found.requeued, found.failed, requeue) == ([], [], [])
    assert get_job(session_factory, job_id).status == "queued"

    # nobody on cpu takes it; a link for another stage does not; the distill link on gpu does, as
    # the same attempt
    assert scheduler.claim_next(session_factory, settings, "cpu") is None
    assert scheduler.claim_stage(session_factory, settings, job_id, "finetune_student", "gpu") is None
    job = scheduler.claim_stage(session_factory, settings, job_id, "distill", "gpu")
    assert job is not None and job.attempts == 1 and scheduler.continues_at(job) == "distill"
    assert scheduler.claim_stage(session_factory, settings, job_id, "distill", "gpu") is None  # once
    assert run_on(session_factory, settings, job, "gpu", sent) == "queued"
    assert sent[-1] == (job_id, [("finetune_student", "cpu")])
    row = get_job(session_factory, job_id)
    assert (row.status, row.queue, row.stage, row.attempts) == ("queued", "cpu", "finetune_student", 1)

    # a worker on cpu asking the fair scheduler for its next job goes on with it too (its link was
    # lost, or comes later and finds nothing to do)
    job = scheduler.claim_next(session_factory, settings, "cpu")
    assert job is not None and job.id == job_id and job.attempts == 1
    assert run_on(session_factory, settings, job, "cpu", sent) == "succeeded"
    assert len(sent) == 2
    row = get_job(session_factory, job_id)
    assert (row.status, row.progress, row.attempts, row.error) == ("succeeded", 1.0, 1, None)
    cpu_stages = ("finetune_teacher", "curate", "finetune_student", "evaluate", "export")
    assert row.stage_timings["workers"] == {**dict.fromkeys(cpu_stages, "cpu-w"), "distill": "gpu-w"}
    assert all(isinstance(row.stage_timings[s], float) for s in (*cpu_stages, "distill"))
    with session_factory() as s:
        assert s.scalars(select(Model).where(Model.job_id == job_id)).one().files["safetensors"]
    log = logged(settings, job_id)
    assert (
        "stage distill: queued on 'gpu' for the chain's next stage task (distill on gpu, finetune_student on cpu)"
        in log
    )
    assert "attempt 1 goes on at stage distill on gpu-w (queue gpu)" in log
    assert "stage finetune_teacher: done by an earlier stage task, reusing it" in log
    assert log.count("attempt 1 of pipeline job started on cpu-w") == 1 and "attempt 2" not in log


def test_a_job_whose_next_stage_is_elsewhere_is_handed_off_before_any_model_is_loaded(
    session_factory, worker_settings, tenant_id, job_config, monkeypatch
):
    settings = chained(worker_settings, {"finetune_teacher": "gpu", "distill": "gpu"})
    job_id = add_job(session_factory, tenant_id, job_config(device="auto"))

    def no_models(cfg):
        raise AssertionError("timed the models on a worker that runs none of the job's stages")

    monkeypatch.setattr(runner, "model_costs", no_models)
    sent = Sent()
    job = scheduler.claim_next(session_factory, settings, "cpu")  # queued on cpu, as the API does
    assert job is not None and run_on(session_factory, settings, job, "cpu", sent) == "queued"
    # curate has no gallery here: it runs wherever the stages around it run
    assert sent == [(job_id, [("finetune_teacher", "gpu"), ("finetune_student", "cpu")])]
    row = get_job(session_factory, job_id)
    assert (row.status, row.queue, row.stage, row.attempts) == ("queued", "gpu", "finetune_teacher", 1)
    assert "stage finetune_teacher: started" not in logged(settings, job_id)


def test_a_lost_stage_task_is_requeued_to_its_stage_queue_as_a_new_attempt(
    session_factory, worker_settings, tenant_id, job_config
):
    settings = chained(worker_settings, {"distill": "gpu"})
    job_id = add_job(session_factory, tenant_id, job_config(device="auto"))
    sent = Sent()
    job = scheduler.claim_next(session_factory, settings, "cpu")
    assert job is not None and run_on(session_factory, settings, job, "cpu", sent) == "queued"
    job = scheduler.claim_stage(session_factory, settings, job_id, "distill", "gpu")
    assert job is not None
    # the gpu worker dies before its first heartbeat: the reaper requeues the job to gpu
    requeue: list[tuple[str, str]] = []
    later = utcnow() + timedelta(hours=1)
    found = liveness.reap_lost_jobs(
        session_factory, settings, now=later, enqueue=lambda s, j, q: requeue.append((j, q))
    )
    assert found.requeued == [job_id] and requeue == [(job_id, "gpu")]
    row = get_job(session_factory, job_id)
    assert (row.status, row.queue) == ("queued", "gpu") and scheduler.waiting_stage(row) is None
    # the redelivered link finds nothing to go on with; the worker asking for the next job starts
    # it as a new attempt, which resumes at distill
    assert scheduler.claim_stage(session_factory, settings, job_id, "distill", "gpu") is None
    job = scheduler.claim_next(session_factory, settings, "gpu")
    assert job is not None and job.attempts == 2 and scheduler.continues_at(job) is None
    assert run_on(session_factory, settings, job, "gpu", sent) == "queued"
    assert sent[-1] == (job_id, [("finetune_student", "cpu")])
    assert "stage finetune_teacher: done by an earlier attempt, reusing it" in logged(settings, job_id)


def test_a_chain_the_broker_refuses_is_left_to_the_reaper_on_the_next_stages_queue(
    session_factory, worker_settings, tenant_id, job_config
):
    settings = chained(worker_settings, {"distill": "gpu"})
    job_id = add_job(session_factory, tenant_id, job_config(device="auto"))

    def broker_down(job_id: str, links: list[tuple[str, str]]) -> None:
        raise ConnectionError("redis is down")

    job = scheduler.claim_next(session_factory, settings, "cpu")
    assert job is not None
    runs = runner.run_claimed(session_factory, job, settings, serving="cpu", dispatch=broker_down)
    assert runs == "running"
    row = get_job(session_factory, job_id)
    assert (row.status, row.queue, row.attempts) == ("running", "gpu", 1) and "handoff" not in row.params
    requeue: list[tuple[str, str]] = []
    later = utcnow() + timedelta(hours=1)
    liveness.reap_lost_jobs(
        session_factory, settings, now=later, enqueue=lambda s, j, q: requeue.append((j, q))
    )
    assert requeue == [(job_id, "gpu")] and get_job(session_factory, job_id).status == "queued"
    assert "the chain could not be sent (redis is down)" in logged(settings, job_id)


@contextmanager
def api_client(settings: Settings, tenant: str) -> Iterator[TestClient]:
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            key = create_tenant_key(session, tenant)
    finally:
        engine.dispose()
    # no ingest processes nor webhook poller: this client only cancels and retries
    quiet = settings.model_copy(update={"ingest_processes": 0, "webhook_poll_interval_s": 0})
    with TestClient(create_app(quiet, migrate=False)) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        yield client


def test_cancel_and_retry_act_across_the_chain(
    session_factory, worker_settings, tenant_id, job_config, monkeypatch
):
    """Canceled while it waits between two stage tasks: canceled at once, and the chain's next link
    finds nothing to do. A retry goes back to the queue of the stage it stopped at and resumes there
    as a new attempt; a stage that fails on its queue fails the job, and a retry resumes at it."""
    settings = chained(worker_settings, {"distill": "gpu"})
    job_id = add_job(session_factory, tenant_id, job_config(device="auto"))
    sent = Sent()
    job = scheduler.claim_next(session_factory, settings, "cpu")
    assert job is not None and run_on(session_factory, settings, job, "cpu", sent) == "queued"
    with api_client(settings, "acme") as client:  # the tenant of tenant_id
        canceled = client.post(f"/v1/jobs/{job_id}/cancel")
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        assert scheduler.claim_stage(session_factory, settings, job_id, "distill", "gpu") is None
        assert scheduler.claim_next(session_factory, settings, "gpu") is None

        retried = client.post(f"/v1/jobs/{job_id}/retry")
        assert retried.status_code == 202 and (retried.json()["status"], retried.json()["queue"]) == (
            "queued",
            "gpu",
        )
        # the retry is a new attempt: the old chain's link does not take it, a worker on gpu does
        assert scheduler.claim_stage(session_factory, settings, job_id, "distill", "gpu") is None
        job = scheduler.claim_next(session_factory, settings, "gpu")
        assert job is not None and job.attempts == 2 and scheduler.continues_at(job) is None

        def broken(cfg, inputs, out_dir, reporter=None):
            raise ConfigError("distill.temperature is out of range")

        monkeypatch.setitem(pipeline.STAGE_FUNCS, "distill", broken)
        assert run_on(session_factory, settings, job, "gpu", sent) == "failed"
        row = get_job(session_factory, job_id)
        assert (row.status, row.stage, row.queue) == ("failed", "distill", "gpu")
        assert set(row.stage_timings["workers"]) == {"finetune_teacher", "curate"}
        monkeypatch.undo()

        assert client.post(f"/v1/jobs/{job_id}/retry").status_code == 202
        job = scheduler.claim_next(session_factory, settings, "gpu")
        assert job is not None and job.attempts == 3
        assert run_on(session_factory, settings, job, "gpu", sent) == "queued"
        job = scheduler.claim_stage(session_factory, settings, job_id, "finetune_student", "cpu")
        assert job is not None and job.attempts == 3
        assert run_on(session_factory, settings, job, "cpu", sent) == "succeeded"
        done = client.get(f"/v1/jobs/{job_id}").json()
    assert (done["status"], done["attempts"]) == ("succeeded", 3)
    assert done["stage_timings"]["workers"]["distill"] == "gpu-w"
    log = logged(settings, job_id)
    # finetune_teacher ran once, on the first attempt
    assert log.count("stage finetune_teacher: started") == 1
    assert "job failed: distill.temperature is out of range" in log


# --- real worker processes ---------------------------------------------------------------------------


def node(name: str) -> str:
    """The Celery node name ``tests.reliability.conftest.worker_cmd`` gives a worker."""
    return f"{name}-{os.getpid()}@{socket.gethostname()}"


def wait_final(
    factory: sessionmaker[Session], job_ids: list[str], timeout: float, tail: Callable[[], str]
) -> None:
    def done() -> bool:
        return all(get_job(factory, j).status in FINAL for j in job_ids)

    wait_until(done, timeout, f"jobs {job_ids} to end", tail)


@pytest.fixture
def gallery_dir(worker_demo_data: dict[str, Path], tmp_path: Path) -> Path:
    from kt_train.gallery import build_gallery

    out = tmp_path / "gallery"
    build_gallery([worker_demo_data["transfer"]], out, encoder=ENCODER, image_size=32, index_kind="flat")
    return out


def test_a_cpu_and_a_gpu_worker_run_one_jobs_stages_between_them(
    tmp_path: Path, redis_url: str, job_config, gallery_dir: Path
) -> None:
    """Two ``celery worker`` processes on Redis and PostgreSQL, one on ``-Q cpu`` and one on
    ``-Q gpu``, with ``KT_STAGE_QUEUES=curate=cpu,distill=gpu``. Job A, sent to cpu as the API does:
    finetune_teacher and curate on the cpu worker, distill on the gpu worker, the rest on the cpu
    worker again, one attempt, one model. Job B, queued with it, is canceled while it distills on
    the gpu worker: it ends canceled at distill, and the rest of its chain never runs."""
    curate = {"gallery": str(gallery_dir), "size": 8, "crops": 1, "formats": ["jsonl"], "report": False}
    with fresh_postgres_database("kt_chain") as db_url:
        init_db(db_url)
        engine = make_engine(db_url)
        factory = make_session_factory(engine)
        settings = Settings(
            data_dir=tmp_path / "data", database_url=db_url, broker_url=redis_url, result_backend=redis_url
        )
        env = worker_env(
            settings.data_dir, db_url, redis_url, KT_STAGE_QUEUES="curate=cpu,distill=gpu", **HEARTBEAT
        )
        logs = {q: tmp_path / f"{q}.log" for q in ("cpu", "gpu")}
        try:
            with (
                api_client(settings, "chain") as client,
                running(start_worker(env, logs["cpu"], "cpu", queues="cpu")) as cpu,
                running(start_worker(env, logs["gpu"], "gpu", queues="gpu")) as gpu,
            ):
                with factory() as s:
                    tenant = s.scalars(select(Tenant).where(Tenant.name == "chain")).one().id

                def tail() -> str:
                    return cpu.tail() + "\n" + gpu.tail()

                a = add_job(factory, tenant, job_config(device="auto", curate=curate))
                b = add_job(factory, tenant, job_config(device="auto", curate=curate, distill__steps=5000))
                for job_id in (a, b):
                    enqueue_job(settings, job_id, "cpu")

                def distilling() -> bool:  # running at distill: the gpu worker holds it
                    row = get_job(factory, b)
                    assert row.status not in FINAL, f"job B {row.status} before the cancel: {row.error}"
                    return row.status == "running" and row.stage == "distill"

                wait_until(distilling, 300, "job B to distill on the gpu worker", tail)
                response = client.post(f"/v1/jobs/{b}/cancel")
                assert response.status_code == 200, response.text
                wait_final(factory, [a, b], 300, tail)
                time.sleep(1)  # whatever either worker would do next
        finally:
            engine.dispose()

        job_a, job_b = get_job(factory, a), get_job(factory, b)
        assert (job_a.status, job_a.attempts, job_a.error) == ("succeeded", 1, None), tail()
        cpu_stages = ("finetune_teacher", "curate", "finetune_student", "evaluate", "export")
        assert job_a.stage_timings["workers"] == {
            **dict.fromkeys(cpu_stages, node("cpu")),
            "distill": node("gpu"),
        }
        with make_session_factory(make_engine(db_url))() as s:
            model = s.scalars(select(Model).where(Model.job_id == a)).one()
        assert Path(model.files["safetensors"]).is_file()
        log_a = logged(settings, a)
        assert "stage curate: started on " + node("cpu") in log_a
        assert f"attempt 1 goes on at stage distill on {node('gpu')} (queue gpu)" in log_a
        assert f"attempt 1 goes on at stage finetune_student on {node('cpu')} (queue cpu)" in log_a

        assert (job_b.status, job_b.stage, job_b.attempts) == ("canceled", "distill", 1)
        assert job_b.stage_timings["workers"] == {"finetune_teacher": node("cpu"), "curate": node("cpu")}
        run_b = settings.data_dir / "jobs" / b / "run"
        assert (run_b / "curate" / "_SUCCESS").is_file() and not (run_b / "distill" / "_SUCCESS").exists()
        assert not (run_b / "finetune_student").exists()
        log_b = logged(settings, b)
        assert f"attempt 1 goes on at stage distill on {node('gpu')} (queue gpu)" in log_b
        assert log_b.rstrip().endswith("job canceled") and "stage finetune_student" not in log_b
        # both workers took chain links; B's chain ended at its distill link (nothing went back to cpu)
        cpu_log, gpu_log = logs["cpu"].read_text(), logs["gpu"].read_text()
        assert re.search(r"Task kt\.run_stage\[[^\]]+\] received", gpu_log)
        assert re.search(r"Task kt\.run_job\[[^\]]+\] received", cpu_log)
        assert re.search(r"Task kt\.run_stage\[[^\]]+\] received", cpu_log)
        assert f"{b} from finetune_student" not in cpu_log


def test_the_embedded_default_runs_a_chain_on_its_one_worker(tmp_path: Path, job_config) -> None:
    """SQLite database, kombu's SQLite broker and result backend, one worker on both queues (as
    ``kt serve`` starts it): the job's distill link goes through the broker to the same worker."""
    data_dir = tmp_path / "data"
    db_url = f"sqlite:///{tmp_path / 'kt.db'}"
    broker = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    init_db(db_url)
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    settings = Settings(
        data_dir=data_dir,
        database_url=db_url,
        broker_url=broker,
        result_backend=f"db+sqlite:///{tmp_path / 'results.db'}",
    )
    env = worker_env(
        data_dir,
        db_url,
        broker,
        KT_RESULT_BACKEND=settings.result_backend,
        KT_STAGE_QUEUES="distill=gpu",
        **HEARTBEAT,
    )
    try:
        with factory() as s:
            tenant = Tenant(name="embedded")
            s.add(tenant)
            s.commit()
            tenant_id = tenant.id
        job_id = add_job(
            factory, tenant_id, job_config(device="auto", stages=["finetune_teacher", "distill", "export"])
        )
        with running(start_worker(env, tmp_path / "worker.log", "embedded", queues="cpu,gpu")) as worker:
            enqueue_job(settings, job_id, "cpu")
            wait_final(factory, [job_id], 300, worker.tail)
            job = get_job(factory, job_id)
            assert (job.status, job.attempts, job.error) == ("succeeded", 1, None), worker.tail()
            assert job.stage_timings["workers"] == dict.fromkeys(
                ("finetune_teacher", "distill", "export"), node("embedded")
            )
            log = logged(settings, job_id)
            assert (
                "stage distill: queued on 'gpu' for the chain's next stage task (distill on gpu, export on cpu)"
                in log
            )
            assert "attempt 1 goes on at stage export" in log
            assert re.search(
                rf"kt\.run_stage\[[^\]]+\] succeeded in [^:]+: '{job_id} from distill: queued",
                worker.tail(100_000),
            )
    finally:
        engine.dispose()
