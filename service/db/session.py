"""Engines, sessions and schema migration.

``make_engine`` knows the two supported backends: SQLite (embedded default; WAL so the API and a
worker process can share the file, foreign keys switched on since SQLite leaves them off) and
PostgreSQL (production; ``pool_pre_ping`` so connections dropped by the server are replaced).
The schema is owned by Alembic: ``init_db`` runs ``alembic upgrade head``, never ``create_all``.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

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
    return create_engine(url, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """The session factory for ``engine``. Objects stay readable after commit (API responses)."""
    return sessionmaker(bind=engine, autoflush=False, expire_on_commit=False)


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
