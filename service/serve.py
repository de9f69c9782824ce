"""The embedded default: one command, nothing to install but Python packages.

    python -m service.serve [--host 127.0.0.1] [--port 8000] [--data-dir DIR] [--workers 1]

Uses SQLite (``<data_dir>/kt.db``) and a SQLite-backed Celery broker (the ``Settings`` defaults,
unless ``KT_*`` variables say otherwise), runs the migrations, starts the API in this process and
``--workers`` Celery workers as subprocesses (queues ``cpu`` and ``gpu``; logs in
``<data_dir>/logs/worker-<i>.log``). The workers are subprocesses so that this process never
imports torch, ``kt_train`` or ``worker``. SIGINT / SIGTERM stop the API, then the workers
(SIGTERM, SIGKILL after ``--stop-timeout`` seconds), and the process exits 0.

The workers are supervised (``Supervisor``): one that exits, however it ends, is started again
after a backoff (0.5 s, doubling at each death in a row up to 30 s; a worker that had stayed up a
minute starts over), each restart printed with the exit code or signal. The supervisor knows the
dead process's pid, so it hands back the job that process held at once (``service.workers.
process_died``: ``queued`` again, the next attempt resumes from the finished stages) instead of
leaving it ``running`` until the job heartbeat times out; ``/readyz`` answers 503 while no worker
is alive (``KT_READY_MIN_WORKERS`` is 1 here).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import IO

from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings

READY_TIMEOUT_S = 120.0
RESTART_BASE_S = 0.5
RESTART_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a worker that stayed up this long before it died starts the backoff over
SUPERVISE_EVERY_S = 0.2


def parse_args(argv: list[str] | None = None, prog: str = "python -m service.serve") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
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


def resolve_settings(args: argparse.Namespace) -> tuple[Settings, dict[str, str]]:
    """The settings with the command-line options applied, and the ``KT_*`` variables that pin
    them for this server and its worker subprocesses (any working directory sees the same values).
    ``os.environ`` is left as it was: ``main`` applies the variables only while it serves, so a
    caller in the same process (``kt serve --print-env``, a test) is not left with them."""
    env: dict[str, str] = {}
    if args.data_dir is not None:
        env["KT_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())
    if args.host is not None:
        env["KT_API_HOST"] = args.host
    if args.port is not None:
        env["KT_API_PORT"] = str(args.port)
    if args.workers > 0 and "KT_READY_MIN_WORKERS" not in os.environ:
        env["KT_READY_MIN_WORKERS"] = "1"  # /readyz: 503 while none of this server's workers is alive
    with environ_applied(env):
        settings = Settings()
    env["KT_DATA_DIR"] = str(settings.data_dir)
    env["KT_DATABASE_URL"] = settings.database_url
    env["KT_BROKER_URL"] = settings.broker_url
    env["KT_RESULT_BACKEND"] = settings.result_backend
    return settings, env


@contextlib.contextmanager
def environ_applied(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``env`` set, restored on exit."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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


def worker_log_path(settings: Settings, index: int) -> Path:
    return settings.data_dir / "logs" / f"worker-{index}.log"


def start_worker(index: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """Worker ``index`` as a subprocess writing to ``log``."""
    return subprocess.Popen(
        worker_command(index),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # the log shows progress as it happens
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # Ctrl-C reaches this process only; it stops the workers in order
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )


def exit_cause(returncode: int) -> str:
    """How a process ended, in words: "was killed by SIGKILL", "exited with code 1"."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class Backoff:
    """Seconds to wait before restarting a worker that died: ``base_s``, doubled at each death in
    a row up to ``max_s``, so a worker that cannot start (a broken install, a full disk) does not
    spin; one that had stayed up ``stable_s`` before it died is restarted after ``base_s`` again."""

    def __init__(
        self, base_s: float = RESTART_BASE_S, max_s: float = RESTART_MAX_S, stable_s: float = STABLE_AFTER_S
    ) -> None:
        self.base_s, self.max_s, self.stable_s = base_s, max_s, stable_s
        self.deaths = 0  # in a row

    def next_delay(self, uptime_s: float) -> float:
        if uptime_s >= self.stable_s:
            self.deaths = 0
        delay = min(self.max_s, self.base_s * 2**self.deaths)
        self.deaths += 1
        return delay


class WorkerSlot:
    """One of ``--workers``: its current process, log file, backoff and pending restart."""

    def __init__(self, index: int, log: IO[bytes]) -> None:
        self.index, self.log = index, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = Backoff()
        self.restart_at: float | None = None
        self.restarts = 0

    def start(self, now: float) -> None:
        self.proc, self.started, self.restart_at = start_worker(self.index, self.log), now, None


