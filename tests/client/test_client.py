"""``kt_client.Client`` / ``AsyncClient`` against the real server (and the retry rules on a mock)."""

from __future__ import annotations

import asyncio
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from kt_client import APIError, AsyncClient, Client, NotFound, RateLimited, ServerUnreachable, ValidationError
from kt_client.client import zip_directory
from service.demo import free_port
from tests.client.conftest import TINY_JOB, Server


def test_upload_a_directory_and_a_zip_reports_progress(client: Client, data: dict[str, Path]) -> None:
    for source in (data["train_dir"], data["train"]):
        calls: list[tuple[int, int]] = []
        ds = client.datasets.upload(
            source, progress=lambda sent, total, calls=calls: calls.append((sent, total))
        )
        assert ds["num_images"] == 24 and sorted(ds["classes"]) == ["checker", "circle", "square", "stripes"]
        assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] > 0
        assert [sent for sent, _ in calls] == sorted(sent for sent, _ in calls)
        assert client.datasets.get(ds["id"])["name"] == source.stem
        client.datasets.delete(ds["id"])
        with pytest.raises(NotFound):
            client.datasets.get(ds["id"])


def test_zip_directory_keeps_paths_relative(tmp_path: Path, data: dict[str, Path]) -> None:
    out = zip_directory(data["train_dir"], tmp_path / "x.zip")
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
    assert len(names) == 24 and "circle/000.png" in names


def test_errors_carry_the_server_detail_verbatim(
    server: Server, client: Client, datasets: dict[str, dict[str, Any]]
) -> None:
    theirs = datasets["train"]["id"]
    raw = httpx.get(
        f"{server.url}/v1/datasets/{theirs}", headers={"Authorization": f"Bearer {server.other_key}"}
    )
    with Client(server.url, server.other_key) as bob, pytest.raises(NotFound) as err:
        bob.datasets.get(theirs)
    assert err.value.status_code == 404 and err.value.detail == raw.json()["detail"] == str(err.value)

    body = {**TINY_JOB, "dataset_id": theirs, "steps": {"distill": -1}}
    raw = httpx.post(f"{server.url}/v1/jobs", json=body, headers={"Authorization": f"Bearer {server.key}"})
    with pytest.raises(ValidationError) as verr:
        client.jobs.submit(body)
    assert verr.value.status_code == 422 and verr.value.detail == raw.json()["detail"]
    assert "steps.distill" in verr.value.detail

    with Client(server.url, "kt_bad") as nobody, pytest.raises(APIError) as aerr:
        nobody.jobs.list()
    assert aerr.value.status_code == 401 and aerr.value.detail


def test_connection_refused_raises_server_unreachable() -> None:
    with (
        Client(f"http://127.0.0.1:{free_port()}", "k", connect_retries=1) as kt,
        pytest.raises(ServerUnreachable),
    ):
        kt.jobs.list()


def test_a_finished_job_has_a_model_and_a_log(
    client: Client, finished_job: dict[str, Any], tmp_path: Path
) -> None:
    assert finished_job["id"] in [job["id"] for job in client.jobs.list(status="succeeded")]
    model = client.models.get(finished_job["model_id"])
    assert set(model["formats"]) == {"safetensors", "onnx"}
    path = client.models.download(finished_job["model_id"], "safetensors", tmp_path)
    assert path.read_bytes()[:8]  # the safetensors header length
    assert isinstance(client.jobs.logs(finished_job["id"]), str)
    assert isinstance(client.galleries.list(), list)


def test_async_client_basic_flow(
    server: Server, data: dict[str, Path], finished_job: dict[str, Any], tmp_path: Path
) -> None:
    async def flow() -> None:
        seen: list[int] = []
        async with AsyncClient(server.url, server.key) as kt:
            ds = await kt.datasets.upload(
                data["test"], name="async", progress=lambda sent, total: seen.append(sent)
            )
            assert ds["num_images"] == 12 and seen[-1] > 0
            assert ds["id"] in [row["id"] for row in await kt.datasets.list()]
            polled: list[str] = []
            job = await kt.jobs.wait(finished_job["id"], callback=lambda j: polled.append(j["status"]))
            assert job["status"] == "succeeded" and polled == ["succeeded"]
            path = await kt.models.download(job["model_id"], "onnx", tmp_path / "m.onnx")
            assert path.stat().st_size > 0
            with pytest.raises(NotFound) as err:
                await kt.jobs.get("nope")
            assert "nope" in err.value.detail
            await kt.datasets.delete(ds["id"])

    asyncio.run(flow())


# --- the retry rules, on a mock transport


def test_429_is_retried_after_retry_after_then_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr("kt_client.client.time.sleep", waits.append)
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) < 3:
            return httpx.Response(429, headers={"Retry-After": "2"}, json={"detail": "slow down"})
        return httpx.Response(200, json={"data": [], "count": 0})

    with Client("http://kt.test", "k", transport=httpx.MockTransport(handler)) as kt:
        assert kt.jobs.list() == []
    assert waits == [2.0, 2.0] and calls == ["GET"] * 3

    def always(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "999"}, json={"detail": "Rate limit: 60 requests"})

    waits.clear()
    with Client("http://kt.test", "k", transport=httpx.MockTransport(always), max_retries=2,
                max_retry_wait_s=5) as kt, pytest.raises(RateLimited) as err:  # fmt: skip
        kt.jobs.submit({"dataset_id": "x"})
    assert waits == [5, 5] and err.value.detail == "Rate limit: 60 requests"


def test_connection_errors_are_retried_for_gets_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kt_client.client.time.sleep", lambda s: None)
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if request.method == "POST" or len(calls) < 2:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"id": "j", "status": "queued"})

    with Client("http://kt.test", "k", transport=httpx.MockTransport(handler)) as kt:
        assert kt.jobs.get("j")["id"] == "j"
        assert calls == ["GET", "GET"]
        calls.clear()
        with pytest.raises(ServerUnreachable):
            kt.jobs.cancel("j")
        assert calls == ["POST"]
