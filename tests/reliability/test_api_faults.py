"""API-side faults, with a real uvicorn process on PostgreSQL (a fresh database per test):

- the API ``kill -9``-ed while it receives an upload, and while it extracts one: no dataset is
  ever listed or readable, and a restarted API removes what the dead one left on disk;
- the database unreachable (a TCP proxy in front of PostgreSQL refuses connections, or accepts
  them and never answers): ``/readyz`` 503, every request 503 with a JSON message, fast, the
  process stays up and serves again once the database is back, without a restart;
- the API started while the database is down: it stays up (no crash loop), answers 503, and
  migrates and serves as soon as the database answers.
"""

from __future__ import annotations

import io
import random
import socket
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import func, select

from service.db.models import Dataset
from tests.reliability.conftest import (
    PgProxy,
    RedisServer,
    child_env,
    create_key,
    running,
    session_factory,
    start_api,
    wait_until,
)

BOUNDARY = "kt-reliability-boundary"


def multipart(zip_bytes: bytes, name: str) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="d.zip"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
        + zip_bytes
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def open_upload(url: str, key: str, body: bytes, first_bytes: int) -> socket.socket:
    """Start ``POST /v1/datasets`` on a raw socket: the headers announce all of ``body``, only its
    first ``first_bytes`` are sent."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST /v1/datasets HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[:first_bytes])
    return sock


def noise_zip(images: int, side: int, seed: int = 0) -> bytes:
    """An ImageFolder zip of ``images`` noisy JPEGs in 3 classes: slow enough to decode that the
    API spends a while extracting it."""
    rng = random.Random(seed)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(images):
            img = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
            out = io.BytesIO()
            img.save(out, format="JPEG", quality=95)
            zf.writestr(f"class{i % 3}/img{i}.jpg", out.getvalue())
    return buf.getvalue()


def api_env(data_dir: Path, database_url: str, broker_url: str) -> dict[str, str]:
    """The API's settings; no per-key rate limit (these tests ask in quick succession)."""
    return child_env(
        KT_DATA_DIR=str(data_dir),
        KT_DATABASE_URL=database_url,
        KT_BROKER_URL=broker_url,
        KT_RATE_LIMIT_PER_MIN="0",
    )


def uploads_in_tmp(data_dir: Path) -> list[Path]:
    tmp = data_dir / "tmp"
    return sorted(tmp.glob("upload*")) if tmp.is_dir() else []


