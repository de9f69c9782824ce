"""Worker test fixtures: a migrated SQLite job database with a tenant, tiny demo data and configs,
and a Redis broker database (db 13, flushed) that must be running (the test fails, not skips)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import Job, Tenant
from service.db.session import init_db, make_engine, make_session_factory
from service.settings import Settings
from tests.conftest import small_config_dict
from tests.service.conftest import _clean_kt_env, flushed_redis, postgres_url  # noqa: F401 - fixtures used here

REDIS_URL = os.environ.get("KT_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


@pytest.fixture(scope="session")
def worker_demo_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """4 classes x 4 train, x 3 test, 16 unlabeled transfer images, 32 px."""
    from kt_train.demo import make_demo_data

    root = tmp_path_factory.mktemp("worker_demo")
    return make_demo_data(root, per_class=4, test_per_class=3, unlabeled=16, size=32)


@pytest.fixture
def job_config(worker_demo_data: dict[str, Path], tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """Factory: a tiny training config dict (out_dir is replaced by the worker)."""

    def make(**overrides: Any) -> dict[str, Any]:
        overrides.setdefault("export__formats", ["safetensors"])
        overrides.setdefault("finetune_student__steps", 2)
        overrides.setdefault("distill__steps", 3)
        return small_config_dict(worker_demo_data, tmp_path / "ignored", **overrides)

    return make


def make_settings(data_dir: Path, database_url: str, **kw: Any) -> Settings:
    return Settings(data_dir=data_dir, database_url=database_url, **kw)


@pytest.fixture
def worker_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data", f"sqlite:///{tmp_path / 'kt.db'}")


@pytest.fixture
def session_factory(worker_settings: Settings) -> Iterator[sessionmaker[Session]]:
    init_db(worker_settings.database_url)
    engine = make_engine(worker_settings.database_url)
    yield make_session_factory(engine)
    engine.dispose()


def add_tenant(session_factory: sessionmaker[Session], name: str = "acme") -> str:
    with session_factory() as s:
        tenant = Tenant(name=name)
        s.add(tenant)
        s.commit()
        return tenant.id


def add_job(session_factory: sessionmaker[Session], tenant_id: str, config: dict[str, Any], **kw: Any) -> str:
    with session_factory() as s:
        job = Job(tenant_id=tenant_id, kind="pipeline", params={"config": config}, **kw)
        s.add(job)
        s.commit()
        return job.id


def get_job(session_factory: sessionmaker[Session], job_id: str) -> Job:
    with session_factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


@pytest.fixture
def tenant_id(session_factory: sessionmaker[Session]) -> str:
    return add_tenant(session_factory)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A flushed Redis database for the broker and the result backend. Fails when unreachable."""
    with flushed_redis(REDIS_URL) as url:
        yield url
