"""Fault injection for the reliability tests, with real processes: private Redis servers (killed
and restarted at will; the shared one is never touched), a TCP proxy in front of the shared
PostgreSQL that a test cuts and restores (refusing connections, or accepting and never answering),
uvicorn API and Celery worker processes, and a fresh PostgreSQL database per test.

Nothing here skips: a missing ``redis-server`` or an unreachable PostgreSQL fails the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.db.session import init_db, make_engine, make_session_factory
from tests.conftest import REPO, VENV_BIN, small_config_dict
from tests.service.conftest import _clean_kt_env, fresh_postgres_database  # noqa: F401 - autouse fixture

PG_HOST, PG_PORT = "127.0.0.1", 5432


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, context: Callable[[], str] = lambda: ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{context()}", pytrace=False)
        time.sleep(0.05)


def child_env(**kt: str) -> dict[str, str]:
    """Environment for a child process: no inherited KT_* settings, offline, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KT_")}
    env.update(
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    )
    env.update(kt)
    return env


class Proc:
    """A child process in its own session (so its whole group can be killed), logging to a file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.cmd, self.log = cmd, log
        with open(log, "ab") as fh:
            self.popen = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.log.name} (last {chars} chars) ---\n{text[-chars:]}"

    def kill(self) -> None:
        """``kill -9``: the process first, then whatever it started."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        self.kill()


@contextlib.contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    try:
        yield proc
    finally:
        proc.stop()


# --- Redis -----------------------------------------------------------------------------------


class RedisServer:
    """A private ``redis-server`` without persistence: a restart loses everything, as a Redis
    without AOF/RDB (or a failover to an empty replica) does."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed; `bash .ci/services` installs it", pytrace=False)
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        import redis

        self.starts += 1
        log = open(self.workdir / f"redis-{self.starts}.log", "wb")  # noqa: SIM115 - owned by the process
        cmd = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        cmd += ["--daemonize", "no", "--dir", str(self.workdir)]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=1)

        def pong() -> bool:
            assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_until(pong, 20, f"redis-server on port {self.port}")
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.kill()


# --- PostgreSQL --------------------------------------------------------------------------------


class PgProxy:
    """A TCP proxy in front of the shared PostgreSQL. ``cut("refuse")``: existing connections are
    dropped and new ones refused (the server is down or restarting); ``cut("blackhole")``: existing
    connections dropped, new ones accepted but never answered (a hung server, a full backlog).
    ``restore()`` forwards again, on the same port."""

    def __init__(self, target: tuple[str, int] = (PG_HOST, PG_PORT)) -> None:
        self.target = target
        self.port = free_port()
        self.mode = "up"
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.accepted = 0

    def url(self, direct_url: str) -> str:
        return (
            make_url(direct_url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)
        )

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name="pg-proxy").start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by cut("refuse")
            self.accepted += 1
            with self._lock:
                self._sockets.add(client)
                if self.mode == "blackhole":
                    continue  # held open, never answered
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                self._close(client)
                continue
            with self._lock:
                self._sockets.add(upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        self._close(src)
        self._close(dst)

    def _close(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()

    def _drop_all(self) -> None:
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            self._close(sock)

    def cut(self, how: str = "refuse") -> None:
        assert how in ("refuse", "blackhole"), how
        with self._lock:
            self.mode = how
        if how == "refuse":
            self._close_listener()
        self._drop_all()

    def restore(self) -> None:
        self._drop_all()  # blackholed connections: their clients see them closed
        with self._lock:
            self.mode = "up"
        if self._listener is None:
            self.start()

    def _close_listener(self) -> None:
        if self._listener is not None:
            # shutdown first: close() alone does not wake the thread blocked in accept(), and the
            # socket would go on accepting connections
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None

    def close(self) -> None:
        self._close_listener()
        self._drop_all()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database (direct URL), dropped afterwards."""
    with fresh_postgres_database("kt_rel") as url:
        yield url


@pytest.fixture
def pg_proxy() -> Iterator[PgProxy]:
    proxy = PgProxy()
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()


@contextlib.contextmanager
def session_factory(url: str, migrate: bool = True) -> Iterator[sessionmaker[Session]]:
    if migrate:
        init_db(url)
    engine = make_engine(url)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


