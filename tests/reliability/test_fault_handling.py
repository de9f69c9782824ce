"""The pieces the fault tests rely on, each on its own and fast: the sweep of leftover uploads, the
database connect gate and sessions closing on dropped connections (through the cuttable proxy),
full-disk errors (a real ENOSPC on a namespaced tmpfs), the cleanup of a killed attempt's temp
files, the reaper's attempt count after a retry, and the retry route with the broker down."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text, update
from starlette.testclient import TestClient

from kt_train.io import DiskFullError, is_disk_full
from service import cleanup
from service.admin import create_tenant_key
from service.app import create_app
from service.db.models import Job, Tenant, utcnow
from service.db.session import init_db, make_engine, make_session_factory
from service.settings import Settings
from tests.reliability.conftest import PgProxy, check_namespaces_work, unshare_prefix, wait_until
from tests.worker.conftest import add_job, add_tenant, get_job
from worker import liveness, runner

DAY = 24 * 3600


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def touch(path: Path, age_s: float = 0.0, size: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))
    return path


def test_sweep_removes_what_dead_processes_left_and_keeps_work_in_progress(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tmp = data / "tmp"
    host = cleanup._host()
    mine = touch(tmp / f"{cleanup.upload_prefix()}abc.zip")  # this process: alive
    dead = touch(tmp / f"upload~{host}~{dead_pid()}~12345~abc.zip")
    reused = touch(tmp / f"upload~{host}~{os.getpid()}~1~abc.zip")  # our pid, another start time
    other_host_new = touch(tmp / "upload~elsewhere~1~1~abc.zip")
    other_host_old = touch(tmp / "upload~elsewhere~2~1~abc.zip", age_s=DAY + 60)
    legacy_new, legacy_old = touch(tmp / "upload-new.zip"), touch(tmp / "upload-old.zip", age_s=DAY + 60)
    datasets = data / "tenants" / "t1" / "datasets"
    staging = touch(datasets / ".staging-a" / "images" / "cat" / "x.png").parents[2]
    os.utime(staging, (time.time() - 60, time.time() - 60))
    deleting = touch(datasets / ".deleting-b-1234" / "images" / "x.png").parents[1]
    published = touch(datasets / "c" / "images" / "cat" / "x.png").parents[2]

    result = cleanup.sweep(data)
    assert sorted(result.removed) == sorted([dead, reused, other_host_old, legacy_old, deleting])
    assert all(p.exists() for p in (mine, other_host_new, legacy_new, published))
    # uploads are in progress (ours, another host's recent one): a staging directory may be theirs
    assert staging.exists() and result.kept_uploads == 3

    for path in (mine, other_host_new, legacy_new):
        path.unlink()
    fresh = touch(datasets / ".staging-d" / "x").parent  # begun just now: not older than the grace
    result = cleanup.sweep(data)
    assert result.removed == [staging] and fresh.exists() and published.exists()
    # an abandoned staging directory is removed after a day whatever else is going on
    touch(tmp / f"{cleanup.upload_prefix()}abc.zip")
    os.utime(fresh, (time.time() - DAY - 60, time.time() - DAY - 60))
    assert cleanup.sweep(data).removed == [fresh]


def test_connect_gate_fails_fast_while_down_and_reopens_by_itself(pg_url: str, pg_proxy: PgProxy) -> None:
    engine = make_engine(pg_proxy.url(pg_url))
    try:
        pg_proxy.cut("refuse")
        with pytest.raises(Exception, match="Connection refused"):
            engine.connect()
        t0 = time.monotonic()
        for _ in range(20):
            with pytest.raises(Exception, match="trying again in the background"):
                engine.connect()
        # the message proves the gate answered (no network attempt); the bound only catches a gate that
        # waits: 20 calls on a loaded 2-core CI machine took 0.93 s, a connect_timeout wait takes seconds each
        assert time.monotonic() - t0 < 5.0
        accepted = pg_proxy.accepted
        pg_proxy.restore()

        def connects() -> bool:
            try:
                with engine.connect() as conn:
                    return conn.execute(text("SELECT 1")).scalar() == 1
            except Exception:
                return False

        wait_until(connects, 5, "the gate to reopen")
        assert pg_proxy.accepted > accepted
    finally:
        engine.dispose()


def test_session_closing_on_a_dropped_connection_does_not_raise(pg_url: str, pg_proxy: PgProxy) -> None:
    engine = make_engine(pg_proxy.url(pg_url))
    try:
        session = make_session_factory(engine)()
        assert session.execute(text("SELECT 1")).scalar() == 1  # a transaction is open
        pg_proxy.cut("refuse")
        session.close()  # its ROLLBACK fails on the dead connection: invalidated, not raised
        pg_proxy.restore()
        with make_session_factory(engine)() as again:
            assert wait_until(lambda: _select_one(again), 5, "a new connection") == 1
    finally:
        engine.dispose()


def _select_one(session) -> int | None:  # type: ignore[no-untyped-def]
    try:
        return int(session.execute(text("SELECT 1")).scalar())
    except Exception:
        session.rollback()
        return None


def test_atomic_write_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path: Path) -> None:
    """Inside a namespace where ``target`` is an almost full tmpfs: a real ENOSPC."""
    check_namespaces_work(tmp_path)
    target = tmp_path / "full"
    target.mkdir()
    script = (
        "import os, sys\n"
        "from kt_train.io import DiskFullError, atomic_write_text\n"
        "d = sys.argv[1]\n"
        "try:\n"
        "    atomic_write_text(os.path.join(d, 'last.ckpt'), 'x' * 500_000)\n"
        "except DiskFullError as err:\n"
        "    print('DiskFullError', err.errno, err.filename, str(err))\n"
        "print('left', sorted(os.listdir(d)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [*unshare_prefix(target), sys.executable, "-c", script, str(target)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(
        f"DiskFullError 28 {target / 'last.ckpt'} no space left on device while writing "
    )
    assert lines[1] == "left ['filler']"  # no truncated last.ckpt, no temp file


def test_disk_full_message(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    ckpt = tmp_path / "jobs" / "j" / "run" / "distill" / "last.ckpt"
    message = runner.disk_full_message(DiskFullError(ckpt), settings, "j", {})
    assert message is not None and message.startswith(f"no space left on device while writing {ckpt}; ")
    assert f"free space in KT_DATA_DIR ({tmp_path})" in message and "POST /v1/jobs/j/retry" in message
    # a library that does not name the file (safetensors): the stage's directory
    wrapped = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    message = runner.disk_full_message(
        wrapped, settings, "j", {"stage": "export", "dir": tmp_path / "export"}
    )
    assert message is not None and f"the export stage's files in {tmp_path / 'export'}" in message
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as inner:
            raise RuntimeError("torch.save failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert runner.disk_full_message(OSError(13, "Permission denied"), settings, "j", {}) is None
    assert runner.disk_full_message(ValueError("no"), settings, "j", {}) is None


def test_a_new_attempt_removes_temp_files_a_killed_one_left(tmp_path: Path) -> None:
    run = tmp_path / "run"
    stale = [
        touch(run / "distill" / ".last.ckpt.abc123.tmp", age_s=60),
        touch(run / "export" / ".model.k2j3.tmp.safetensors", age_s=60),
    ]
    fresh = touch(run / "distill" / ".history.json.xyz.tmp")  # being written right now
    keep = [
        touch(run / "distill" / "last.ckpt", age_s=60),
        touch(run / "teacher_cache" / "k.partial" / "a", 60),
    ]
    assert sorted(runner.remove_stale_temp_files(run, older_than_s=5)) == sorted(stale)
    assert fresh.exists() and all(p.exists() for p in keep)
    assert runner.remove_stale_temp_files(tmp_path / "missing", 5) == []


def test_reaper_counts_attempts_from_the_last_retry(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", job_heartbeat_timeout_s=60.0, job_max_attempts=3)
    init_db(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        factory = make_session_factory(engine)
        tenant_id = add_tenant(factory)
        # both on their 4th attempt; one was retried by hand after its 3rd, the other after its 1st
        retried, exhausted = add_job(factory, tenant_id, {}), add_job(factory, tenant_id, {})
        lost = {"status": "running", "attempts": 4, "heartbeat_at": utcnow() - timedelta(hours=1)}
        with factory() as s:
            for job_id, before in ((retried, 3), (exhausted, 1)):
                params = {"config": {}, liveness.ATTEMPTS_BEFORE_RETRY: before}
                s.execute(update(Job).where(Job.id == job_id).values(params=params, **lost))
            s.commit()
        calls: list[str] = []
        found = liveness.reap_lost_jobs(
            factory, settings, enqueue=lambda _s, job_id, _q: calls.append(job_id)
        )
        assert (found.requeued, found.failed) == ([retried], [exhausted]) and calls == [retried]
        error = get_job(factory, exhausted).error or ""
        assert f"POST /v1/jobs/{exhausted}/retry" in error and "finished stages are kept" in error
    finally:
        engine.dispose()


def test_retry_with_the_broker_down_answers_503_and_keeps_the_job_failed(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", broker_url="redis://127.0.0.1:1/0", result_backend="redis://127.0.0.1:1/0"
    )
    with TestClient(create_app(settings)) as client:
        engine = make_engine(settings.database_url)
        try:
            factory = make_session_factory(engine)
            with factory() as session:
                key = create_tenant_key(session, "t")
                tenant_id = session.scalars(select(Tenant.id)).one()
            job_id = add_job(factory, tenant_id, {}, status="canceled", attempts=2)
            t0 = time.monotonic()
            response = client.post(f"/v1/jobs/{job_id}/retry", headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 503, response.text
            assert (
                time.monotonic() - t0 < 5
            )  # the publish gives up in ~2 s; the result backend is not waited for
            assert "queue is unreachable" in response.json()["detail"]
            job = get_job(factory, job_id)
            assert job.status == "failed" and "could not be queued" in (job.error or "")
            assert f"/v1/jobs/{job_id}/retry" in (job.error or "")
            assert job.params[liveness.ATTEMPTS_BEFORE_RETRY] == 2 and job.params["retries"] == 1
        finally:
            engine.dispose()
