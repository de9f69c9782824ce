"""Uploads are validated in the API's ingest processes (service.ingest), at a lower CPU priority
than the API, with the same answers as in the API process, and a killed ingest process costs the
next upload nothing."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from service import ingest
from tests.service.test_api import imagefolder_zip, make_settings, make_zip, running_api, upload


def _pool_pids() -> list[int]:
    assert ingest._pool is not None
    return list(ingest._pool._processes)  # type: ignore[attr-defined]


def test_uploads_run_in_niced_ingest_processes_with_the_same_answers(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    assert settings.ingest_processes == 2 and settings.ingest_nice == 19
    answers = {}
    for where, s in (("pool", settings), ("api", make_settings(tmp_path / "data0", ingest_processes=0))):
        with (
            running_api(s) as api,
            httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {api.key('acme')}"}) as c,
        ):
            ok = upload(c, imagefolder_zip({"cat": 3, "dog": 2}))
            bad = upload(c, make_zip({"cat/a.png": b"not an image", "dog/b.png": b"x"}))
            answers[where] = (
                ok.status_code,
                ok.json().get("num_images"),
                bad.status_code,
                bad.json()["detail"],
            )
            if where == "pool":
                pids = _pool_pids()
                assert len(pids) == 2 and os.getpid() not in pids
                assert all(os.getpriority(os.PRIO_PROCESS, pid) == 19 for pid in pids)
    assert answers["pool"] == answers["api"]
    assert answers["pool"][0] == 201 and answers["pool"][2] == 422 and "a.png" in answers["pool"][3]


def test_a_killed_ingest_process_costs_the_next_upload_nothing(tmp_path: Path) -> None:
    with (
        running_api(make_settings(tmp_path / "data")) as api,
        httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {api.key('acme')}"}, timeout=60) as c,
    ):
        assert upload(c, imagefolder_zip({"cat": 2, "dog": 2})).status_code == 201
        for pid in _pool_pids():
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        again = upload(c, imagefolder_zip({"cat": 2, "dog": 2}))
        assert again.status_code == 201, again.text
        assert c.get("/readyz").status_code == 200
