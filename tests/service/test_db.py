"""Database layer: migrations match the models on SQLite and PostgreSQL, round trips, FK rules,
and settings."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from service.db.models import ApiKey, Base, Dataset, Gallery, Job, Model, Tenant, TransferSet, new_id
from service.db.session import alembic_config, init_db, make_engine, make_session_factory
from service.settings import Settings, get_settings

REPO = Path(__file__).resolve().parents[2]
TABLES = {
    "tenants",
    "api_keys",
    "datasets",
    "galleries",
    "transfer_sets",
    "jobs",
    "models",
    "registered_models",
    "workers",
    "ui_sessions",
}


def schema_diff(engine: Engine) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, Base.metadata)


def user_tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def check_migrations(url: str) -> None:
    init_db(url)
    engine = make_engine(url)
    try:
        assert user_tables(engine) == TABLES
        assert schema_diff(engine) == [], "migrations/versions disagree with service/db/models.py"
        config = alembic_config(url)
        command.downgrade(config, "base")
        assert user_tables(engine) == set()
        command.upgrade(config, "head")
        assert user_tables(engine) == TABLES
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def test_migrations_match_models_sqlite(sqlite_url: str) -> None:
    check_migrations(sqlite_url)


def test_migrations_match_models_postgres(postgres_url: str) -> None:
    check_migrations(postgres_url)
    engine = make_engine(postgres_url)
    try:
        roundtrip(make_session_factory(engine)())
    finally:
        engine.dispose()


def test_pool_checkout_pings_only_a_connection_the_server_dropped(postgres_url: str, tmp_path: Path) -> None:
    """``pool_pre_ping`` stays on (a connection the server dropped is replaced, no request sees it
    fail), but taking a live idle connection from the pool sends nothing: the status poll's one
    query is its only round trip (it was two, with ``SELECT 1`` before it)."""
    engine = make_engine(postgres_url)
    try:
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
            raw = conn.connection.dbapi_connection
        assert raw is not None
        trace = tmp_path / "libpq.trace"
        with open(trace, "w") as fh:
            raw.pgconn.trace(fh.fileno())  # type: ignore[attr-defined]
            try:
                with engine.connect() as conn:  # the checkout pings (or not) here
                    assert conn.connection.dbapi_connection is raw
            finally:
                raw.pgconn.untrace()  # type: ignore[attr-defined]
        assert trace.read_text() == "", "the checkout of a live idle connection talked to the server"

        admin_url = make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(admin_url, autocommit=True) as admin:  # the server drops it
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
            deadline = time.monotonic() + 10
            alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
            while admin.execute(alive, [pid]).fetchone() != (0,):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with engine.connect() as conn:  # replaced at checkout: no error
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != pid
    finally:
        engine.dispose()


def make_tenant(db: Session, name: str | None = None) -> Tenant:
    tenant = Tenant(name=name or f"tenant-{new_id()[:8]}")
    db.add(tenant)
    db.flush()
    return tenant


def make_api_key(db: Session, tenant: Tenant) -> tuple[str, ApiKey]:
    secret = f"kt_{new_id()}"
    key = ApiKey(tenant_id=tenant.id, prefix=secret[:8], key_hash=hashlib.sha256(secret.encode()).hexdigest())
    db.add(key)
    db.flush()
    return secret, key


def roundtrip(db: Session) -> None:
    with db:
        tenant = make_tenant(db)
        secret, _ = make_api_key(db, tenant)
        dataset = Dataset(tenant_id=tenant.id, name="pets", classes=["cat", "dog"], class_counts={"cat": 3})
        dataset.bytes = 3 * 1024**3  # over 2**31: needs a 64-bit column on PostgreSQL
        job = Job(tenant_id=tenant.id, kind="pipeline", params={"student": "timm:resnet18"})
        db.add_all([dataset, job])
        db.commit()
        ids = (tenant.id, dataset.id, job.id)

    with db:
        found = db.scalars(select(ApiKey).where(ApiKey.prefix == secret[:8])).one()
        assert found.key_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert found.tenant_id == ids[0] and found.revoked_at is None
        ds = db.get(Dataset, ids[1])
        assert ds is not None
        assert (ds.status, ds.classes, ds.class_counts, ds.bytes) == (
            "uploading",
            ["cat", "dog"],
            {"cat": 3},
            3 * 1024**3,
        )
        assert len(ds.id) == 32
        j = db.get(Job, ids[2])
        assert j is not None
        assert (j.status, j.progress, j.attempts, j.cancel_requested) == ("queued", 0.0, 0, False)
        assert j.params == {"student": "timm:resnet18"} and j.stage_timings == {} and j.metrics == {}
        assert j.created_at.utcoffset() == timedelta(0)
        before = j.updated_at
        j.status, j.stage, j.progress = "running", "curate", 0.25
        db.commit()
        assert j.updated_at >= before


def test_crud_roundtrip_sqlite(db: Session) -> None:
    roundtrip(db)
    db.expunge_all()
    job = db.scalars(select(Job)).one()
    # timestamps come back aware (UTC) from SQLite too
    assert job.created_at.utcoffset() == timedelta(0)
    with pytest.raises(StatementError, match="naive datetime"):
        job.started_at = datetime(2024, 1, 1)
        db.flush()
    db.rollback()


def test_foreign_keys_enforced_on_sqlite(db: Session) -> None:
    with pytest.raises(IntegrityError):
        db.add(Dataset(tenant_id=new_id(), name="orphan"))
        db.flush()
    db.rollback()

    tenant = make_tenant(db)
    make_api_key(db, tenant)
    gallery = Gallery(name="g", path="/g", encoder="clip", index_kind="flat", dim=8)
    dataset = Dataset(tenant_id=tenant.id, name="d")
    db.add_all([gallery, dataset])
    db.flush()
    job = Job(tenant_id=tenant.id, kind="curate")
    db.add(job)
    db.flush()
    db.add(TransferSet(tenant_id=tenant.id, dataset_id=dataset.id, gallery_id=gallery.id, job_id=job.id))
    db.add(Model(tenant_id=tenant.id, job_id=job.id, card={"classes": ["a"]}))
    db.commit()

    # a gallery still used by a transfer set cannot be deleted
    with pytest.raises(IntegrityError):
        db.delete(gallery)
        db.flush()
    db.rollback()

    # deleting a tenant deletes everything it owns (ON DELETE CASCADE in the database)
    db.execute(Tenant.__table__.delete().where(Tenant.id == tenant.id))
    db.commit()
    for table in (ApiKey, Dataset, Job, TransferSet, Model):
        assert db.scalars(select(table)).all() == [], table.__tablename__
    assert db.get(Gallery, gallery.id) is not None


def test_sqlite_pragmas(sqlite_engine: Engine) -> None:
    with sqlite_engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_alembic_cli_uses_kt_database_url(tmp_path: Path) -> None:
    """`alembic upgrade head` from the repo root takes the URL from KT_DATABASE_URL."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {"PATH": str(Path(sys.executable).parent), "KT_DATABASE_URL": url, "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    engine = make_engine(url)
    try:
        assert user_tables(engine) == TABLES
    finally:
        engine.dispose()


