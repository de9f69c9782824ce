"""The embedded default, through real processes: ``python -m service.serve`` migrates, serves
``/readyz``, starts a Celery worker subprocess, and stops everything on SIGTERM with exit 0."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from service import serve

REPO = Path(__file__).resolve().parents[2]
PROC = Path("/proc")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    kids = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ..."; comm may hold spaces, so split after the last ')'
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


def alive(pid: int) -> bool:
    try:
        state = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KT_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_print_env_resolves_defaults(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "service.serve", "--print-env", "--data-dir", str(tmp_path / "d"), "--port", "9"],
        env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    env = dict(line.split("=", 1) for line in out.splitlines())
    data = tmp_path / "d"
    assert env["KT_DATA_DIR"] == str(data.resolve())
    assert env["KT_DATABASE_URL"] == f"sqlite:///{data.resolve() / 'kt.db'}"
    assert env["KT_BROKER_URL"].startswith("sqla+sqlite:///")
    assert env["KT_API_PORT"] == "9"
    assert env["KT_SECRET_KEY"] == "<placeholder>"


def test_kt_serve_names_the_kt_commands_in_its_help_and_banner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `kt serve --help` said "usage: python -m service.serve" and its banner told a `kt` user to run
    # `python3 -m service.admin create-key` where the tutorial says `kt admin create-key`
    from typer.testing import CliRunner

    from kt_client.cli import app

    res = CliRunner().invoke(app, ["serve", "--help"])
    assert res.exit_code == 0 and res.output.startswith("usage: kt serve "), res.output
    seen: list[object] = []
    monkeypatch.setattr(serve, "serve", lambda args, settings: seen.append(args) or 0)
    for prog, admin in (("kt serve", "kt admin"), ("python -m service.serve", "-m service.admin")):
        assert serve.main(["--data-dir", str(tmp_path / "d")], prog=prog) == 0
        settings, _ = serve.resolve_settings(seen[-1])  # type: ignore[arg-type]
        text = serve.banner(settings, "http://127.0.0.1:8000", 1, seen[-1].admin_command)  # type: ignore[attr-defined]
        assert f"{admin} create-key --tenant NAME" in text, text


def test_worker_command_listens_on_both_queues() -> None:
    cmd = serve.worker_command(0)
    assert cmd[:3] == [sys.executable, "-m", "celery"]
    assert cmd[cmd.index("-Q") + 1] == "cpu,gpu"
    assert "worker.app:celery_app" in cmd


def test_serve_module_does_not_import_torch_or_worker() -> None:
    code = (
        "import sys, service.serve;"
        "bad = [m for m in ('torch', 'kt_train', 'worker') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


@pytest.mark.e2e
@pytest.mark.timeout(120)
@pytest.mark.skipif(not PROC.is_dir(), reason="needs /proc (Linux)")
def test_serve_starts_api_and_worker_and_stops_on_sigterm(tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.serve", "--port", str(port), "--data-dir", str(data)],
        env=clean_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while "ready\n" not in output:
            assert time.monotonic() < deadline, "no 'ready' within 60 s:\n" + "".join(output)
            assert proc.poll() is None, "serve exited early:\n" + "".join(output)
            with contextlib.suppress(queue.Empty):
                output.append(lines.get(timeout=0.5))
        text = "".join(output)
        assert f"http://127.0.0.1:{port}" in text
        assert str(data.resolve()) in text
        assert "service.admin create-key --tenant" in text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            assert resp.status == 200
        assert (data / "kt.db").is_file()

        children = children_of(proc.pid)
        # one worker; beside it the API's upload processes (service.ingest, spawned: their
        # multiprocessing resource tracker is a child too)
        cmdlines = {pid: (PROC / str(pid) / "cmdline").read_bytes().split(b"\0") for pid in children}
        celery = [pid for pid, cmd in cmdlines.items() if b"worker.app:celery_app" in cmd]
        assert len(celery) == 1 and b"celery" in cmdlines[celery[0]], cmdlines
        ingest = [pid for pid, cmd in cmdlines.items() if any(b"spawn_main" in part for part in cmd)]
        assert len(ingest) >= 2, cmdlines
        workers = children
        log = data / "logs" / "worker-0.log"
        while "ready." not in (log.read_text() if log.is_file() else ""):
            assert time.monotonic() < deadline + 30, "worker not ready:\n" + log.read_text()
            assert alive(celery[0]), "worker died:\n" + log.read_text()
            time.sleep(0.5)

        # the API process itself never loaded torch (the worker does)
        maps = (PROC / str(proc.pid) / "maps").read_text()
        assert "libtorch" not in maps

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        gone_by = time.monotonic() + 10  # the upload processes see their parent go and exit
        while any(alive(pid) for pid in workers) and time.monotonic() < gone_by:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in workers), "a worker or an upload process outlived serve"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
