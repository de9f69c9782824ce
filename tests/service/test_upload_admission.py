"""Upload admission and pacing (issue 14, status polls under mixed load): each API process takes
``KT_CONCURRENT_UPLOADS`` uploads at a time; the next ones wait their turn (``KT_UPLOAD_QUEUE``,
``KT_UPLOAD_QUEUE_TIMEOUT_S``) or answer 503 with ``Retry-After`` having read and kept nothing, and
the ``kt`` client sends such an upload again after the wait. A held upload (its body stopped
halfway) keeps its turn while other requests are answered at once. Real uvicorn on 127.0.0.1
(SQLite); the pacer and the client's retry rule also without a server."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

import service.uploads
from kt_client import Client
from kt_client.errors import APIError
from service.app import create_app
from service.uploads import ReadBudget, UploadGate, UploadPacer
from tests.service.test_api import Api, imagefolder_zip, make_settings, serve

BOUNDARY = "kt-admission-test"
MB = 1024 * 1024


@dataclass
class Server:
    api: Api
    app: FastAPI
    key: str

    def gate(self) -> UploadGate | None:
        return getattr(self.app.state, "upload_gate", None)

    def client(self) -> httpx.Client:
        return self.api.client(self.key)

    def kept(self) -> tuple[list[Path], list[Path]]:
        """(files under tmp/, stored datasets' directories)."""
        data = self.api.settings.data_dir
        return sorted((data / "tmp").glob("*")), sorted(data.glob("tenants/*/datasets/*"))


@contextmanager
def running(tmp: Path, **overrides: Any) -> Iterator[Server]:
    settings = make_settings(tmp / "data", max_upload_bytes=8 * MB, **overrides)
    app = create_app(settings)
    with serve(app) as url:
        api = Api(url=url, settings=settings)
        yield Server(api, app, api.key("uploader"))


def multipart_parts(data: bytes) -> tuple[bytes, bytes, dict[str, str]]:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="dataset.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    headers = {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(len(head) + len(data) + len(tail)),
    }
    return head, tail, headers


class Upload(threading.Thread):
    """``POST /v1/datasets`` in a thread. ``hold``: the body stops halfway until ``release()``."""

    def __init__(self, server: Server, data: bytes, hold: bool = False) -> None:
        super().__init__(daemon=True)
        self.server, self.data = server, data
        self.go_on = threading.Event()
        if not hold:
            self.go_on.set()
        self.response: httpx.Response | None = None
        self.finished_at = 0.0

    def _body(self) -> Iterator[bytes]:
        head, tail, _ = multipart_parts(self.data)
        half = len(self.data) // 2
        yield head
        yield self.data[:half]
        assert self.go_on.wait(60), "never released"
        yield self.data[half:]
        yield tail

    def run(self) -> None:
        with self.server.client() as client:
            self.response = client.post(
                "/v1/datasets", content=self._body(), headers=multipart_parts(self.data)[2], timeout=60
            )
        self.finished_at = time.monotonic()

    def release(self) -> None:
        self.go_on.set()

    def result(self) -> httpx.Response:
        self.join(60)
        assert self.response is not None, "the upload got no answer"
        return self.response


def wait_until(predicate: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}", pytrace=False)
        time.sleep(0.02)


def hold_a_turn(server: Server) -> Upload:
    """An upload that takes the server's one turn and keeps it (its body half sent)."""
    held = Upload(server, imagefolder_zip({"cats": 3, "dogs": 3}), hold=True)
    held.start()
    wait_until(lambda: (gate := server.gate()) is not None and gate.active == 1, "the held upload's turn")
    return held


@pytest.fixture(scope="module")
def no_queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One upload at a time, none waiting."""
    with running(tmp_path_factory.mktemp("no-queue"), concurrent_uploads=1, upload_queue=0) as server:
        yield server


@pytest.fixture(scope="module")
def queued(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One upload at a time, one more waiting up to 3 s."""
    with running(
        tmp_path_factory.mktemp("queued"), concurrent_uploads=1, upload_queue=1, upload_queue_timeout_s=3
    ) as server:
        yield server