# --- settings ---------------------------------------------------------------------------------------


def test_settings_defaults_derive_from_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings()
    data_dir = (tmp_path / "kt-data").resolve()
    assert s.data_dir == data_dir
    assert s.database_url == f"sqlite:///{data_dir / 'kt.db'}"
    assert s.broker_url == f"sqla+sqlite:///{data_dir / 'broker.db'}"
    assert s.result_backend == f"db+sqlite:///{data_dir / 'results.db'}"
    assert (s.environment, s.api_host, s.api_port) == ("development", "127.0.0.1", 8000)
    assert (s.max_upload_bytes, s.max_upload_files, s.max_image_pixels) == (2 * 1024**3, 100_000, 89_478_485)
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} has no description"


def test_settings_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KT_DATA_DIR", str(tmp_path / "data"))
    s = Settings()
    assert s.database_url == f"sqlite:///{tmp_path / 'data' / 'kt.db'}"
    assert s.broker_url.endswith(f"{tmp_path / 'data' / 'broker.db'}")

    monkeypatch.setenv("KT_DATABASE_URL", "postgresql+psycopg://u@db/kt")
    monkeypatch.setenv("KT_BROKER_URL", "redis://r:6379/0")
    monkeypatch.setenv("KT_API_PORT", "9000")
    monkeypatch.setenv("KT_MAX_UPLOAD_BYTES", "1024")
    s = Settings()
    assert s.database_url == "postgresql+psycopg://u@db/kt"
    assert s.broker_url == "redis://r:6379/0"
    assert s.result_backend == f"db+sqlite:///{tmp_path / 'data' / 'results.db'}"
    assert (s.api_port, s.max_upload_bytes) == (9000, 1024)

    assert get_settings() is get_settings()
    assert get_settings().api_port == 9000