@pytest.mark.slow
def test_api_killed_during_upload_leaves_nothing_visible(
    tmp_path: Path, pg_url: str, private_redis: RedisServer
) -> None:
    """``kill -9`` of the API (1) while the body streams to disk and (2) while the archive is
    extracted into its staging directory. Before and after each kill, ``GET /v1/datasets`` lists
    nothing and ``GET /v1/datasets/{id}`` (the id read from the staging directory's name) is 404;
    the temp upload and the staging directory stay behind the dead process, and the next API
    process removes them at startup (their owner is dead, no other upload is in progress). Then a
    complete upload works."""
    data_dir = tmp_path / "data"
    with session_factory(pg_url):
        pass  # migrated
    key = create_key(pg_url, "uploader")
    env = api_env(data_dir, pg_url, private_redis.url)

    def listed(url: str) -> int:
        response = httpx.get(f"{url}/v1/datasets", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert response.status_code == 200, response.text
        return int(response.json()["count"])

    def rows() -> int:
        with session_factory(pg_url, migrate=False) as factory, factory() as s:
            return int(s.scalar(select(func.count()).select_from(Dataset)) or 0)

    # (1) killed while receiving: half of a 4 MB body sent
    api, url = start_api(env, tmp_path / "api1.log")
    with running(api):
        body = multipart(noise_zip(3, 8) + random.Random(1).randbytes(4_000_000), "half")
        sock = open_upload(url, key, body, len(body) // 2)
        partial = wait_until(
            lambda: [p for p in uploads_in_tmp(data_dir) if p.stat().st_size > 1_000_000],
            30,
            "the upload to stream to disk",
            api.tail,
        )
        assert listed(url) == 0
        api.kill()
        sock.close()
    assert [p.name for p in uploads_in_tmp(data_dir)] == [partial[0].name]  # left behind, dead owner
    assert f"~{api.pid}~" in partial[0].name
    assert rows() == 0

    # (2) killed while extracting: the whole body sent, killed once the staging directory appears
    api, url = start_api(env, tmp_path / "api2.log")
    with running(api):
        wait_until(
            lambda: not uploads_in_tmp(data_dir), 20, "the startup sweep of the first leftover", api.tail
        )
        datasets = data_dir / "tenants"
        body = multipart(noise_zip(240, 256, seed=2), "whole")
        sock = open_upload(url, key, body, len(body))
        seen_counts: list[int] = []
        staging = []
        deadline = time.monotonic() + 60
        while not staging and time.monotonic() < deadline:
            staging = list(datasets.glob("*/datasets/.staging-*"))
            if not staging:
                time.sleep(0.002)
        assert staging, "extraction never started\n" + api.tail()
        api.kill()
        sock.settimeout(5)
        try:
            answer = sock.recv(4096)
        except OSError:
            answer = b""
        sock.close()
        assert not answer.startswith(b"HTTP/1.1 201"), (
            "the upload finished before the kill: use a bigger archive"
        )
        dataset_id = staging[0].name.removeprefix(".staging-")
        seen_counts.append(rows())
    assert staging[0].is_dir() and uploads_in_tmp(data_dir), "the kill left nothing behind to clean"
    assert not (staging[0].parent / dataset_id).exists() and seen_counts == [0]

    # a new API process cleans up, and never shows the killed uploads
    api, url = start_api(env, tmp_path / "api3.log")
    with running(api):
        wait_until(
            lambda: not uploads_in_tmp(data_dir) and not staging[0].exists(),
            20,
            "the startup sweep to remove the leftovers",
            api.tail,
        )
        assert listed(url) == 0
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{url}/v1/datasets/{dataset_id}", headers=headers).status_code == 404
        assert list(datasets.glob("*/datasets/*")) == []  # no dataset directory, hidden or not
        # and the service works: a complete upload
        response = httpx.post(
            f"{url}/v1/datasets",
            headers=headers,
            files={"file": ("d.zip", noise_zip(6, 16, seed=3), "application/zip")},
            data={"name": "after"},
            timeout=60,
        )
        assert response.status_code == 201, response.text
        assert listed(url) == 1 and uploads_in_tmp(data_dir) == []
    assert rows() == 1


# --- the database ------------------------------------------------------------------------------


def timed(client: httpx.Client, method: str, path: str, **kwargs: Any) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    response = client.request(method, path, **kwargs)
    return response, time.monotonic() - t0


def assert_db_unavailable(response: httpx.Response, seconds: float, limit: float = 2.0) -> None:
    assert response.status_code == 503, f"{response.status_code}: {response.text}"
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert "database" in detail.lower() and "try again" in detail.lower(), detail
    assert seconds < limit, f"{response.request.method} {response.request.url.path} took {seconds:.2f} s"


def requests_while_down(
    keys: tuple[str, str], job_body: dict[str, Any]
) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path, kwargs) of requests that all need the database: reads, a write, and the
    authentication of a key the API has not cached."""
    cached, uncached = (f"Bearer {k}" for k in keys)
    return [
        ("GET", "/v1/datasets", {"headers": {"Authorization": cached}}),
        ("GET", "/v1/jobs", {"headers": {"Authorization": uncached}}),
        ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef", {"headers": {"Authorization": cached}}),
        ("POST", "/v1/jobs", {"headers": {"Authorization": cached}, "json": job_body}),
    ]


@pytest.mark.slow
def test_database_unreachable_then_back(
    tmp_path: Path, pg_url: str, pg_proxy: PgProxy, private_redis: RedisServer
) -> None:
    """The API's database connections go through a proxy that the test cuts: first refusing
    connections (the server is down), then accepting them and never answering (a hung server).
    Either way ``/readyz`` is 503 naming the database, every request that needs the database is a
    503 with a JSON ``detail`` (never a 500, never a hang) in under 2 s (a hung server: the request
    that finds it down waits out the 2 s connect timeout, libpq's minimum; the requests after it
    fail at once while a background probe waits for the server), ``/healthz`` stays 200 and the
    process stays up. Restored, the same process serves again within seconds."""
    with session_factory(pg_url):
        pass
    keys = create_key(pg_url, "db-a"), create_key(pg_url, "db-b")
    env = api_env(tmp_path / "data", pg_proxy.url(pg_url), private_redis.url)
    job_body = {"dataset_id": "0123456789abcdef0123456789abcdef", "teacher": "timm:test_vit"}
    api, url = start_api(env, tmp_path / "api.log")
    with running(api), httpx.Client(base_url=url, timeout=30) as client:
        ok = {"Authorization": f"Bearer {keys[0]}"}
        assert client.get("/v1/datasets", headers=ok).status_code == 200  # the key is now cached
        assert client.get("/readyz").status_code == 200
        pid = api.pid

        def serving() -> bool:
            return client.get("/v1/datasets", headers=ok).status_code == 200

        for how in ("refuse", "blackhole"):
            pg_proxy.cut(how)
            first, seconds = timed(client, "GET", "/v1/datasets", headers=ok)
            # the request that finds a hung server waits for the connect timeout (2 s)
            assert_db_unavailable(first, seconds, limit=2.0 if how == "refuse" else 3.5)
            first_s, slowest_s = seconds, 0.0
            t_end = time.monotonic() + 3
            rounds = 0
            while time.monotonic() < t_end:  # keep asking: no crash, no slow answer, no 500
                for method, path, kwargs in requests_while_down(keys, job_body):
                    response, seconds = timed(client, method, path, **kwargs)
                    assert_db_unavailable(response, seconds, limit=2.0 if how == "refuse" else 0.5)
                    slowest_s = max(slowest_s, seconds)
                ready, seconds = timed(client, "GET", "/readyz")
                assert ready.status_code == 503 and "database" in ready.json()["failed"], ready.text
                assert seconds < 2.0
                assert client.get("/healthz").status_code == 200
                assert api.alive(), api.tail()
                rounds += 1
                time.sleep(0.1)
            assert rounds >= 2
            pg_proxy.restore()
            back_at = time.monotonic()
            wait_until(serving, 15, f"the API to serve again after '{how}'", api.tail)
            print(
                f"\n{how}: first 503 in {first_s:.3f} s, then {rounds} rounds of 5 requests, slowest "
                f"{slowest_s:.3f} s; serving again {time.monotonic() - back_at:.2f} s after the database came back"
            )
            assert client.get("/readyz").status_code == 200
            uncached = client.get("/v1/jobs", headers={"Authorization": f"Bearer {keys[1]}"})
            assert uncached.status_code == 200
        assert api.pid == pid and api.alive()
    log = (tmp_path / "api.log").read_text()
    assert "Traceback" not in log, log[-4000:]
    assert " 500 " not in log


@pytest.mark.slow
def test_api_started_while_database_is_down(
    tmp_path: Path, pg_url: str, pg_proxy: PgProxy, private_redis: RedisServer
) -> None:
    """An API process started while its database refuses connections does not exit (a supervisor
    would restart it in a loop): ``/healthz`` answers, ``/readyz`` and the API answer 503 saying
    the schema waits for the database. Once the database is back it migrates the (empty) database
    in the background and serves, as the same process."""
    pg_proxy.cut("refuse")
    env = api_env(tmp_path / "data", pg_proxy.url(pg_url), private_redis.url)
    api, url = start_api(env, tmp_path / "api.log")
    with running(api), httpx.Client(base_url=url, timeout=30) as client:
        pid = api.pid
        t_end = time.monotonic() + 3
        while time.monotonic() < t_end:
            assert client.get("/healthz").status_code == 200
            ready, seconds = timed(client, "GET", "/readyz")
            assert ready.status_code == 503 and "database" in ready.json()["failed"], ready.text
            response, seconds = timed(
                client, "GET", "/v1/datasets", headers={"Authorization": "Bearer kt_x_y"}
            )
            assert response.status_code == 503 and seconds < 2.0, response.text
            assert "database" in response.json()["detail"]
            assert api.alive(), api.tail()
            time.sleep(0.2)
        pg_proxy.restore()
        wait_until(lambda: client.get("/readyz").status_code == 200, 30, "the API to be ready", api.tail)
        key = create_key(pg_url, "late")  # the tables exist: the API migrated them
        response = client.get("/v1/datasets", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200 and response.json()["count"] == 0
        assert api.pid == pid and api.alive()
