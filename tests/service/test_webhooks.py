"""Job-finished webhooks and the job event stream, through a real uvicorn server (SQLite, the
embedded SQLite broker; no Celery worker) and a real HTTP receiver on 127.0.0.1; the last test runs
the job with the worker's own ``run_job``, in this process."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from service import webhooks
from service.db.models import Job, utcnow
from service.db.session import make_engine, make_session_factory
from service.settings import Settings
from tests.service.test_api import Api, imagefolder_zip, make_settings, running_api, upload


class Receiver:
    """An HTTP server on 127.0.0.1 that records each POST and answers the next code of ``codes``
    (then 200)."""

    def __init__(self, codes: list[int] | None = None) -> None:
        self.codes = list(codes or [])
        self.received: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}  # names are case-insensitive
                receiver.received.append({"path": self.path, "headers": headers, "body": body})
                code = receiver.codes.pop(0) if receiver.codes else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/kt"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, n: int, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.received) < n:
            assert time.monotonic() < deadline, f"{len(self.received)} of {n} deliveries arrived"
            time.sleep(0.05)
        return self.received


def hook_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "webhook_http_hosts": ["127.0.0.1"],
        "webhook_allowed_networks": ["127.0.0.1/32"],
        "webhook_poll_interval_s": 0.1,
        "webhook_backoff_s": 0.2,
        "webhook_attempts": 3,
        "max_queued_jobs_per_tenant": 0,
    }
    values.update(overrides)
    return make_settings(data_dir, **values)


@pytest.fixture(scope="module")
def hapi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with running_api(hook_settings(tmp_path_factory.mktemp("hooks") / "data")) as running:
        yield running


@pytest.fixture(scope="module")
def tenant(hapi: Api) -> dict[str, Any]:
    key = hapi.key("acme")
    with hapi.client(key) as client:
        dataset = upload(client, imagefolder_zip({"cat": 3, "dog": 3})).json()
        test_set = upload(client, imagefolder_zip({"cat": 2, "dog": 2}), name="test").json()
    return {"key": key, "dataset": dataset, "test": test_set}


def job_body(dataset_id: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "dataset_id": dataset_id,
        "teacher": "timm:test_vit",
        "student": "timm:test_efficientnet",
        "image_size": 32,
        "steps": {"finetune_teacher": 2, "distill": 3, "finetune_student": 1},
        "recipe": {"teacher": {"full_finetune_steps": 0}, "distill": {"cache_mode": "online"}},
        "export_formats": ["safetensors"],
    }
    body.update(extra)
    return body


@contextmanager
def db_session(api: Api) -> Iterator[Any]:
    engine = make_engine(api.settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def finish(api: Api, job_id: str, **values: Any) -> None:
    """What a worker does at the end of a job (the dispatcher does not care who made it final)."""
    with db_session(api) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**{"finished_at": utcnow(), **values}))
        session.commit()


def wait_state(client: httpx.Client, job_id: str, states: set[str], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if (job["webhook"] or {}).get("state") in states:
            return job
        assert time.monotonic() < deadline, job["webhook"]
        time.sleep(0.05)


# --- where a webhook may go ----------------------------------------------------------------


def test_check_url_refuses_what_the_service_must_not_call(tmp_path: Path) -> None:
    strict = make_settings(tmp_path)
    assert webhooks.check_url("https://93.184.216.34/hook", strict) == "https://93.184.216.34/hook"
    refused = {
        "http://93.184.216.34/hook": "plain http",
        "ftp://example.com/x": "absolute https://",
        "/relative/hook": "absolute https://",
        "https://user:pw@93.184.216.34/": "user or password",
        "https://127.0.0.1/hook": "127.0.0.1, a private, loopback",
        "https://localhost:8443/hook": "loopback",
        "https://10.1.2.3/hook": "10.1.2.3",
        "https://169.254.169.254/latest/meta-data": "169.254.169.254",  # cloud metadata
        "https://[::1]/hook": "::1",
        "https://[::ffff:192.168.0.1]/hook": "192.168.0.1",
        "https://0.0.0.0/hook": "0.0.0.0",
        "https://93.184.216.34/hook#x": "fragment",
        "https://93.184.216.34:99999/": "not a URL",
    }
    for url, why in refused.items():
        with pytest.raises(webhooks.WebhookRefused, match=re.escape(why)):
            webhooks.check_url(url, strict)
    # an operator opens a network, and plain http to one host
    lenient = make_settings(
        tmp_path, webhook_allowed_networks=["10.0.0.0/8"], webhook_http_hosts=["10.1.2.3"]
    )
    assert webhooks.check_url("http://10.1.2.3:8080/hook", lenient)
    with pytest.raises(webhooks.WebhookRefused, match=re.escape("192.168.1.1")):
        webhooks.check_url("https://192.168.1.1/hook", lenient)
    with pytest.raises(ValueError, match="not a network"):
        make_settings(tmp_path, webhook_allowed_networks=["ten-dot-something"])


def test_signature_is_the_hmac_of_the_body() -> None:
    import hashlib
    import hmac

    body = b'{"job_id":"x"}'
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert webhooks.sign("s3cret", body) == expected
    assert webhooks.verify("s3cret", body, expected) and not webhooks.verify("other", body, expected)


def test_a_webhook_the_service_must_not_call_is_a_422_at_submit(hapi: Api, tenant: dict[str, Any]) -> None:
    with hapi.client(tenant["key"]) as client:
        for url, why in [
            ("http://example.com/hook", "plain http to 'example.com'; use https://"),
            ("https://10.0.0.7/hook", "10.0.0.7, a private, loopback or reserved address"),
            ("ssh://127.0.0.1/x", "absolute https:// URL"),
        ]:
            answer = client.post("/v1/jobs", json=job_body(tenant["dataset"]["id"], webhook_url=url))
            assert answer.status_code == 422, answer.text
            assert why in answer.json()["detail"] and "`webhook_url`" in answer.json()["detail"]
        assert client.get("/v1/jobs").json()["count"] == 0  # nothing was created


# --- delivery ------------------------------------------------------------------------------


def test_a_finished_job_posts_a_signed_notification_with_retries(hapi: Api, tenant: dict[str, Any]) -> None:
    with Receiver(codes=[500]) as receiver, hapi.client(tenant["key"]) as client:
        created = client.post("/v1/jobs", json=job_body(tenant["dataset"]["id"], webhook_url=receiver.url))
        assert created.status_code == 202, created.text
        job = created.json()
        secret = job["webhook_secret"]
        assert len(secret) == 64 and job["webhook"]["state"] == "waiting"
        shown = client.get(f"/v1/jobs/{job['id']}").json()
        assert shown["webhook_secret"] is None and shown["webhook"]["url"] == receiver.url
        assert secret not in client.get("/v1/jobs").text

        time.sleep(0.5)
        assert receiver.received == []  # not before the job ends
        finish(
            hapi,
            job["id"],
            status="failed",
            error=f"Disk full under {hapi.settings.data_dir}/jobs/x",
            metrics={"student_top1": 50.0, "test": {"top1": 50.0, "per_class": {"cat": 1.0}}},
        )
        first, second = receiver.wait_for(2)
        done = wait_state(client, job["id"], {"delivered"})

    assert (
        json.loads(first["body"])["delivery_id"] == json.loads(second["body"])["delivery_id"]
    )  # tried twice
    headers = second["headers"]
    assert headers["x-kt-signature"] == webhooks.sign(secret, second["body"])
    assert headers["x-kt-event"] == "job.finished" and headers["content-type"] == "application/json"
    sent = json.loads(second["body"])
    assert sent["job_id"] == job["id"] and sent["status"] == "failed" and sent["model_id"] is None
    assert sent["metrics"] == {"student_top1": 50.0, "test": {"top1": 50.0}}  # the summary
    assert sent["error"] == "Disk full under job:x"  # no server path, as in every answer
    assert headers["x-kt-delivery"] == sent["delivery_id"]

    attempts = done["webhook"]["attempts"]
    assert [a.get("response_status") for a in attempts] == [500, 200]
    assert "HTTP 500" in attempts[0]["error"] and done["webhook"]["delivered_at"]


def test_a_receiver_that_never_answers_ends_failed(hapi: Api, tenant: dict[str, Any]) -> None:
    with Receiver() as receiver:
        dead_url = receiver.url  # closed on exit: connections are refused from then on
    with hapi.client(tenant["key"]) as client:
        job = client.post("/v1/jobs", json=job_body(tenant["dataset"]["id"], webhook_url=dead_url)).json()
        client.post(f"/v1/jobs/{job['id']}/cancel").raise_for_status()  # a queued job: canceled at once
        done = wait_state(client, job["id"], {"failed"})
    attempts = done["webhook"]["attempts"]
    assert len(attempts) == hapi.settings.webhook_attempts
    assert all("refused" in a["error"].lower() or "error" in a["error"].lower() for a in attempts)
    assert done["webhook"]["delivered_at"] is None


def test_a_canceled_job_notifies_and_a_retried_one_notifies_again(hapi: Api, tenant: dict[str, Any]) -> None:
    with Receiver() as receiver, hapi.client(tenant["key"]) as client:
        job = client.post("/v1/jobs", json=job_body(tenant["dataset"]["id"], webhook_url=receiver.url)).json()
        client.post(f"/v1/jobs/{job['id']}/cancel").raise_for_status()
        (canceled,) = receiver.wait_for(1)
        assert json.loads(canceled["body"])["status"] == "canceled"
        wait_state(client, job["id"], {"delivered"})

        retried = client.post(f"/v1/jobs/{job['id']}/retry").json()
        assert retried["webhook"]["state"] == "waiting" and retried["webhook"]["attempts"] == []
        finish(hapi, job["id"], status="succeeded")
        _, again = receiver.wait_for(2)
        assert json.loads(again["body"])["status"] == "succeeded"
        assert again["headers"]["x-kt-signature"] == webhooks.sign(job["webhook_secret"], again["body"])


# --- the event stream ----------------------------------------------------------------------


def read_events(response: httpx.Response) -> Iterator[tuple[str, str]]:
    event, data = "message", ""
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
        elif line == "" and data:
            yield event, data
            event, data = "message", ""


@pytest.mark.timeout(120)
def test_events_stream_status_and_progress_until_the_job_ends(hapi: Api, tenant: dict[str, Any]) -> None:
    with hapi.client(tenant["key"]) as client:
        job = client.post("/v1/jobs", json=job_body(tenant["dataset"]["id"])).json()
        assert client.get("/v1/jobs/nope/events").status_code == 404
        with hapi.client(hapi.key("rival")) as rival:
            assert rival.get(f"/v1/jobs/{job['id']}/events").status_code == 404

        def work() -> None:  # a worker: running, progress, then succeeded
            time.sleep(0.4)
            finish(hapi, job["id"], status="running", stage="distill", progress=0.25, finished_at=None)
            time.sleep(0.4)
            finish(hapi, job["id"], progress=0.5, finished_at=None)
            time.sleep(0.4)
            finish(hapi, job["id"], status="succeeded", progress=1.0, stage="export")

        threading.Thread(target=work, daemon=True).start()
        seen: list[tuple[str, Any]] = []
        started = time.monotonic()
        with client.stream("GET", f"/v1/jobs/{job['id']}/events", params={"poll_s": 0.1}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for event, data in read_events(response):
                seen.append((event, json.loads(data)))
        assert time.monotonic() - started < 20
    jobs = [value for event, value in seen if event == "job"]
    assert [(j["status"], j["progress"]) for j in jobs] == [
        ("queued", 0.0),
        ("running", 0.25),
        ("running", 0.5),
        ("succeeded", 1.0),
    ]
    assert jobs[1]["stage"] == "distill" and jobs[0]["id"] == job["id"]
    assert seen[-1] == ("end", {"status": "succeeded"})


# --- with the worker -------------------------------------------------------------------------


def test_a_job_run_by_the_worker_notifies_with_its_model_and_metrics(
    hapi: Api, tenant: dict[str, Any]
) -> None:
    from worker import runner

    with Receiver() as receiver, hapi.client(tenant["key"]) as client:
        body = job_body(
            tenant["dataset"]["id"], test_dataset_id=tenant["test"]["id"], webhook_url=receiver.url
        )
        job = client.post("/v1/jobs", json=body).json()
        engine = make_engine(hapi.settings.database_url)
        try:
            status = runner.run_job(make_session_factory(engine), job["id"], hapi.settings, log_interval_s=0)
        finally:
            engine.dispose()
        assert status == "succeeded", client.get(f"/v1/jobs/{job['id']}").json()["error"]
        (delivery,) = receiver.wait_for(1)
        done = wait_state(client, job["id"], {"delivered"})
    sent = json.loads(delivery["body"])
    assert delivery["headers"]["x-kt-signature"] == webhooks.sign(job["webhook_secret"], delivery["body"])
    assert sent["status"] == "succeeded" and sent["model_id"] == done["model_id"] is not None
    assert sent["metrics"]["student_top1"] == done["metrics"]["student_top1"]
    assert done["webhook"]["attempts"][0]["response_status"] == 200


# --- the client and the `kt` command -----------------------------------------------------------


def test_the_client_follows_events_and_kt_submit_takes_a_webhook(
    hapi: Api, tenant: dict[str, Any], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from kt_client import Client
    from kt_client.cli import app

    with Receiver() as receiver:
        env = {"KT_API_URL": hapi.url, "KT_API_KEY": tenant["key"], "HOME": str(tmp_path)}
        res = CliRunner().invoke(
            app,
            ["jobs", "submit", tenant["dataset"]["id"], "--student", "timm:test_efficientnet",
             "--webhook-url", receiver.url],
            env=env,
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        job_id = res.output.split()[1]
        secret = res.output.strip().rsplit(" ", 1)[-1]
        assert "Webhook secret (shown once" in res.output and len(secret) == 64

        threading.Timer(0.5, finish, args=(hapi, job_id), kwargs={"status": "canceled"}).start()
        with Client(hapi.url, tenant["key"]) as client:
            seen = [job["status"] for job in client.jobs.events(job_id, poll_s=0.1)]
            assert seen == ["queued", "canceled"]
            (delivery,) = receiver.wait_for(1)
            assert webhooks.verify(secret, delivery["body"], delivery["headers"]["x-kt-signature"])
            assert client.jobs.get(job_id)["request"]["webhook_url"] == receiver.url

        res = CliRunner().invoke(
            app, ["jobs", "submit", tenant["dataset"]["id"], "--webhook-url", "http://example.com/x"], env=env
        )
        assert res.exit_code == 1 and "plain http" in res.output

        # `kt jobs events`: one JSON line per change, the exit code of `kt jobs watch`
        res = CliRunner().invoke(app, ["jobs", "events", job_id, "--poll", "0.1"], env=env)
        assert res.exit_code == 4, res.output  # canceled
        (line,) = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
        assert (line["id"], line["status"]) == (job_id, "canceled")


def test_delivery_and_the_job_field_on_postgresql(tmp_path: Path) -> None:
    from tests.service.conftest import fresh_postgres_database

    with (
        fresh_postgres_database() as url,
        running_api(hook_settings(tmp_path / "data", database_url=url)) as api,
        Receiver(codes=[503]) as receiver,
        api.client(api.key("acme")) as client,
    ):
        dataset = upload(client, imagefolder_zip({"cat": 2, "dog": 2})).json()
        job = client.post("/v1/jobs", json=job_body(dataset["id"], webhook_url=receiver.url)).json()
        client.post(f"/v1/jobs/{job['id']}/cancel").raise_for_status()
        done = wait_state(client, job["id"], {"delivered"})
        assert [a.get("response_status") for a in done["webhook"]["attempts"]] == [503, 200]
        last = receiver.received[-1]
        assert webhooks.verify(job["webhook_secret"], last["body"], last["headers"]["x-kt-signature"])
        assert json.loads(last["body"])["status"] == "canceled"
