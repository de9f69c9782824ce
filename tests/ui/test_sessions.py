"""``/ui`` logins are server-side sessions: the cookie holds a random token (the cookie used to hold
the API key itself for 8 hours), the ``ui_sessions`` table only its hash, and logging out deletes
the session, so a copied cookie stops working too. An expired session, or one whose key was
revoked, is refused at once."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from service.admin import create_tenant_key, revoke_key
from service.app import create_app
from service.db.models import UiSession, utcnow
from service.db.session import make_engine, make_session_factory
from service.settings import Settings
from service.ui.auth import COOKIE_MAX_AGE_S, COOKIE_NAME, LEGACY_COOKIE_NAME
from tests.service.conftest import _clean_kt_env  # noqa: F401 - autouse fixture


@dataclass
class Ui:
    client: TestClient
    settings: Settings

    def key(self, tenant: str) -> str:
        engine = make_engine(self.settings.database_url)
        try:
            with make_session_factory(engine)() as s:
                return create_tenant_key(s, tenant)
        finally:
            engine.dispose()

    def sessions(self) -> list[UiSession]:
        engine = make_engine(self.settings.database_url)
        try:
            with make_session_factory(engine)() as s:
                return list(s.scalars(select(UiSession)).all())
        finally:
            engine.dispose()

    def db(self, statement: object) -> None:
        engine = make_engine(self.settings.database_url)
        try:
            with make_session_factory(engine)() as s:
                s.execute(statement)  # type: ignore[call-overload]
                s.commit()
        finally:
            engine.dispose()

    def login(self, key: str) -> str:
        """Log in; the cookie's value."""
        self.client.cookies.clear()
        r = self.client.post("/ui/login", data={"api_key": key, "next": "/ui/jobs"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui/jobs", r.text
        return str(self.client.cookies[COOKIE_NAME])

    def page_with(self, cookie: str, name: str = COOKIE_NAME) -> int:
        """The status of /ui/jobs for a browser that sends only this cookie."""
        self.client.cookies.clear()
        self.client.cookies.set(name, cookie, domain="testserver.local", path="/ui")
        try:
            return self.client.get("/ui/jobs", follow_redirects=False).status_code
        finally:
            self.client.cookies.clear()


@pytest.fixture
def ui(tmp_path: Path) -> Iterator[Ui]:
    settings = Settings(data_dir=tmp_path / "data")  # type: ignore[call-arg]
    # https: the cookie is Secure, so a client only sends it back over https
    with TestClient(create_app(settings), base_url="https://testserver") as client:
        yield Ui(client, settings)


def test_the_cookie_holds_a_session_token_and_the_table_only_its_hash(ui: Ui) -> None:
    key = ui.key("acme")
    r = ui.client.post("/ui/login", data={"api_key": key}, follow_redirects=False)
    assert r.status_code == 303
    cookies = r.headers.get_list("set-cookie")
    assert cookies and all(key not in c for c in cookies), cookies
    token = str(ui.client.cookies[COOKIE_NAME])
    assert len(token) >= 40 and token != key
    [row] = ui.sessions()
    assert row.id == hashlib.sha256(token.encode()).hexdigest() and token not in row.id
    assert (
        timedelta(seconds=COOKIE_MAX_AGE_S - 60)
        < row.expires_at - utcnow()
        <= timedelta(seconds=COOKIE_MAX_AGE_S)
    )
    assert ui.client.get("/ui/jobs").status_code == 200
    # the API key itself is no session, under the cookie's name or the one older versions used
    assert ui.page_with(key) == 303
    assert ui.page_with(key, LEGACY_COOKIE_NAME) == 303


def test_logout_ends_the_session_for_every_copy_of_the_cookie(ui: Ui) -> None:
    key = ui.key("acme")
    token = ui.login(key)
    other_device = ui.login(key)  # a second login is a second session
    assert len(ui.sessions()) == 2
    assert ui.page_with(token) == 200

    ui.client.cookies.set(COOKIE_NAME, token, domain="testserver.local", path="/ui")
    out = ui.client.post("/ui/logout", follow_redirects=False)
    assert out.status_code == 303 and "max-age=0" in out.headers["set-cookie"].lower()
    # the copied cookie is dead: the server forgot the session, not only the browser
    assert ui.page_with(token) == 303
    assert [s.id for s in ui.sessions()] == [hashlib.sha256(other_device.encode()).hexdigest()]
    assert ui.page_with(other_device) == 200


def test_an_expired_session_is_refused_and_removed_at_the_next_login(ui: Ui) -> None:
    key = ui.key("acme")
    token = ui.login(key)
    ui.db(update(UiSession).values(expires_at=utcnow() - timedelta(seconds=1)))
    r = ui.client.get("/ui/jobs", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")
    assert "max-age=0" in r.headers.get("set-cookie", "").lower()  # the dead cookie is cleared
    ui.login(key)
    assert len(ui.sessions()) == 1  # the expired one was swept
    assert ui.page_with(token) == 303


def test_revoking_the_key_ends_its_sessions_at_once(ui: Ui) -> None:
    key = ui.key("acme")
    token = ui.login(key)
    assert ui.page_with(token) == 200
    engine = make_engine(ui.settings.database_url)
    with make_session_factory(engine)() as s:
        assert revoke_key(s, key.split("_")[1]) == 1
    engine.dispose()
    # no waiting for the key cache's TTL: every page looks the session and its key up
    assert ui.page_with(token) == 303