def create_key(url: str, tenant: str) -> str:
    from service.admin import create_tenant_key

    with session_factory(url, migrate=False) as factory, factory() as session:
        return create_tenant_key(session, tenant)


# --- API and worker processes ----------------------------------------------------------------


def start_api(env: dict[str, str], log: Path) -> tuple[Proc, str]:
    """A uvicorn API process on a free port; returns it and its base URL once /healthz answers."""
    port = free_port()
    cmd = [str(VENV_BIN / "uvicorn"), "--factory", "service.app:create_app", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--log-level", "info"]
    proc = Proc(cmd, env, log)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.alive(), f"the API exited with {proc.popen.returncode}\n{proc.tail()}"
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 60, f"the API at {url}", proc.tail)
    except BaseException:
        proc.stop()
        raise
    return proc, url


def worker_cmd(name: str, queues: str = "cpu") -> list[str]:
    cmd = [str(VENV_BIN / "celery"), "-A", "worker.app:celery_app", "worker", "-Q", queues, "--pool", "solo"]
    cmd += ["-c", "1", "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    return [*cmd, "-n", f"{name}-{os.getpid()}@%h"]


def worker_env(data_dir: Path, database_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    """A worker that takes a job for lost after 10 s without a heartbeat (beats every 2.5 s) and
    looks for lost jobs every second. (4 s was too tight: on a loaded 2-core CI machine a live
    worker's heartbeat thread went 4 s without a turn, and its job was requeued to a second attempt.)"""
    values = {
        "KT_DATA_DIR": str(data_dir),
        "KT_DATABASE_URL": database_url,
        "KT_BROKER_URL": broker_url,
        "KT_RESULT_BACKEND": broker_url,
        "KT_JOB_HEARTBEAT_TIMEOUT_S": "10",
        "KT_REAPER_INTERVAL_S": "1",
        **extra,
    }
    return child_env(**values)


def start_worker(
    env: dict[str, str], log: Path, name: str, prefix: list[str] | None = None, queues: str = "cpu"
) -> Proc:
    """A Celery worker process on ``queues`` (``prefix``: a wrapper command it runs under); returns
    once ready."""
    proc = Proc([*(prefix or []), *worker_cmd(name, queues)], env, log)

    def ready() -> bool:
        assert proc.alive(), f"the worker exited with {proc.popen.returncode}\n{proc.tail()}"
        return " ready." in log.read_text(errors="replace")

    try:
        wait_until(ready, 90, "the worker to be ready", proc.tail)
    except BaseException:
        proc.stop()
        raise
    return proc


# --- a full disk ----------------------------------------------------------------------------

FULL_FS_SIZE = "1m"
FILLER_KIB = 900  # leaves ~120 KiB: room for config.yaml, not for the ~430 KiB model


def unshare_prefix(mount_point: Path) -> list[str]:
    """Run the worker in its own user and mount namespaces, where ``mount_point`` is a small tmpfs
    that a filler file has almost filled. Needs no root: unprivileged user namespaces suffice."""
    script = (
        f'mount -t tmpfs -o size={FULL_FS_SIZE} kt-full "$0" && '
        f'head -c {FILLER_KIB * 1024} /dev/zero > "$0/filler" && exec "$@"'
    )
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(mount_point)]


def check_namespaces_work(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    cmd = [*unshare_prefix(probe), "sh", "-c", 'head -c 200000 /dev/zero > "$0/x"', str(probe)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if result.returncode == 0 or "No space left on device" not in result.stderr:
        pytest.fail(
            "this test fills a tmpfs mounted in a private mount namespace (unshare --user --mount) and "
            f"could not: exit {result.returncode}, {result.stderr.strip()!r}. It needs unprivileged user "
            "namespaces (sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0) or root.",
            pytrace=False,
        )


# --- data and configs ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def rel_demo_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """4 classes x 4 train, x 3 test, 16 unlabeled transfer images, 32 px."""
    from kt_train.demo import make_demo_data

    root = tmp_path_factory.mktemp("rel_demo")
    return make_demo_data(root, per_class=4, test_per_class=3, unlabeled=16, size=32)


def job_config(data: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    overrides.setdefault("export__formats", ["safetensors"])
    overrides.setdefault("finetune_student__steps", 2)
    return small_config_dict(data, "/ignored", **overrides)
