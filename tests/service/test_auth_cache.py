"""The API-key cache: a key that authenticated is trusted for ``API_KEY_CACHE_TTL_S`` seconds without
a database lookup; after that it is looked up again, so a revocation takes effect within the TTL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, inspect
from sqlalchemy.orm import Session

from service.admin import create_tenant_key, revoke_key
from service.api.deps import TenantSnapshot, api_key_cache
from service.app import create_app
from service.db.models import Job, Tenant, new_id, utcnow
from service.db.session import make_engine, make_session_factory
from service.security import API_KEY_CACHE_TTL_S, ApiKeyCache, hash_api_key
from service.settings import Settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- the cache alone ------------------------------------------------------------------------------


def test_cache_hit_until_ttl_then_miss() -> None:
    clock = FakeClock()
    cache: ApiKeyCache[str] = ApiKeyCache(ttl_s=5.0, clock=clock)
    assert cache.get("kt_a") is None
    cache.put("kt_a", "tenant-a")
    assert cache.get("kt_a") == "tenant-a"
    clock.advance(4.9)
    assert cache.get("kt_a") == "tenant-a"  # reads do not extend the entry's life
    clock.advance(0.1)
    assert cache.get("kt_a") is None
    assert len(cache) == 0  # the expired entry is dropped


def test_cache_is_bounded_lru_and_keyed_by_hash() -> None:
    cache: ApiKeyCache[int] = ApiKeyCache(ttl_s=60, max_entries=2, clock=FakeClock())
    cache.put("kt_a", 1)
    cache.put("kt_b", 2)
    assert cache.get("kt_a") == 1  # now b is the least recently used
    cache.put("kt_c", 3)
    assert (cache.get("kt_a"), cache.get("kt_b"), cache.get("kt_c")) == (1, None, 3)
    assert len(cache) == 2
    assert set(cache._entries) == {hash_api_key("kt_a"), hash_api_key("kt_c")}  # no plaintext kept


def test_cache_invalidate_clear_and_disabled() -> None:
    cache: ApiKeyCache[int] = ApiKeyCache(ttl_s=60, clock=FakeClock())
    cache.put("kt_a", 1)
    cache.put("kt_b", 2)
    cache.invalidate("kt_a")
    assert (cache.get("kt_a"), cache.get("kt_b")) == (None, 2)
    cache.clear()
    assert cache.get("kt_b") is None
    off: ApiKeyCache[int] = ApiKeyCache(ttl_s=0)
    off.put("kt_a", 1)
    assert off.get("kt_a") is None
    with pytest.raises(ValueError):
        ApiKeyCache(max_entries=0)


def test_default_ttl_is_a_few_seconds() -> None:
    assert 0 < API_KEY_CACHE_TTL_S <= 10
    assert ApiKeyCache().ttl_s == API_KEY_CACHE_TTL_S


# --- through the app ------------------------------------------------------------------------------


@dataclass
class App:
    client: TestClient
    settings: Settings
    clock: FakeClock
    statements: list[str]

    @contextmanager
    def session(self) -> Iterator[Session]:
        engine = make_engine(self.settings.database_url)
        try:
            with make_session_factory(engine)() as session:
                yield session
        finally:
            engine.dispose()

    def key_lookups(self) -> int:
        return sum("FROM api_keys" in s for s in self.statements)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    settings = Settings(data_dir=tmp_path / "data")  # type: ignore[call-arg]
    application = create_app(settings)
    clock = FakeClock()
    application.state.api_key_cache = ApiKeyCache(ttl_s=API_KEY_CACHE_TTL_S, clock=clock)
    statements: list[str] = []
    event.listen(
        application.state.engine, "before_cursor_execute", lambda _c, _cur, sql, *_a: statements.append(sql)
    )
    with TestClient(application) as client:
        yield App(client, settings, clock, statements)


def new_key(app: App, tenant: str = "acme") -> str:
    with app.session() as session:
        return create_tenant_key(session, tenant)


def add_job(app: App) -> str:
    with app.session() as session:
        tenant_id = session.query(Tenant.id).filter(Tenant.name == "acme").scalar()
        job = Job(id=new_id(), tenant_id=tenant_id, kind="pipeline", status="running", progress=0.5)
        session.add(job)
        session.commit()
        return job.id


def get(app: App, key: str, path: str = "/v1/datasets") -> Any:
    return app.client.get(path, headers={"Authorization": f"Bearer {key}"})


def test_a_poll_with_a_cached_key_does_not_look_it_up(app: App) -> None:
    key = new_key(app)
    job_id = add_job(app)
    first = get(app, key, f"/v1/jobs/{job_id}")
    assert first.status_code == 200, first.text
    assert (first.json()["status"], first.json()["progress"]) == ("running", 0.5)
    assert app.key_lookups() == 1
    app.statements.clear()
    for _ in range(5):
        assert get(app, key, f"/v1/jobs/{job_id}").json() == first.json()
    # one SELECT per poll (the job and its model id): no key lookup, no tenant read, no write
    assert app.key_lookups() == 0
    assert len(app.statements) == 5 and all(s.lstrip().startswith("SELECT") for s in app.statements)
    assert "FROM tenants" not in " ".join(app.statements)


def test_an_entry_expires_after_the_ttl(app: App) -> None:
    key = new_key(app)
    assert get(app, key).status_code == 200
    app.clock.advance(API_KEY_CACHE_TTL_S - 0.5)
    assert get(app, key).status_code == 200
    assert app.key_lookups() == 1
    app.clock.advance(0.5)
    assert get(app, key).status_code == 200
    assert app.key_lookups() == 2  # looked up again, then cached again


def test_revocation_takes_effect_within_the_ttl(app: App) -> None:
    key, other = new_key(app), new_key(app, "globex")
    assert get(app, key).status_code == 200
    assert get(app, other).status_code == 200
    with app.session() as session:
        assert revoke_key(session, key.split("_")[1]) == 1
    app.clock.advance(API_KEY_CACHE_TTL_S / 2)
    assert get(app, key).status_code == 200  # still cached: the documented delay
    app.clock.advance(API_KEY_CACHE_TTL_S / 2)
    revoked = get(app, key)
    assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]
    assert get(app, key).status_code == 401  # failures are never cached
    assert get(app, other).status_code == 200  # the other tenant's key is unaffected


def test_unknown_and_malformed_keys_are_not_cached(app: App) -> None:
    key = new_key(app)
    prefix = key.split("_")[1]
    for bad in (f"kt_{prefix}_wrongsecret", "not-a-key"):
        for _ in range(2):
            response = get(app, bad)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
    assert len(api_key_cache(app.client.app)) == 0  # type: ignore[arg-type]
    assert app.key_lookups() == 2  # the wrong secret, each time; the malformed key never reaches the db


def test_each_request_gets_its_own_tenant_object() -> None:
    snap = TenantSnapshot(id="t1", name="acme", created_at=utcnow())
    a, b = snap.tenant(), snap.tenant()
    assert a is not b and (a.id, a.name) == (b.id, b.name) == ("t1", "acme")
    assert inspect(a).detached  # like an object loaded by a session that has closed
