"""Engines, sessions and schema migration.

``make_engine`` knows the two supported backends: SQLite (embedded default; WAL so the API and a
worker process can share the file, foreign keys switched on since SQLite leaves them off) and
PostgreSQL (production; ``pool_pre_ping`` so connections dropped by the server are replaced; the
ping is a round trip only for a connection whose socket has something to read, see ``quiet_ping``).
The schema is owned by Alembic: ``init_db`` runs ``alembic upgrade head``, never ``create_all``.

A PostgreSQL server that is down must cost a request little: connecting gives up after
``connect_timeout`` (2 s, libpq's minimum), TCP keepalives and ``tcp_user_timeout`` drop
connections to a peer that vanished, and a ``ConnectGate`` per engine makes the connection
attempts that follow a failure fail at once (an ``OperationalError``) while a background thread
probes the server every ``GATE_COOLDOWN_S`` until it answers. The API answers these errors with
503 (``service.api.errors``).
"""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

# Repository root: alembic.ini and migrations/ live beside the `service` package.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
ALEMBIC_INI = PROJECT_ROOT / "alembic.ini"
MIGRATIONS_DIR = PROJECT_ROOT / "migrations"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        # wait for a concurrent writer (API vs worker) instead of failing with "database is locked"
        cursor.execute("PRAGMA busy_timeout=30000")
    finally:
        cursor.close()


# libpq parameters for PostgreSQL connections (a caller's connect_args override them)
POSTGRES_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 2,  # seconds; libpq's minimum
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,  # ms: sent data unacknowledged this long means the peer is gone
}
GATE_COOLDOWN_S = 1.0


class ConnectGate:
    """A circuit breaker on new connections. The first failed attempt closes the gate: from then on
    attempts fail at once, and a background thread tries to connect every ``cooldown_s`` until it
    succeeds and opens the gate again. While the server is down, requests fail in no time instead
    of each waiting out ``connect_timeout``; only the request that found it down waited."""

    def __init__(self, cooldown_s: float = GATE_COOLDOWN_S) -> None:
        self.cooldown_s = cooldown_s
        self._lock = threading.Lock()
        self._down = False
        self._stop = threading.Event()
        self.last_error = ""

    @property
    def down(self) -> bool:
        return self._down

    def do_connect(self, dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        """The engine's ``do_connect`` hook: connect, unless the gate is closed."""
        if self._down:
            raise dialect.loaded_dbapi.OperationalError(
                f"database unreachable ({self.last_error}); trying again in the background"
            )
        try:
            return dialect.connect(*cargs, **cparams)
        except Exception as err:
            self._close(err, dialect, cargs, cparams)
            raise

    def stop(self, *_: Any) -> None:
        """Stop probing (the engine was disposed)."""
        self._stop.set()

    @staticmethod
    def _reason(err: BaseException) -> str:
        return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]

    def _close(self, err: BaseException, dialect: Any, cargs: Any, cparams: Any) -> None:
        with self._lock:
            self.last_error = self._reason(err)
            if self._down:
                return
            self._down = True
        log.warning("database unreachable (%s): failing requests at once until it answers", self.last_error)
        threading.Thread(
            target=self._probe, args=(dialect, cargs, cparams), name="kt-db-probe", daemon=True
        ).start()

    def _probe(self, dialect: Any, cargs: Any, cparams: Any) -> None:
        while not self._stop.wait(self.cooldown_s):
            try:
                dialect.connect(*cargs, **cparams).close()
            except Exception as err:
                self.last_error = self._reason(err)
                continue
            self._down = False
            log.info("database reachable again")
            return


def quiet_ping(ping: Any) -> Any:
    """``pool_pre_ping``'s ping for psycopg connections, without a round trip in the usual case.

    SQLAlchemy pings every connection it takes from the pool with ``SELECT 1``: a round trip (and a
    wait for the GIL after it) before each request's own query, the status poll's included. An idle
    connection's socket has nothing to read, though, unless the server closed it: a restart,
    ``pg_terminate_backend`` or an idle timeout sends an error and then EOF, and a peer that went
    away silently is found by the TCP keepalives (``POSTGRES_CONNECT_ARGS``), all of which make the
    socket readable. So an idle connection with a quiet socket is taken as it is, and any other one
    (readable, in a transaction, closed, not a psycopg connection) gets ``ping``, the real one,
    which replaces it when it is dead exactly as before."""

    def ping_unless_quiet(dbapi_connection: Any) -> bool:
        if _idle_and_quiet(dbapi_connection):
            return True
        return bool(ping(dbapi_connection))

    return ping_unless_quiet


def _idle_and_quiet(dbapi_connection: Any) -> bool:
    try:
        if dbapi_connection.closed or dbapi_connection.broken:
            return False
        pgconn = dbapi_connection.pgconn
        if pgconn.transaction_status != 0:  # libpq's PQTRANS_IDLE: no transaction, nothing running
            return False
        fd = pgconn.socket
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP)
        return not poller.poll(0)
    except Exception:  # whatever this cannot tell, the real ping finds out
        return False


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the per-backend settings the service relies on."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        connect_args = {"check_same_thread": False, **kwargs.pop("connect_args", {})}
        if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    if parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {**POSTGRES_CONNECT_ARGS, **kwargs.get("connect_args", {})}
    engine = create_engine(url, **kwargs)
    if engine.dialect.driver == "psycopg" and kwargs["pool_pre_ping"]:
        engine.dialect.do_ping = quiet_ping(engine.dialect.do_ping)  # type: ignore[method-assign]
    gate = ConnectGate()
    event.listen(engine, "do_connect", gate.do_connect)
    event.listen(engine, "engine_disposed", gate.stop)
    return engine


class ServiceSession(Session):
    """A ``Session`` whose ``close`` survives a connection the server dropped: the ROLLBACK that
    closing sends fails on a dead connection, and an error there (after the work is done, often
    after the response is sent) must not turn into a 500 or a broken keep-alive connection. The
    connection is invalidated instead (the pool replaces it)."""

    def close(self) -> None:
        try:
            super().close()
        except DBAPIError as err:
            if not err.connection_invalidated:
                raise
            log.warning("session closed on a dropped database connection: %s", str(err).splitlines()[0][:200])
            self.invalidate()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """The session factory for ``engine``. Objects stay readable after commit (API responses)."""
    return sessionmaker(bind=engine, autoflush=False, expire_on_commit=False, class_=ServiceSession)


@lru_cache
def get_engine() -> Engine:
    """The process-wide engine for ``Settings.database_url``."""
    from service.settings import get_settings

    return make_engine(get_settings().database_url)


@lru_cache
def SessionLocal() -> sessionmaker[Session]:
    """The process-wide session factory (bound to ``get_engine()``)."""
    return make_session_factory(get_engine())


def get_session() -> Iterator[Session]:
    """FastAPI dependency: one session per request, rolled back on error and always closed."""
    with SessionLocal()() as session:
        yield session


def alembic_config(url: str) -> Any:
    """An Alembic ``Config`` for this project's migrations, pointed at ``url``.

    Built from the repo's ``alembic.ini`` when present (else from scratch), with the script
    location resolved relative to this package so it works from any working directory.
    """
    from alembic.config import Config

    config = Config(str(ALEMBIC_INI)) if ALEMBIC_INI.is_file() else Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal % in a password must be doubled
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    # don't let migrations/env.py reconfigure the application's logging
    config.attributes["configure_logger"] = False
    return config


def init_db(url: str) -> None:
    """Bring the database at ``url`` to the latest schema (``alembic upgrade head``)."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")