def test_an_upload_past_the_turns_answers_503_with_retry_after_and_keeps_nothing(no_queue: Server) -> None:
    datasets_before = len(no_queue.kept()[1])
    held = hold_a_turn(no_queue)
    try:
        with no_queue.client() as client:
            # a 4 MB body the server never reads: the answer still arrives whole (uvicorn drains it)
            head, tail, headers = multipart_parts(os.urandom(4 * MB))
            refused = client.post("/v1/datasets", content=head + os.urandom(4 * MB) + tail, headers=headers)
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] == str(service.uploads.UPLOAD_RETRY_AFTER_S)
            detail = refused.json()["detail"]
            assert "as many uploads as it takes at once (1)" in detail, detail
            assert "nothing of this upload was read or kept" in detail, detail
            assert "Send it again in" in detail, detail
            tmp, stored = no_queue.kept()
            assert len(tmp) == 1 and len(stored) == datasets_before  # the held upload's file only
            # other requests are answered at once while an upload holds the turn
            start = time.monotonic()
            assert client.get("/v1/datasets").status_code == 200
            assert client.get("/healthz").status_code == 200
            assert time.monotonic() - start < 5
    finally:
        held.release()
    assert held.result().status_code == 201, held.result().text
    assert no_queue.gate().active == 0  # type: ignore[union-attr]
    with no_queue.client() as client:  # the refused upload, sent again, is taken
        again = client.post(
            "/v1/datasets", files={"file": ("d.zip", imagefolder_zip({"a": 2, "b": 2}), "application/zip")}
        )
        assert again.status_code == 201, again.text
    assert no_queue.kept()[0] == []


