"""Workers that die or are told to stop, with real processes: ``kt serve`` (``python -m
service.serve``) and its embedded worker on SQLite, and external Celery workers on a private Redis
and a fresh PostgreSQL database (the production shape) behind a separate uvicorn API.

- Under ``kt serve``, SIGTERM and then ``kill -9`` of the embedded worker while it distills: each
  time the job is handed back to ``queued`` at once (not after the 300 s job heartbeat timeout),
  ``/readyz`` answers 503 naming the dead worker and why, the supervisor restarts the worker and
  ``/readyz`` answers 200 again; the job resumes from its finished stages and checkpoint and
  succeeds. The kill -> ready time is printed (the restart time the README quotes).
- External workers: an API with no worker anywhere is ready (nothing says workers are expected);
  a worker told to stop hands its job back within seconds and exits without waiting for the job,
  another worker resumes it, ``/readyz`` stays 200 while that other worker lives, and answers 503
  once the last worker is killed and its heartbeat goes stale.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from service.db.models import Job, Model, Worker
from service.queue import enqueue_job
from service.settings import Settings
from tests.conftest import VENV_BIN
from tests.reliability.conftest import (
    Proc,
    RedisServer,
    child_env,
    free_port,
    job_config,
    running,
    session_factory,
    start_api,
    start_worker,
    wait_until,
    worker_env,
)
from tests.worker.conftest import add_job, add_tenant, get_job

FINAL = ("succeeded", "failed", "canceled")
DISTILL_STEPS = 1500
CHECKPOINT_EVERY = 20
HAND_BACK_S = 5.0  # the job is back in the queue this soon after its worker is signalled
DETECT_S = 3.0  # kt serve's /readyz says the worker is gone this soon after it died
SERVE_RESTART_S = 5.0  # kt serve starts a new worker process this soon after one died
BOOT_S = 120.0  # a new worker process (Python, Celery, torch) is up within this on a loaded machine


def long_job(data: dict[str, Path]) -> dict[str, Any]:
    """Teacher, then a distillation long enough to be interrupted twice, checkpointing often."""
    return job_config(
        data,
        stages=["finetune_teacher", "distill", "export"],
        distill__steps=DISTILL_STEPS,
        checkpoint_every=CHECKPOINT_EVERY,
    )


def ready(url: str) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"{url}/readyz", timeout=5)
    return response.status_code, response.json()


def holder_pid(factory: Any, job_id: str, attempt: int) -> int | None:
    """The pid of the worker process whose row says it runs ``attempt`` of ``job_id``."""
    with factory() as s:
        row = s.scalars(select(Worker).where(Worker.job_id == job_id, Worker.attempt == attempt)).first()
        return row.pid if row is not None else None


def distilling(factory: Any, job_id: str, attempt: int, run_dir: Path, context: Any) -> bool:
    """``attempt`` runs distillation past a checkpoint (and its worker row names it)."""
    job = get_job(factory, job_id)
    assert job.status not in FINAL, f"job {job.status} too early: {job.error}\n{context()}"
    checkpointed = (run_dir / "distill" / "last.ckpt").is_file()
    held = holder_pid(factory, job_id, attempt) is not None
    return (
        job.status == "running"
        and job.attempts == attempt
        and job.stage == "distill"
        and checkpointed
        and held
    )


def handed_back(factory: Any, job_id: str, attempt: int) -> Job | None:
    """The job once ``attempt`` no longer holds it (queued again, or taken by a later attempt)."""
    job = get_job(factory, job_id)
    return job if job.status != "running" or job.attempts > attempt else None


def printed(proc: Proc, text: str) -> bool:
    return text in proc.log.read_text(errors="replace")


def start_serve(tmp_path: Path, data_dir: Path) -> tuple[Proc, str]:
    """``python -m service.serve`` with one worker; returns once it printed "ready"."""
    port = free_port()
    cmd = [str(VENV_BIN / "python"), "-m", "service.serve", "--port", str(port), "--data-dir", str(data_dir)]
    proc = Proc(cmd, child_env(), tmp_path / "serve.log")

    def printed_ready() -> bool:
        assert proc.alive(), f"kt serve exited with {proc.popen.returncode}\n{proc.tail()}"
        return "\nready\n" in proc.log.read_text(errors="replace")

    try:
        wait_until(printed_ready, BOOT_S, "kt serve to print 'ready'", proc.tail)
    except BaseException:
        proc.stop()
        raise
    return proc, f"http://127.0.0.1:{port}"


@pytest.mark.slow
@pytest.mark.e2e
def test_kt_serve_restarts_its_worker_and_the_job_resumes(
    tmp_path: Path, rel_demo_data: dict[str, Path]
) -> None:
    data_dir = tmp_path / "data"
    serve, url = start_serve(tmp_path, data_dir)
    settings = Settings(data_dir=data_dir)
    worker_log = data_dir / "logs" / "worker-0.log"

    def context() -> str:
        text = worker_log.read_text(errors="replace")[-3000:] if worker_log.exists() else ""
        return f"{serve.tail()}\n--- worker-0.log ---\n{text}"

    with running(serve), session_factory(settings.database_url, migrate=False) as factory:
        status, body = ready(url)
        assert (status, body["workers_alive"]) == (200, 1), body
        job_id = add_job(factory, add_tenant(factory, "restart"), long_job(rel_demo_data))
        run_dir = data_dir / "jobs" / job_id / "run"
        enqueue_job(settings, job_id, "cpu")

        # --- SIGTERM: the worker hands the job back at once and exits; kt serve starts another
        wait_until(
            lambda: distilling(factory, job_id, 1, run_dir, context), BOOT_S, "attempt 1 to distill", context
        )
        first = holder_pid(factory, job_id, 1)
        assert first is not None
        os.kill(first, signal.SIGTERM)
        t0 = time.monotonic()
        job = wait_until(
            lambda: handed_back(factory, job_id, 1), HAND_BACK_S, "the job to be handed back", context
        )
        assert job.status == "queued" and "was told to stop (SIGTERM, warm shutdown)" in (job.error or ""), (
            job.error
        )
        assert job.params["attempts_before_retry"] == 1  # a worker told to stop costs the job no attempt
        status, body = wait_until(lambda: (r := ready(url))[0] == 503 and r, DETECT_S, "/readyz 503", context)
        # the stopping worker's row says why while it shuts down; once it has exited cleanly its row
        # is gone and /readyz can only say that none is alive (CI's fast machine polled after that)
        reason = body["failed"]["workers"]
        assert "was told to stop (SIGTERM" in reason or "no worker is alive" in reason, body
        wait_until(
            lambda: printed(serve, "exited with code 0"), SERVE_RESTART_S + 15, "the worker to exit", context
        )
        wait_until(lambda: ready(url)[0] == 200, BOOT_S, "/readyz 200 after the SIGTERM", context)
        sigterm_s = time.monotonic() - t0

        # --- kill -9: kt serve sees the pid die, hands the job back and restarts the worker
        wait_until(
            lambda: distilling(factory, job_id, 2, run_dir, context), BOOT_S, "attempt 2 to distill", context
        )
        second = holder_pid(factory, job_id, 2)
        assert second is not None and second != first
        os.kill(second, signal.SIGKILL)
        t0 = time.monotonic()
        status, body = wait_until(lambda: (r := ready(url))[0] == 503 and r, DETECT_S, "/readyz 503", context)
        unready_s = time.monotonic() - t0
        assert (
            f"(pid {second} on " in body["failed"]["workers"] and "was killed by SIGKILL" in body["detail"]
        ), body
        assert body["workers_alive"] == 0
        job = wait_until(
            lambda: handed_back(factory, job_id, 2), HAND_BACK_S, "the job to be handed back", context
        )
        requeued_s = time.monotonic() - t0
        assert job.status == "queued" and "was killed by SIGKILL" in (job.error or ""), job.error
        wait_until(
            lambda: printed(serve, f"(was pid {second})"), SERVE_RESTART_S, "the worker restart", context
        )
        wait_until(lambda: ready(url)[0] == 200, BOOT_S, "/readyz 200 after the kill", context)
        restart_s = time.monotonic() - t0

        job = wait_until(
            lambda: (j := get_job(factory, job_id)).status in FINAL and j, 300, "the job", context
        )
        assert job.status == "succeeded", f"{job.status}: {job.error}\n{context()}"
        assert job.attempts == 3 and job.progress == 1.0
        with factory() as s:
            assert len(s.scalars(select(Model).where(Model.job_id == job_id)).all()) == 1

    log = (data_dir / "jobs" / job_id / "job.log").read_text()
    assert "worker: requeued to 'cpu'" in log and "kt serve: requeued to 'cpu'" in log
    third = log[log.index("attempt 3 of pipeline job started") :]
    assert "stage finetune_teacher: done by an earlier attempt, reusing it" in third
    assert "resuming from step" in third  # distillation went on from its checkpoint
    out = serve.log.read_text()
    assert f"worker 0 (pid {first}) exited with code 0" in out
    assert f"worker 0 (pid {second}) was killed by SIGKILL" in out and "restarting it in" in out
    assert serve.popen.returncode == 0, out[-2000:]
    print(
        f"\nkt serve: SIGTERM -> /readyz 200 again in {sigterm_s:.1f} s; kill -9 -> /readyz 503 in "
        f"{unready_s:.2f} s, job queued in {requeued_s:.2f} s, /readyz 200 again in {restart_s:.1f} s"
    )


@pytest.mark.slow
def test_external_workers_readiness_and_hand_back_on_sigterm(
    tmp_path: Path, rel_demo_data: dict[str, Path], private_redis: RedisServer, pg_url: str
) -> None:
    data_dir = tmp_path / "data"
    # the job heartbeat timeout stays long: a prompt requeue can only come from the hand-back
    env = worker_env(
        data_dir,
        pg_url,
        private_redis.url,
        KT_JOB_HEARTBEAT_TIMEOUT_S="300",
        KT_WORKER_HEARTBEAT_TIMEOUT_S="2",
    )
    settings = Settings(
        data_dir=data_dir, database_url=pg_url, broker_url=private_redis.url, result_backend=private_redis.url
    )
    api, url = start_api(env, tmp_path / "api.log")
    with running(api), session_factory(pg_url) as factory:
        status, body = ready(url)
        assert (status, body["workers_alive"]) == (200, 0), body  # no worker expected yet: not unready

        first = start_worker(env, tmp_path / "first.log", "first")
        with running(first):
            wait_until(
                lambda: ready(url) == (200, {"status": "ok", "workers_alive": 1}), 10, "1 worker", api.tail
            )
            job_id = add_job(factory, add_tenant(factory, "external"), long_job(rel_demo_data))
            run_dir = data_dir / "jobs" / job_id / "run"
            enqueue_job(settings, job_id, "cpu")
            wait_until(
                lambda: distilling(factory, job_id, 1, run_dir, first.tail), 120, "attempt 1", first.tail
            )
            second = start_worker(env, tmp_path / "second.log", "second")
            with running(second):
                wait_until(lambda: ready(url)[1]["workers_alive"] == 2, 10, "2 workers", api.tail)

                first.popen.send_signal(signal.SIGTERM)
                t0 = time.monotonic()
                job = wait_until(
                    lambda: handed_back(factory, job_id, 1), HAND_BACK_S, "the hand-back", first.tail
                )
                handed_back_s = time.monotonic() - t0
                assert "the worker running attempt 1 was told to stop (SIGTERM" in (job.error or ""), (
                    job.error
                )
                assert ready(url)[0] == 200  # the other worker is alive: still ready
                # the stopping worker does not wait for the job: it exits once its attempt noticed
                assert first.popen.wait(timeout=30) == 0, first.tail()
                stopped_s = time.monotonic() - t0

                job = wait_until(
                    lambda: (j := get_job(factory, job_id)).status in FINAL and j, 300, "the job", second.tail
                )
                assert job.status == "succeeded", f"{job.status}: {job.error}\n{second.tail()}"
                assert job.attempts == 2 and job.params["attempts_before_retry"] == 1
                log = (data_dir / "jobs" / job_id / "job.log").read_text()
                resumed = log[log.index("attempt 2 of pipeline job started") :]
                assert "stage finetune_teacher: done by an earlier attempt, reusing it" in resumed
                assert "resuming from step" in resumed
                assert ready(url) == (200, {"status": "ok", "workers_alive": 1})

                second.kill()  # kill -9 of the last worker: nobody tells the API; its heartbeat stops
                t0 = time.monotonic()
                status, body = wait_until(
                    lambda: (r := ready(url))[0] == 503 and r, 10, "/readyz 503", api.tail
                )
                stale_s = time.monotonic() - t0
                assert (
                    body["workers_alive"] == 0 and "sent its last heartbeat" in body["failed"]["workers"]
                ), body
                assert f"second-{os.getpid()}@" in body["detail"], body
    print(
        f"\nexternal workers: SIGTERM -> job handed back in {handed_back_s:.2f} s, worker exited in "
        f"{stopped_s:.1f} s; kill -9 of the last worker -> /readyz 503 in {stale_s:.1f} s"
    )
