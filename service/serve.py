"""The embedded default: one command, nothing to install but Python packages.

    python -m service.serve [--host 127.0.0.1] [--port 8000] [--data-dir DIR] [--workers 1]

Uses SQLite (``<data_dir>/kt.db``) and a SQLite-backed Celery broker (the ``Settings`` defaults,
unless ``KT_*`` variables say otherwise), runs the migrations, starts the API in this process and
``--workers`` Celery workers as subprocesses (queues ``cpu`` and ``gpu``; logs in
``<data_dir>/logs/worker-<i>.log``). The workers are subprocesses so that this process never
imports torch, ``kt_train`` or ``worker``. SIGINT / SIGTERM stop the API, then the workers
(SIGTERM, SIGKILL after ``--stop-timeout`` seconds), and the process exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import IO

from service.settings import Settings

READY_TIMEOUT_S = 120.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service.serve",
        description="Run the vfm-kt service embedded: SQLite database and broker, the API and local workers.",
    )
    parser.add_argument("--host", default=None, help="interface to bind (default: KT_API_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: KT_API_PORT or 8000)")
    parser.add_argument(
        "--data-dir", default=None, help="artifact directory (default: KT_DATA_DIR or ./kt-data)"
    )
    parser.add_argument("--workers", type=int, default=1, help="Celery worker processes to start (0: none)")
    parser.add_argument(
        "--stop-timeout", type=float, default=10.0, help="seconds a worker gets to stop before it is killed"
    )
    parser.add_argument("--print-env", action="store_true", help="print the resolved KT_* settings and exit")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    return args


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Apply the command-line options as ``KT_*`` variables (so the workers see the same values)
    and read the settings."""
    if args.data_dir is not None:
        os.environ["KT_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())
    if args.host is not None:
        os.environ["KT_API_HOST"] = args.host
    if args.port is not None:
        os.environ["KT_API_PORT"] = str(args.port)
    settings = Settings()
    # pin the resolved values so worker subprocesses (any working directory) use the same ones
    os.environ["KT_DATA_DIR"] = str(settings.data_dir)
    os.environ["KT_DATABASE_URL"] = settings.database_url
    os.environ["KT_BROKER_URL"] = settings.broker_url
    os.environ["KT_RESULT_BACKEND"] = settings.result_backend
    return settings


def settings_env(settings: Settings) -> dict[str, str]:
    """The resolved settings as ``KT_*`` variables (the secret masked)."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        # a list as the variable reads it back (KT_GALLERY_ROOTS: paths joined like PATH)
        text = os.pathsep.join(str(v) for v in value) if isinstance(value, list) else str(value)
        if name == "secret_key":
            text = "<placeholder>" if value == Settings.model_fields["secret_key"].default else "<set>"
        env[f"KT_{name.upper()}"] = text
    return env


def worker_command(index: int) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "worker.app:celery_app", "worker",
        "-Q", "cpu,gpu", "--pool", "solo", "-c", "1", "--loglevel", "INFO",
        "-n", f"kt-worker{index}@%h",
    ]  # fmt: skip


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the worker gets SIGTERM if this process dies without cleaning up (e.g. SIGKILL)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_workers(settings: Settings, count: int) -> tuple[list[subprocess.Popen[bytes]], list[IO[bytes]]]:
    log_dir = settings.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[IO[bytes]] = []
    for index in range(count):
        log = open(log_dir / f"worker-{index}.log", "ab")  # noqa: SIM115 - kept open while the worker runs
        logs.append(log)
        procs.append(
            subprocess.Popen(
                worker_command(index),
                env={**os.environ, "PYTHONUNBUFFERED": "1"},  # the log shows progress as it happens
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches this process only; it stops the workers in order
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        )
    return procs, logs


def stop_workers(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM (Celery's warm shutdown) to every worker, SIGKILL to those still alive after ``timeout``."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"worker pid {proc.pid} did not stop within {timeout:g} s; killing it", flush=True)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


def _client_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def wait_ready(url: str, stop: threading.Event, timeout: float = READY_TIMEOUT_S) -> bool:
    """Poll ``url`` until it answers 200 (``True``), ``stop`` is set or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        stop.wait(0.25)
    return False


def banner(settings: Settings, base_url: str, workers: int) -> str:
    return "\n".join(
        [
            f"vfm-kt API:      {base_url}  (docs: {base_url}/docs)",
            f"data dir:        {settings.data_dir}",
            f"workers:         {workers} (logs: {settings.data_dir / 'logs'}/worker-<i>.log)",
            "create an API key:",
            f"  KT_DATA_DIR={settings.data_dir} {Path(sys.executable).name} -m service.admin create-key --tenant NAME",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = resolve_settings(args)
    if args.print_env:
        for name, value in settings_env(settings).items():
            print(f"{name}={value}")
        return 0

    import uvicorn

    from service.db.session import init_db

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    print(f"migrating {settings.database_url} ...", flush=True)
    init_db(settings.database_url)

    config = uvicorn.Config(
        "service.app:create_app",
        factory=True,
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
    )
    server = uvicorn.Server(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # uvicorn installs its own handlers while serving and re-raises the signal afterwards;
        # this one then only records it (the API is already stopping or stopped)
        stop.set()
        server.should_exit = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    procs, logs = start_workers(settings, args.workers)
    base_url = f"http://{_client_host(settings.api_host)}:{settings.api_port}"

    def announce() -> None:
        if wait_ready(f"{base_url}/readyz", stop):
            print(banner(settings, base_url, len(procs)), flush=True)
            print("ready", flush=True)
        elif not stop.is_set():
            print(f"{base_url}/readyz did not answer 200 within {READY_TIMEOUT_S:g} s", flush=True)

    def watch_workers() -> None:
        reported: set[int] = set()
        while not stop.wait(1.0):
            for index, proc in enumerate(procs):
                if proc.poll() is not None and index not in reported:
                    reported.add(index)
                    print(
                        f"worker {index} (pid {proc.pid}) exited with {proc.returncode}; "
                        f"see {settings.data_dir / 'logs'}/worker-{index}.log",
                        flush=True,
                    )

    threads = [threading.Thread(target=fn, daemon=True) for fn in (announce, watch_workers)]
    for thread in threads:
        thread.start()
    failed = False
    try:
        server.run()
        failed = not server.started and not stop.is_set()
    finally:
        stop.set()
        print("stopping workers ...", flush=True)
        stop_workers(procs, args.stop_timeout)
        for log in logs:
            log.close()
    print("stopped", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
