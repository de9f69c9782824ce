"""`kt jobs watch` off a terminal (logs, CI, nohup; issue 13 item 4): a progress line when the
job's status or stage changes and every --progress-interval / KT_PROGRESS_INTERVAL seconds,
instead of a bar that a pipe never shows. The real ``Client`` is answered by an
``httpx.MockTransport`` playing a job through its stages."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from kt_client.cli import app

STATES: list[dict[str, Any]] = [
    {"status": "queued", "stage": None, "progress": 0.0, "eta_s": None},
    {"status": "running", "stage": "finetune_teacher", "progress": 0.1, "eta_s": None},
    {"status": "running", "stage": "distill", "progress": 0.4, "eta_s": 100.0},
    {"status": "running", "stage": "distill", "progress": 0.5, "eta_s": 80.0},
    {"status": "running", "stage": "distill", "progress": 0.6, "eta_s": 408.0},
    {"status": "succeeded", "stage": "export", "progress": 1.0, "eta_s": None, "model_id": "m1"},
]


@pytest.fixture
def job_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /v1/jobs/j1 answers the next of ``STATES`` (then the last) to a logged-in client."""
    import kt_client.client

    for name in [k for k in os.environ if k.startswith("KT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("KT_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("KT_API_URL", "http://kt.invalid:8000")
    monkeypatch.setenv("KT_API_KEY", "kt_abcdefgh_secret")
    polls = iter(STATES)

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/jobs/j1", request.url
        state = next(polls, STATES[-1])
        return httpx.Response(200, json={"id": "j1", "kind": "pipeline", **state})

    real = kt_client.client.Client
    monkeypatch.setattr(
        kt_client.client, "Client", functools.partial(real, transport=httpx.MockTransport(handler))
    )


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("job j1:")]


def test_watch_prints_a_line_when_the_status_or_stage_changes(job_server: None, monkeypatch) -> None:
    monkeypatch.setenv("KT_PROGRESS_INTERVAL", "3600")  # nothing periodic within this test
    res = CliRunner().invoke(app, ["jobs", "watch", "j1", "--poll", "0"])
    assert res.exit_code == 0, res.stderr
    assert _lines(res.stderr) == [
        "job j1: queued -, 0%",
        "job j1: running finetune_teacher, 10%",
        "job j1: running distill, 40%, ETA 1m40s",
        "job j1: succeeded export, 100%",
    ]
    assert "━" not in res.stderr  # no bar drawn into a pipe
    assert "Job j1 succeeded; model m1" in res.stdout


def test_watch_prints_periodic_lines(job_server: None) -> None:
    res = CliRunner().invoke(app, ["jobs", "watch", "j1", "--poll", "0", "--progress-interval", "0"])
    assert res.exit_code == 0, res.stderr
    lines = _lines(res.stderr)
    assert len(lines) == len(STATES)  # every poll, here
    assert lines[3:5] == [
        "job j1: running distill, 50%, ETA 1m20s",
        "job j1: running distill, 60%, ETA 6m48s",
    ]
