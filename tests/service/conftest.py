"""Service test fixtures: a migrated SQLite database, and a fresh PostgreSQL database per test
session (created under a unique name, dropped afterwards)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service.db.session import init_db, make_engine, make_session_factory

# Server-level URL used to create/drop the per-session test database.
PG_ADMIN_URL = os.environ.get("KT_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_HOWTO = (
    "PostgreSQL is needed for the service tests and is not reachable at {url} ({err}).\n"
    "Start it, e.g. `sudo service postgresql start` (Debian) or\n"
    "`docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:16`,\n"
    "or point KT_TEST_PG_ADMIN_URL at a server where you may CREATE DATABASE."
)


@pytest.fixture(autouse=True)
def _clean_kt_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests see only the KT_* variables they set themselves, and a fresh settings cache."""
    from service.settings import get_settings

    for name in list(os.environ):
        if name.startswith("KT_") and not name.startswith("KT_TEST_"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'kt.db'}"


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    init_db(sqlite_url)
    engine = make_engine(sqlite_url)
    yield engine
    engine.dispose()


@pytest.fixture
def db(sqlite_engine: Engine) -> Iterator[Session]:
    with make_session_factory(sqlite_engine)() as session:
        yield session


@contextlib.contextmanager
def fresh_postgres_database(prefix: str = "kt_test") -> Iterator[str]:
    """URL of a brand-new, empty PostgreSQL database, dropped on exit.
    Fails (does not skip) when the server is unreachable."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    unreachable = ""
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as err:
        unreachable = str(err.orig).strip()
    if unreachable:
        admin.dispose()
        pytest.fail(PG_HOWTO.format(url=PG_ADMIN_URL, err=unreachable), pytrace=False)
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


REDIS_HOWTO = "Redis is needed at {url} ({err}); start it, e.g. `sudo service redis-server start`."


@contextlib.contextmanager
def flushed_redis(url: str) -> Iterator[str]:
    """A Redis database flushed before and after use. Fails (does not skip) when unreachable."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as err:
        client.close()
        pytest.fail(REDIS_HOWTO.format(url=url, err=err), pytrace=False)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the test session."""
    with fresh_postgres_database() as url:
        yield url
