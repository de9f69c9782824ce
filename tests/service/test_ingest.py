"""Uploads are validated in the API's ingest processes (service.ingest), at a lower CPU priority
than the API, with the same answers as in the API process, and a killed ingest process costs the
next upload nothing. The ingest processes never outlive the API: they die with a killed API process
and stop with the app's graceful shutdown."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import httpx
import pytest

from service import ingest
from service.settings import Settings
from tests.service.test_api import Api, imagefolder_zip, make_settings, make_zip, running_api, upload
from tests.service.test_serve import PROC, REPO, alive, children_of, clean_env, free_port


def _pool_pids() -> list[int]:
    assert ingest._pool is not None
    return list(ingest._pool._processes)  # type: ignore[attr-defined]


def test_uploads_run_in_niced_ingest_processes_with_the_same_answers(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    assert settings.ingest_processes == 2 and settings.ingest_nice == 19
    answers = {}
    for where, s in (("pool", settings), ("api", make_settings(tmp_path / "data0", ingest_processes=0))):
        with (
            running_api(s) as api,
            httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {api.key('acme')}"}) as c,
        ):
            ok = upload(c, imagefolder_zip({"cat": 3, "dog": 2}))
            bad = upload(c, make_zip({"cat/a.png": b"not an image", "dog/b.png": b"x"}))
            answers[where] = (
                ok.status_code,
                ok.json().get("num_images"),
                bad.status_code,
                bad.json()["detail"],
            )
            if where == "pool":
                pids = _pool_pids()
                assert len(pids) == 2 and os.getpid() not in pids
                assert all(os.getpriority(os.PRIO_PROCESS, pid) == 19 for pid in pids)
    assert answers["pool"] == answers["api"]
    assert answers["pool"][0] == 201 and answers["pool"][2] == 422 and "a.png" in answers["pool"][3]


def test_a_killed_ingest_process_costs_the_next_upload_nothing(tmp_path: Path) -> None:
    with (
        running_api(make_settings(tmp_path / "data")) as api,
        httpx.Client(
            base_url=api.url, headers={"Authorization": f"Bearer {api.key('acme')}"}, timeout=60
        ) as c,
    ):
        assert upload(c, imagefolder_zip({"cat": 2, "dog": 2})).status_code == 201
        for pid in _pool_pids():
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        again = upload(c, imagefolder_zip({"cat": 2, "dog": 2}))
        assert again.status_code == 201, again.text
        assert c.get("/readyz").status_code == 200


# --- the ingest processes never outlive the API (issue 14) ----------------------------------------


def _ingest_children(pid: int) -> list[int]:
    """The ingest pool's processes among ``pid``'s children (spawned: ``spawn_main`` in the command
    line), and multiprocessing's resource tracker the pool started beside them."""
    found = []
    for child in children_of(pid):
        with contextlib.suppress(OSError):
            cmd = (PROC / str(child) / "cmdline").read_bytes()
            if b"spawn_main" in cmd or b"resource_tracker" in cmd:
                found.append(child)
    return found