class Supervisor:
    """Keeps ``count`` workers running (see the module docstring): ``check`` is one look, run every
    ``SUPERVISE_EVERY_S`` by ``run`` (a thread) until ``stop`` is set."""

    def __init__(
        self, settings: Settings, count: int, stop: threading.Event, session_factory: sessionmaker[Session]
    ) -> None:
        self.settings, self.stop, self.session_factory = settings, stop, session_factory
        log_dir = settings.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        # kept open while the workers run; a restarted worker appends to the same file
        self.slots = [WorkerSlot(i, open(worker_log_path(settings, i), "ab")) for i in range(count)]  # noqa: SIM115
        self.host = socket.gethostname()
        self.thread = threading.Thread(target=self.run, name="kt-supervisor", daemon=True)

    def start(self) -> Supervisor:
        now = time.monotonic()
        for slot in self.slots:
            slot.start(now)
        self.thread.start()
        return self

    def procs(self) -> list[subprocess.Popen[bytes]]:
        return [slot.proc for slot in self.slots if slot.proc is not None]

    def run(self) -> None:
        while not self.stop.wait(SUPERVISE_EVERY_S):
            self.check(time.monotonic())

    def check(self, now: float) -> None:
        for slot in self.slots:
            if slot.restart_at is not None:
                if now >= slot.restart_at and not self.stop.is_set():
                    self._restart(slot, now)
            elif slot.proc is not None and slot.proc.poll() is not None:
                self._died(slot, now)

    def _died(self, slot: WorkerSlot, now: float) -> None:
        assert slot.proc is not None and slot.proc.returncode is not None
        cause, uptime = exit_cause(slot.proc.returncode), now - slot.started
        jobs = self.release(slot.proc.pid, cause)
        delay = slot.backoff.next_delay(uptime)
        slot.restart_at = now + delay
        print(
            f"worker {slot.index} (pid {slot.proc.pid}) {cause} after {uptime:.1f} s; {jobs}"
            f"restarting it in {delay:g} s (restart {slot.restarts + 1}; log: "
            f"{worker_log_path(self.settings, slot.index)})",
            flush=True,
        )

    def _restart(self, slot: WorkerSlot, now: float) -> None:
        old = slot.proc.pid if slot.proc is not None else None
        slot.restarts += 1
        slot.start(now)
        assert slot.proc is not None
        print(f"worker {slot.index} restarted as pid {slot.proc.pid} (was pid {old})", flush=True)

    def release(self, pid: int, cause: str) -> str:
        """Hand back the job dead worker ``pid`` held (``service.workers.process_died``); what was
        done, for the log line ("" when it held none)."""
        from service.workers import process_died

        try:
            released = process_died(self.session_factory, self.settings, self.host, pid, cause)
        except Exception as err:  # the database is down: the reaper requeues it after the timeout
            return f"its job could not be handed back ({type(err).__name__}: {err}); "
        return "".join(f"job {job_id} {status}; " for job_id, status in released)

    def shutdown(self, timeout: float) -> None:
        """No more restarts; stop the workers (``stop_workers``) and hand back the jobs of any that
        had to be killed."""
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        procs = self.procs()
        stop_workers(procs, timeout)
        for proc in procs:
            killed = proc.returncode is not None and proc.returncode < 0
            if killed and (jobs := self.release(proc.pid, exit_cause(proc.returncode))):
                print(f"worker pid {proc.pid}: {jobs.rstrip('; ')}", flush=True)
        for slot in self.slots:
            slot.log.close()


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


def banner(settings: Settings, base_url: str, workers: int, admin: str | None = None) -> str:
    """``admin``: the command that runs service.admin as the user started the server (``kt admin``
    from ``kt serve``; default ``python -m service.admin``)."""
    admin = admin or f"{Path(sys.executable).name} -m service.admin"
    return "\n".join(
        [
            f"vfm-kt API:      {base_url}  (docs: {base_url}/docs)",
            f"data dir:        {settings.data_dir}",
            f"workers:         {workers} (logs: {settings.data_dir / 'logs'}/worker-<i>.log)",
            "create an API key:",
            f"  KT_DATA_DIR={settings.data_dir} {admin} create-key --tenant NAME",
        ]
    )


def main(argv: list[str] | None = None, prog: str = "python -m service.serve") -> int:
    """``prog``: how the user started it (``kt serve``), for --help and the banner's commands."""
    args = parse_args(argv, prog)
    args.admin_command = "kt admin" if prog.split()[0] == "kt" else None
    settings, env = resolve_settings(args)
    if args.print_env:
        for name, value in settings_env(settings).items():
            print(f"{name}={value}")
        return 0
    with environ_applied(env):  # the API (uvicorn's factory reads the settings) and the workers
        return serve(args, settings)


def serve(args: argparse.Namespace, settings: Settings) -> int:

    import uvicorn

    from service.db.session import init_db, make_engine, make_session_factory

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    print(f"migrating {settings.database_url} ...", flush=True)
    init_db(settings.database_url)
    engine = make_engine(settings.database_url)  # the supervisor's: it hands back dead workers' jobs

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

    supervisor = Supervisor(settings, args.workers, stop, make_session_factory(engine)).start()
    base_url = f"http://{_client_host(settings.api_host)}:{settings.api_port}"

    def announce() -> None:
        if wait_ready(f"{base_url}/readyz", stop):
            print(banner(settings, base_url, args.workers, getattr(args, "admin_command", None)), flush=True)
            print("ready", flush=True)
        elif not stop.is_set():
            print(f"{base_url}/readyz did not answer 200 within {READY_TIMEOUT_S:g} s", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    failed = False
    try:
        server.run()
        failed = not server.started and not stop.is_set()
    finally:
        stop.set()
        print("stopping workers ...", flush=True)
        supervisor.shutdown(args.stop_timeout)
        engine.dispose()
    print("stopped", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
