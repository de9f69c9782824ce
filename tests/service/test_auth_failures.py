"""Failed authentication is rate-limited per client address (``KT_AUTH_FAILURES_PER_MIN``,
``KT_AUTH_FAILURES_BURST``): past the limit, 429 with ``Retry-After`` before any key lookup, so a
stream of unknown keys no longer costs a database query each (a probe made 1,336 lookups in 8 s).
Another address is not held back, and the address recovers once its bucket refills. Through a real
uvicorn server."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from service.app import create_app
from service.ratelimit import RateLimiter
from service.settings import Settings
from tests.service.test_api import Api, serve
from tests.service.test_rate_limit import FakeClock

UNKNOWN = "kt_0123abcd_" + "x" * 43
FLOOD = 120


def test_peek_takes_no_token_and_says_how_long_to_wait() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_min=60, burst=2, clock=clock)
    assert all(limiter.peek("a").allowed for _ in range(10))  # looking costs nothing
    limiter.hit("a")
    limiter.hit("a")
    denied = limiter.peek("a")
    assert not denied.allowed and denied.retry_after_s == pytest.approx(1.0)
    clock.advance(1.0)
    assert limiter.peek("a").allowed and limiter.peek("b").allowed
    assert RateLimiter(per_min=0, burst=1, clock=clock).peek("a").allowed  # 0: off


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KT_AUTH_FAILURES_PER_MIN", "12")
    monkeypatch.setenv("KT_AUTH_FAILURES_BURST", "3")
    settings = Settings()
    assert (settings.auth_failures_per_min, settings.auth_failures_burst) == (12, 3)
    assert Settings.model_fields["auth_failures_burst"].default >= 20  # legitimate mistakes pass


def count_key_lookups(engine: Any) -> list[int]:
    """A one-item list counting the queries of the ``api_keys`` table on ``engine``."""
    counter = [0]

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "api_keys" in statement:
            counter[0] += 1

    event.listen(engine, "before_cursor_execute", before)
    return counter


def test_an_address_past_its_failures_gets_429_without_lookups(tmp_path: Path) -> None:
    # 60 a minute = a token back every second; 5 at once
    settings = Settings(data_dir=tmp_path / "data", auth_failures_per_min=60, auth_failures_burst=5)  # type: ignore[call-arg]
    app = create_app(settings)
    with serve(app) as url:
        api = Api(url, settings)
        key = api.key("acme")
        lookups = count_key_lookups(app.state.engine)
        bad = {"Authorization": f"Bearer {UNKNOWN}"}
        with httpx.Client(base_url=url, timeout=30) as client:
            started = time.monotonic()
            codes = [client.get("/v1/datasets", headers=bad).status_code for _ in range(FLOOD)]
            elapsed = time.monotonic() - started
            assert codes[:5] == [401] * 5, codes[:10]
            refilled = int(elapsed) + 1  # at most one token back per second of the flood
            assert codes.count(429) >= FLOOD - 5 - refilled, codes
            assert lookups[0] <= 5 + refilled, f"{lookups[0]} key lookups for {FLOOD} unknown keys"

            limited = client.get("/v1/datasets", headers=bad)
            assert limited.status_code == 429
            wait = int(limited.headers["Retry-After"])
            assert 1 <= wait <= 2
            detail = limited.json()["detail"]
            assert "failed authentications from this address" in detail and "Check the API key" in detail
            assert f"retry in {wait} s" in detail
            # malformed keys and the /ui login count too: the same address is held back there
            assert client.get("/v1/jobs", headers={"Authorization": "Bearer nonsense"}).status_code == 429
            page = client.post("/ui/login", data={"api_key": UNKNOWN})
            assert page.status_code == 429 and "failed authentications" in page.text
            assert int(page.headers["Retry-After"]) >= 1

        # another address (127.0.0.2 is loopback too) is not held back by this one's failures
        other = httpx.Client(
            base_url=url, timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.2")
        )
        with other:
            assert other.get("/v1/datasets", headers=bad).status_code == 401
            assert other.get("/v1/datasets", headers={"Authorization": f"Bearer {key}"}).status_code == 200

        # once the bucket has a token again, the right key works from the first address
        time.sleep(wait)
        with api.client(key) as client:
            ok = client.get("/v1/datasets")
            assert ok.status_code == 200, ok.text


def test_zero_turns_the_limit_off(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", auth_failures_per_min=0, auth_failures_burst=1)  # type: ignore[call-arg]
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        bad = {"Authorization": f"Bearer {UNKNOWN}"}
        assert [client.get("/v1/datasets", headers=bad).status_code for _ in range(10)] == [401] * 10