def _is_pool_process(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return b"spawn_main" in (PROC / str(pid) / "cmdline").read_bytes()
    return False


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids of ``pids`` still alive after ``timeout`` s (at once when none is)."""
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@contextlib.contextmanager
def _api_process(cmd: list[str], data: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``cmd`` (an API on 127.0.0.1:``port`` with its data in ``data``) as a subprocess, once
    ``/readyz`` answers; killed afterwards, with any ingest process it left behind."""
    env = {**clean_env(), "KT_DATA_DIR": str(data), "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 150  # a loaded 2-core CI machine takes ~40 s to import and migrate
        while True:
            assert proc.poll() is None, "the API exited early:\n" + log.read_text()
            assert time.monotonic() < deadline, "no /readyz 200 within 150 s:\n" + log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            time.sleep(0.25)
        # an upload through HTTP, so the pool has certainly started and worked
        key = Api(url="", settings=Settings(data_dir=data)).key("acme")
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=120
        ) as c:
            response = upload(c, imagefolder_zip({"cat": 2, "dog": 2}))
        assert response.status_code == 201, response.text
        kids = _ingest_children(proc.pid)
        assert sum(map(_is_pool_process, kids)) == 2, kids
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in kids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc: Linux")
def test_ingest_processes_die_with_a_killed_api(tmp_path: Path) -> None:
    """``kill -9`` of the API (``python -m service.serve``) takes its ingest processes with it
    (PR_SET_PDEATHSIG), and with them the resource tracker; they used to live on as orphans."""
    port, data = free_port(), (tmp_path / "data").resolve()
    cmd = [sys.executable, "-m", "service.serve", "--workers", "0", "--port", str(port), "--data-dir", str(data)]  # fmt: skip
    with _api_process(cmd, data, port, tmp_path / "api.log") as proc:
        kids = _ingest_children(proc.pid)
        proc.kill()
        proc.wait()
        assert _wait_gone(kids, 10) == [], "ingest processes outlived the killed API"


# The API of `kt serve` in a process that goes on after the API has stopped (as `kt serve` does while
# it stops its workers, up to --stop-timeout): "api stopped" once uvicorn's graceful shutdown is over.
_API_THEN_LINGER = """
import signal, sys, time, uvicorn
signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn raises the signal again after its shutdown
uvicorn.Server(uvicorn.Config("service.app:create_app", factory=True, host="127.0.0.1",
                              port=int(sys.argv[1]), log_level="info")).run()
print("api stopped", flush=True)
time.sleep(120)
"""


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.skipif(not PROC.is_dir(), reason="needs /proc (Linux)")
def test_ingest_processes_stop_with_the_api_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM: the app's graceful shutdown (its lifespan) stops the ingest pool, so the ingest
    processes are gone when the API has stopped, not only once the whole process exits."""
    port, data, log = free_port(), (tmp_path / "data").resolve(), tmp_path / "api.log"
    cmd = [sys.executable, "-c", _API_THEN_LINGER, str(port)]
    with _api_process(cmd, data, port, log) as proc:
        kids = [k for k in _ingest_children(proc.pid) if _is_pool_process(k)]
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while "api stopped" not in log.read_text():
            assert proc.poll() is None, "the process exited:\n" + log.read_text()
            assert time.monotonic() < deadline, "no graceful stop within 60 s:\n" + log.read_text()
            time.sleep(0.1)
        assert "Application shutdown complete" in log.read_text()
        assert _wait_gone(kids, 5) == [], "ingest processes outlived the API's shutdown"
        assert proc.poll() is None  # the process itself still runs: the app stopped them


@pytest.mark.timeout(120)
def test_shutdown_does_not_wait_for_a_busy_ingest_process(tmp_path: Path) -> None:
    """``ingest.shutdown`` (the app's shutdown, and at exit) cancels queued work and kills a
    process still busy after its timeout, instead of waiting for the upload to finish."""
    p = ingest.pool(make_settings(tmp_path / "data", ingest_processes=1))
    assert p is not None
    pids = []
    try:
        busy = p.submit(time.sleep, 300)
        queued = [p.submit(time.sleep, 300) for _ in range(4)]  # one of them already in the call queue
        pids = list(p._processes)  # type: ignore[attr-defined]
        deadline = time.monotonic() + 60
        while not busy.running():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        ingest.shutdown(timeout=1)
        assert time.monotonic() - started < 10
        assert ingest._pool is None and queued[-1].cancelled()
        assert _wait_gone(pids, 10) == []
        for future in (busy, *queued):  # every one of them answered: none waits for ever
            assert future.cancelled() or isinstance(future.exception(timeout=30), BrokenProcessPool)
    finally:  # without a working shutdown, concurrent.futures would wait at exit for the sleeps
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
