"""The per-API-key rate limit: a token bucket per key (``service.ratelimit``), applied in the auth
dependency, so every authenticated route answers 429 with ``Retry-After`` once a key's budget is
spent, and the unauthenticated /healthz, /readyz and /metrics never do."""

from __future__ import annotations

import math
import time
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.ratelimit import RateLimiter
from service.settings import Settings
from tests.service.test_api import Api, serve


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- the bucket alone -----------------------------------------------------------------------------


def test_burst_then_refill_at_the_per_minute_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_min=60, burst=3, clock=clock)  # 1 token a second, 3 at most
    assert [limiter.hit("a").allowed for _ in range(3)] == [True, True, True]
    denied = limiter.hit("a")
    assert not denied.allowed
    assert denied.retry_after_s == pytest.approx(1.0)
    assert denied.retry_after_header == "1"
    clock.advance(0.5)
    half = limiter.hit("a")  # half a token back: still denied, half a second to go
    assert not half.allowed and half.retry_after_s == pytest.approx(0.5)
    assert half.retry_after_header == "1"  # whole seconds, rounded up
    clock.advance(0.5)
    assert limiter.hit("a").allowed
    assert not limiter.hit("a").allowed
    clock.advance(3600)  # a long pause refills to the burst, never above it
    assert [limiter.hit("a").allowed for _ in range(4)] == [True, True, True, False]


def test_keys_have_separate_buckets() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_min=60, burst=1, clock=clock)
    assert limiter.hit("a").allowed
    assert not limiter.hit("a").allowed
    assert limiter.hit("b").allowed  # b is not charged for a's requests
    assert not limiter.hit("b").allowed
    assert len(limiter) == 2


def test_retry_after_is_the_time_until_a_token_is_back() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_min=6, burst=1, clock=clock)  # one token every 10 s
    assert limiter.hit("a").allowed
    clock.advance(2.5)
    denied = limiter.hit("a")
    assert denied.retry_after_s == pytest.approx(7.5)
    assert denied.retry_after_header == "8"
    clock.advance(7.4)
    assert not limiter.hit("a").allowed  # denied requests do not push the refill back
    clock.advance(0.1)
    assert limiter.hit("a").allowed


def test_buckets_are_bounded_least_recently_used_out() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_min=60, burst=1, max_keys=2, clock=clock)
    limiter.hit("a")
    limiter.hit("b")
    limiter.hit("a")  # a is now the most recently used
    limiter.hit("c")  # b's bucket is dropped
    assert len(limiter) == 2
    assert limiter.hit("b").allowed  # b starts again from a full bucket; a (now the oldest) is dropped
    assert not limiter.hit("c").allowed  # c's bucket was kept, and is spent
    assert len(limiter) == 2


def test_zero_turns_the_limit_off_and_bad_arguments_are_refused() -> None:
    limiter = RateLimiter(per_min=0, burst=1, clock=FakeClock())
    assert not limiter.enabled
    assert all(limiter.hit("a").allowed for _ in range(1000))
    assert len(limiter) == 0
    with pytest.raises(ValueError):
        RateLimiter(per_min=60, burst=0)
    with pytest.raises(ValueError):
        RateLimiter(per_min=60, burst=1, max_keys=0)


def test_default_settings_are_generous_and_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert defaults.rate_limit_per_min >= 300 and defaults.rate_limit_burst >= 20
    monkeypatch.setenv("KT_RATE_LIMIT_PER_MIN", "30")
    monkeypatch.setenv("KT_RATE_LIMIT_BURST", "4")
    settings = Settings()
    assert (settings.rate_limit_per_min, settings.rate_limit_burst) == (30, 4)


# --- through a real server ------------------------------------------------------------------------


def test_429_with_retry_after_then_recovery_after_the_wait(tmp_path: Path) -> None:
    # 60 a minute = 1 token a second; a burst of 3
    settings = Settings(data_dir=tmp_path / "data", rate_limit_per_min=60, rate_limit_burst=3)  # type: ignore[call-arg]
    with serve(create_app(settings)) as url:
        api = Api(url, settings)
        key, other = api.key("acme"), api.key("globex")
        with api.client(key) as client, api.client(other) as other_client, httpx.Client(base_url=url) as anon:
            started = time.monotonic()
            codes = [client.get("/v1/datasets").status_code for _ in range(3)]
            limited = client.get("/v1/jobs")  # another route: the same key's bucket
            elapsed = time.monotonic() - started
            assert codes == [200, 200, 200]
            assert elapsed < 1.0, f"the 4 requests took {elapsed:.2f} s; the test needs them under 1 s"
            assert limited.status_code == 429, limited.text
            retry_after = int(limited.headers["Retry-After"])
            assert 1 <= retry_after <= 2
            detail = limited.json()["detail"]
            assert f"Retry in {retry_after} s" in detail
            assert "60 requests a minute per API key" in detail and "bursts of at most 3" in detail

            # the limit is per key, and the operational endpoints are never limited
            assert other_client.get("/v1/datasets").status_code == 200
            for path in ("/healthz", "/readyz", "/metrics"):
                assert [anon.get(path).status_code for _ in range(5)] == [200] * 5, path
            # a bad key is still 401, not 429
            assert client.get("/v1/datasets", headers={"Authorization": "Bearer kt_nope"}).status_code == 401

            # every authenticated route is limited, admin ones included (a 429 before its 403)
            assert client.post("/v1/admin/galleries", json={}).status_code == 429

            time.sleep(retry_after)
            recovered = client.get("/v1/datasets")
            assert recovered.status_code == 200, recovered.text
            again = client.get("/v1/datasets")
            assert again.status_code == 429  # one token came back, one was used
            assert math.isclose(int(again.headers["Retry-After"]), 1)