def test_the_kt_client_sends_a_refused_upload_again_after_retry_after(
    no_queue: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service.uploads, "UPLOAD_RETRY_AFTER_S", 1)  # the server runs in this process
    statuses: list[int] = []

    class Recording(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = super().handle_request(request)
            if request.method == "POST":
                statuses.append(response.status_code)
            return response

    archive = tmp_path / "pets.zip"
    archive.write_bytes(imagefolder_zip({"cats": 2, "dogs": 2}))
    held = hold_a_turn(no_queue)
    result: dict[str, Any] = {}

    def upload() -> None:
        with Client(no_queue.api.url, no_queue.key, transport=Recording()) as kt:
            result["dataset"] = kt.datasets.upload(archive, name="pets")
            result["at"] = time.monotonic()

    client_thread = threading.Thread(target=upload, daemon=True)
    start = time.monotonic()
    client_thread.start()
    try:
        wait_until(lambda: statuses == [503], "the client's first, refused, attempt")
    finally:
        held.release()
    assert held.result().status_code == 201
    client_thread.join(30)
    assert result["dataset"]["name"] == "pets" and result["dataset"]["num_images"] == 4
    assert statuses == [503, 201]
    assert result["at"] - start >= 1.0  # it waited the Retry-After before sending it again


def test_a_waiting_upload_gets_the_turn_when_it_is_free(queued: Server) -> None:
    held = hold_a_turn(queued)
    waiting = Upload(queued, imagefolder_zip({"x": 2, "y": 2}))
    waiting.start()
    try:
        wait_until(lambda: queued.gate().waiting == 1, "the second upload to wait")  # type: ignore[union-attr]
        assert waiting.response is None
    finally:
        held.release()
    assert held.result().status_code == 201, held.result().text
    assert waiting.result().status_code == 201, waiting.result().text
    assert waiting.finished_at >= held.finished_at
    assert queued.gate().active == 0 and queued.gate().waiting == 0  # type: ignore[union-attr]


def test_an_upload_that_waits_too_long_or_finds_the_queue_full_answers_503(queued: Server) -> None:
    datasets_before = len(queued.kept()[1])
    held = hold_a_turn(queued)
    try:
        waiting = Upload(queued, imagefolder_zip({"x": 2, "y": 2}))
        start = time.monotonic()
        waiting.start()
        wait_until(lambda: queued.gate().waiting == 1, "the second upload to wait")  # type: ignore[union-attr]
        with queued.client() as client:  # the queue (1) is full: at once
            full = client.post(
                "/v1/datasets",
                files={"file": ("d.zip", imagefolder_zip({"a": 2, "b": 2}), "application/zip")},
            )
        assert full.status_code == 503 and "Retry-After" in full.headers, full.text
        assert "1 more are already waiting" in full.json()["detail"]
        timed_out = waiting.result()
        assert timed_out.status_code == 503, timed_out.text
        assert "no turn came within 3 s" in timed_out.json()["detail"]
        assert time.monotonic() - start >= 3
        assert queued.gate().waiting == 0  # type: ignore[union-attr]
    finally:
        held.release()
    assert held.result().status_code == 201
    tmp, stored = queued.kept()
    assert tmp == [] and len(stored) == datasets_before + 1  # the held upload's dataset only


def test_a_stalled_upload_gives_its_turn_up_after_the_idle_timeout(tmp_path: Path) -> None:
    with running(tmp_path, concurrent_uploads=1, upload_queue=0, upload_idle_timeout_s=1) as server:
        held = hold_a_turn(server)
        try:
            wait_until(lambda: server.gate().active == 0, "the stalled upload to lose its turn")  # type: ignore[union-attr]
            assert server.kept() == ([], [])
            with server.client() as client:  # the turn is free for the next upload
                taken = client.post(
                    "/v1/datasets",
                    files={"file": ("d.zip", imagefolder_zip({"a": 2, "b": 2}), "application/zip")},
                )
                assert taken.status_code == 201, taken.text
        finally:
            held.release()
        stalled = held.result()
        assert stalled.status_code == 408, stalled.text
        assert "sent nothing for 1 s" in stalled.json()["detail"]


# --- without a server ----------------------------------------------------------------------------


def test_the_read_budget_owes_and_waits_off_what_passes_its_rate() -> None:
    budget = ReadBudget(1000.0)  # bytes a second; holds one second's worth
    assert budget.take(600) == 0.0
    assert budget.take(600) == pytest.approx(0.2, abs=0.02)  # 200 bytes owed
    assert budget.take(10_000) == pytest.approx(1.0)  # never more than MAX_PAUSE_S


async def _read(pacer: UploadPacer, chunks: int, size: int) -> float:
    start = time.perf_counter()
    for _ in range(chunks):
        await pacer.after_chunk(size)
    return time.perf_counter() - start


def test_an_idle_process_reads_uploads_at_full_speed() -> None:
    pacer = UploadPacer(2.0, ReadBudget(1 * MB))
    took = asyncio.run(_read(pacer, 24, 256 * 1024))  # 6 MB: six times the budget
    assert pacer.paused_s == 0.0 and took < 1.0


def test_a_busy_event_loop_holds_uploads_to_the_budget() -> None:
    async def main() -> tuple[UploadPacer, float]:
        stop = False

        async def other_requests() -> None:  # 5 ms of work at a time on the loop
            while not stop:
                time.sleep(0.005)
                await asyncio.sleep(0)

        busy = asyncio.create_task(other_requests())
        pacer = UploadPacer(2.0, ReadBudget(1 * MB))
        took = await _read(pacer, 6, 256 * 1024)  # 1.5 MB: the bucket's 1 MB, then 0.5 s owed
        stop = True
        await busy
        return pacer, took

    pacer, took = asyncio.run(main())
    assert pacer.paused_s >= 0.4 and took >= 0.4


def test_a_handler_running_in_the_threadpool_counts_as_busy() -> None:
    async def main() -> UploadPacer:
        handler = asyncio.create_task(run_in_threadpool(time.sleep, 1.0))  # a status poll's handler
        await asyncio.sleep(0.05)
        pacer = UploadPacer(2.0, ReadBudget(1 * MB))
        await _read(pacer, 6, 256 * 1024)
        await handler
        return pacer

    assert asyncio.run(main()).paused_s >= 0.4


def test_pacing_off_never_pauses() -> None:
    async def main() -> UploadPacer:
        handler = asyncio.create_task(run_in_threadpool(time.sleep, 0.3))
        await asyncio.sleep(0.05)
        pacer = UploadPacer(0.0, ReadBudget(1 * MB))
        await _read(pacer, 12, 256 * 1024)
        await handler
        return pacer

    assert asyncio.run(main()).paused_s == 0.0


def test_the_client_retries_only_uploads_on_503_and_only_with_retry_after(tmp_path: Path) -> None:
    calls: list[tuple[str, str, int]] = []
    answers: list[httpx.Response] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path, len(request.read())))
        return answers.pop(0)

    busy = {"detail": "busy; send it again in 1 s"}
    with Client("http://kt.test", "kt_x_y", transport=httpx.MockTransport(handler)) as kt:
        answers[:] = [
            httpx.Response(503, json=busy, headers={"Retry-After": "0"}),
            httpx.Response(201, json={"id": "d1", "name": "pets"}),
        ]
        archive = tmp_path / "pets.zip"
        archive.write_bytes(imagefolder_zip({"cats": 2, "dogs": 2}))
        assert kt.datasets.upload(archive)["id"] == "d1"
        # a 503 without Retry-After is an answer, not a wait
        answers[:] = [httpx.Response(503, json={"detail": "down"})]
        with pytest.raises(APIError):
            kt.datasets.upload(archive)
        assert [c[2] for c in calls[:2]] == [calls[0][2]] * 2 and calls[0][2] > 0  # the whole body again
        # other requests (a job submit) are not sent twice on a 503
        calls.clear()
        answers[:] = [httpx.Response(503, json=busy, headers={"Retry-After": "0"})]
        with pytest.raises(APIError):
            kt.jobs.submit({"dataset_id": "d1"})
        assert len(calls) == 1