@pytest.mark.parametrize("secret", ["changethis", "changeme", "", "  CHANGEME "])
def test_placeholder_secret_refused_in_production(secret: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KT_ENVIRONMENT", "production")
    with pytest.raises(ValueError, match="KT_SECRET_KEY"):
        Settings(secret_key=secret)
    with pytest.raises(ValueError, match="KT_SECRET_KEY"):
        Settings()  # the default is a placeholder too
    assert Settings(secret_key="s3cr3t-" + new_id()).environment == "production"
    assert Settings(environment="development", secret_key=secret).secret_key == secret


# kt_train's pure-Python modules the API may import: the recipe and the config schema it validates
# a job's config with at submit (pydantic + yaml, no torch).
# the pure-Python modules of kt_train the service reads (recipe, config schema, spec grammar, the
# export formats' refusals); anything else would be a sign of torch creeping in
SERVICE_KT_TRAIN_MODULES = {
    "kt_train",
    "kt_train.config",
    "kt_train.errors",
    "kt_train.recipe",
    "kt_train.formats",
    "kt_train.specs",
}


def test_service_does_not_import_torch() -> None:
    code = (
        "import sys, service.settings, service.db, service.db.session, service.app, service.admin, service.uploads;"
        "bad = [m for m in ('torch', 'timm', 'open_clip', 'numpy') if m in sys.modules];"
        "assert not bad, bad;"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'kt_train')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=REPO, timeout=60, capture_output=True, text=True
    )
    assert set(done.stdout.split()) <= SERVICE_KT_TRAIN_MODULES, done.stdout
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


# --- 0002: admin keys, job queue and heartbeat, added to a database that has rows


def upgrade_with_rows(url: str) -> None:
    from sqlalchemy import text

    config = alembic_config(url)
    command.upgrade(config, "0001")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO tenants (id, name, created_at) VALUES ('t1', 'old', :now)"), {"now": NOW}
            )
            conn.execute(
                text(
                    "INSERT INTO api_keys (id, tenant_id, prefix, key_hash, created_at) "
                    "VALUES ('k1', 't1', 'abcd1234', :hash, :now)"
                ),
                {"hash": "0" * 64, "now": NOW},
            )
            conn.execute(
                text(
                    "INSERT INTO jobs (id, tenant_id, kind, status, progress, params, stage_timings, metrics, "
                    "cancel_requested, attempts, created_at, updated_at) VALUES ('j1', 't1', 'pipeline', "
                    "'running', 0.5, '{}', '{}', '{}', false, 1, :now, :now)"
                ),
                {"now": NOW},
            )
        command.upgrade(config, "head")
        assert schema_diff(engine) == []
        with make_session_factory(engine)() as session:
            key = session.get(ApiKey, "k1")
            job = session.get(Job, "j1")
            assert key is not None and key.is_admin is False  # existing keys are not admin keys
            assert job is not None and (job.queue, job.heartbeat_at, job.progress) == ("cpu", None, 0.5)
        command.downgrade(config, "0001")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 1
            assert "queue" not in {c["name"] for c in inspect(conn).get_columns("jobs")}
    finally:
        engine.dispose()


NOW = datetime(2026, 1, 1, 12, 0, 0)


def test_migration_0002_keeps_rows_sqlite(sqlite_url: str) -> None:
    upgrade_with_rows(sqlite_url)


def test_migration_0002_keeps_rows_postgres() -> None:
    from tests.service.conftest import fresh_postgres_database

    with fresh_postgres_database("kt_mig") as url:
        upgrade_with_rows(url)


def test_the_api_sizes_its_postgres_pool_and_gil_switch_interval_from_settings(
    postgres_url: str, sqlite_url: str, tmp_path: Path
) -> None:
    """KT_DB_POOL_SIZE / KT_DB_MAX_OVERFLOW reach the API's PostgreSQL pool (SQLAlchemy's 5 + 10
    queued status requests for connections and reopened one per request under the mixed load:
    bench/results/service.md), SQLite keeps its own pool; KT_GIL_SWITCH_INTERVAL_MS sets the
    process's switch interval."""
    from service.app import create_app

    before = sys.getswitchinterval()
    try:
        app = create_app(
            Settings(
                data_dir=tmp_path / "pg",
                database_url=postgres_url,
                db_pool_size=7,
                db_max_overflow=3,
                gil_switch_interval_ms=2,
            ),
            migrate=False,
        )
        pool = app.state.session_factory.kw["bind"].pool
        assert pool.size() == 7 and pool._max_overflow == 3
        assert sys.getswitchinterval() == pytest.approx(0.002)
        assert Settings(data_dir=tmp_path / "d").db_pool_size == 20  # not SQLAlchemy's 5
        lite = create_app(Settings(data_dir=tmp_path / "lite", database_url=sqlite_url), migrate=False)
        assert lite.state.session_factory.kw["bind"].dialect.name == "sqlite"
    finally:
        sys.setswitchinterval(before)
