"""A tenant's data through a real ``kt serve`` (SQLite, its own Celery worker) started with umask
022, as a host's default login shell has it, running real jobs on tiny timm models: an admin
builds a gallery from an uploaded dataset (so its sources lie in the data dir), a transfer set is
curated from it, a student trained on that set, and a job fails on a dataset whose files vanished.

- issue 14 item 10: no answer a tenant can read (the JSON API, job logs, manifests in every
  format, reports, model cards and files, the /ui pages) names the data dir or another server
  path, although the stored files and rows do;
- item 11: every file and folder under the data dir, those the API and the worker wrote and the
  databases, has no group or other permission bit;
- item 9: deleting the dataset takes the curation job's report and folder with it
  (``cascade=true``; refused and listed without), and retrying a job on the deleted transfer set
  answers 409.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.demo import free_port, write_zip
from service.ui.auth import COOKIE_NAME

REPO = Path(__file__).resolve().parents[2]
TINY_JOB: dict[str, Any] = {
    "teacher": "timm:test_vit",
    "student": "timm:test_efficientnet",
    "image_size": 32,
    "steps": {"finetune_teacher": 3, "distill": 6, "finetune_student": 3},
    "recipe": {"teacher": {"full_finetune_steps": 0}},
    "export_formats": ["safetensors", "onnx"],
    "device": "cpu",
}
JOB_TIMEOUT_S = 600

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]


def _umask_022() -> None:  # pragma: no cover - runs in the child between fork and exec
    os.umask(0o022)


def child_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KT_")}
    env.update(KT_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


@dataclass
class Served:
    url: str
    data_dir: Path
    root: Path
    key: str  # alice, an admin: builds the gallery, owns everything below
    ids: dict[str, str] = field(default_factory=dict)
    raw_error: str = ""  # the failed job's error as stored in the database

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60)


def wait_job(client: httpx.Client, job_id: str, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}")
        if job.status_code == 200 and job.json()["status"] in ("succeeded", "failed", "canceled"):
            return dict(job.json())
        time.sleep(1)
    pytest.fail(f"job {job_id} did not finish in {JOB_TIMEOUT_S} s\n{log.read_text()[-4000:]}")


def start_serve(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``kt serve`` under umask 022; returns once it printed "ready"."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kt_client.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)],
            cwd=REPO, env=child_env(data_dir), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_umask_022,
        )  # fmt: skip
    deadline = time.monotonic() + 180
    while "ready\n" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_serve(proc)
            pytest.fail(f"kt serve did not get ready:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    return proc


def stop_serve(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def create_key(data_dir: Path, tenant: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "service.admin", "create-key", "--tenant", tenant, "--admin"],
        env=child_env(data_dir), cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
        preexec_fn=_umask_022,
    )  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


def upload(client: httpx.Client, path: Path, name: str) -> str:
    with open(path, "rb") as f:
        created = client.post(
            "/v1/datasets", files={"file": (path.name, f, "application/zip")}, data={"name": name}
        )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("tenant-data")
    data_dir, log = root / "data", root / "serve.log"
    port = free_port()
    proc = start_serve(data_dir, port, log)
    try:
        world = Served(f"http://127.0.0.1:{port}", data_dir, root, create_key(data_dir, "alice"))
        zips = {
            "train": write_zip(root / "zips" / "train.zip", per_class=6, seed=0, size=32),
            "test": write_zip(root / "zips" / "test.zip", per_class=3, seed=1, size=32),
            "pool": write_zip(root / "zips" / "pool.zip", per_class=8, seed=2, size=32),
            "doomed": write_zip(root / "zips" / "doomed.zip", per_class=3, seed=3, size=32),
        }
        with world.client() as client:
            ids = {name: upload(client, path, name) for name, path in zips.items()}
            build = client.post(
                "/v1/admin/galleries",
                json={"name": "pool", "sources": [{"dataset_id": ids["pool"]}], "encoder": "timm:test_efficientnet",
                      "image_size": 32, "index_kind": "flat", "device": "cpu"},
            )  # fmt: skip
            assert build.status_code == 202, build.text
            built = wait_job(client, build.json()["id"], log)
            assert built["status"] == "succeeded", built["error"]
            ids["gallery_job"], ids["gallery"] = built["id"], built["metrics"]["gallery_id"]

            ts = client.post("/v1/transfer-sets", json={"dataset_id": ids["train"], "gallery_id": ids["gallery"],
                                                        "size": 24, "device": "cpu"})  # fmt: skip
            assert ts.status_code == 202, ts.text
            curated = wait_job(client, ts.json()["job_id"], log)
            assert curated["status"] == "succeeded", curated["error"]
            ids["transfer_set"], ids["curate_job"] = ts.json()["id"], curated["id"]

            body = {**TINY_JOB, "dataset_id": ids["train"], "test_dataset_id": ids["test"]}
            trained = client.post("/v1/jobs", json={**body, "transfer_set_id": ids["transfer_set"]})
            assert trained.status_code == 202, trained.text
            job = wait_job(client, trained.json()["id"], log)
            assert job["status"] == "succeeded", job["error"]
            ids["job"], ids["model"] = job["id"], job["model_id"]

            # a job whose dataset's files vanished on the server: the worker fails it, naming the folder
            doomed = data_dir / "tenants"
            shutil.rmtree(next(doomed.glob(f"*/datasets/{ids['doomed']}")) / "images")
            failing = client.post("/v1/jobs", json={**TINY_JOB, "dataset_id": ids["doomed"]})
            assert failing.status_code == 202, failing.text
            failed = wait_job(client, failing.json()["id"], log)
            assert failed["status"] == "failed"
            ids["failed_job"] = failed["id"]
            world.raw_error = _stored_error(data_dir, failed["id"])

            # a job on the transfer set, canceled before it trained (retried after the delete)
            on_set = client.post("/v1/jobs", json={**body, "transfer_set_id": ids["transfer_set"]})
            client.post(f"/v1/jobs/{on_set.json()['id']}/cancel")
            assert wait_job(client, on_set.json()["id"], log)["status"] == "canceled"
            ids["canceled_job"] = on_set.json()["id"]
        world.ids = ids
        yield world
    finally:
        stop_serve(proc)


def _stored_error(data_dir: Path, job_id: str) -> str:
    import sqlite3

    with sqlite3.connect(f"file:{data_dir / 'kt.db'}?mode=ro", uri=True) as db:
        return str(db.execute("SELECT error FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])


def ui_login(served: Served, browser: httpx.Client) -> None:
    login = browser.post("/ui/login", data={"api_key": served.key}, follow_redirects=False)
    assert login.status_code == 303, login.text
    browser.headers["Cookie"] = f"{COOKIE_NAME}={login.cookies[COOKIE_NAME]}"


def readable_text(response: httpx.Response) -> str:
    """What the tenant reads in ``response``: a Parquet manifest decoded (its pages are
    compressed), anything else as bytes read as text."""
    if response.headers.get("content-type", "").startswith("application/vnd.apache.parquet"):
        import pyarrow.parquet as pq

        return json.dumps(pq.read_table(io.BytesIO(response.content)).to_pylist(), default=str)
    return response.content.decode("utf-8", errors="replace")


def test_nothing_a_tenant_reads_names_a_server_path(served: Served) -> None:
    ids, data_dir = served.ids, str(served.data_dir)
    # the stored data does name the server's paths (what the answers must not pass on)
    curate = served.data_dir / "jobs" / ids["curate_job"] / "run" / "curate"
    assert data_dir in (curate / "manifest.jsonl").read_text()
    assert data_dir in (curate / "report.html").read_text()
    assert data_dir in served.raw_error, served.raw_error
    assert data_dir in (served.data_dir / "jobs" / ids["job"] / "job.log").read_text()

    jobs = [ids[k] for k in ("gallery_job", "curate_job", "job", "failed_job", "canceled_job")]
    ts = f"/v1/transfer-sets/{ids['transfer_set']}"
    paths = [
        "/v1/datasets", *(f"/v1/datasets/{ids[k]}" for k in ("train", "test", "pool", "doomed")),
        "/v1/jobs", *(f"/v1/jobs/{j}" for j in jobs), *(f"/v1/jobs/{j}/logs" for j in jobs),
        "/v1/transfer-sets", ts, f"{ts}/report",
        *(f"{ts}/manifest?format={fmt}" for fmt in ("jsonl", "csv", "parquet")),
        "/v1/models", f"/v1/models/{ids['model']}",
        *(f"/v1/models/{ids['model']}/download?format={fmt}" for fmt in ("safetensors", "onnx")),
        "/v1/galleries", "/v1/registered-models", "/v1/jobs/no-such-job",
    ]  # fmt: skip
    ui = [
        "/ui/jobs", "/ui/jobs/rows", *(f"/ui/jobs/{j}" for j in jobs), f"/ui/jobs/{ids['failed_job']}/status.json",
        f"/ui/jobs/{ids['curate_job']}/transfer-set", f"/ui/jobs/{ids['curate_job']}/transfer-set/report",
        "/ui/transfer-sets", f"/ui/transfer-sets/{ids['transfer_set']}",
        f"/ui/transfer-sets/{ids['transfer_set']}/report", "/ui/models", f"/ui/models/{ids['model']}",
        "/ui/datasets", *(f"/ui/datasets/{ids[k]}" for k in ("train", "pool")),
    ]  # fmt: skip
    forbidden = {data_dir, str(served.root), str(REPO), sys.prefix}
    answers: dict[str, httpx.Response] = {}
    with served.client() as client:
        for path in paths:
            answers[path] = client.get(path)
    with httpx.Client(base_url=served.url, timeout=60) as browser:
        ui_login(served, browser)
        for path in ui:
            answers[path] = browser.get(path)
    for path, response in answers.items():
        assert response.status_code == (404 if "no-such" in path else 200), (path, response.text[:500])
        text = readable_text(response)
        leaked = [f for f in forbidden if f in text]
        assert not leaked, f"{path} names {leaked}: ...{text[max(0, text.find(leaked[0]) - 200) :][:400]}"

    # what they say instead: ids and relative names
    failed = answers[f"/v1/jobs/{ids['failed_job']}"].json()["error"]
    assert f"dataset:{ids['doomed']}" in failed, failed
    rows = [json.loads(line) for line in answers[f"{ts}/manifest?format=jsonl"].text.splitlines()]
    assert rows and {r["source"] for r in rows} == {f"dataset:{ids['pool']}"}, rows[:2]
    summary = answers[ts].json()["summary"]
    assert summary["gallery"]["path"] == "gallery:pool", summary["gallery"]
    lineage = answers[f"/v1/models/{ids['model']}"].json()["card"]["lineage"]
    assert lineage["transfer_set"]["path"].startswith(f"job:{ids['curate_job']}/run/curate/"), lineage


def test_the_data_dir_is_private(served: Served) -> None:
    root = served.data_dir
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    seen: dict[str, int] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode):
                seen[str(path.relative_to(root))] = stat.S_IMODE(mode)
    # what the API, the worker and the launcher wrote is all there
    for expected in ("kt.db", "broker.db", "logs/worker-0.log", f"jobs/{served.ids['job']}/job.log"):
        assert expected in seen, sorted(seen)[:50]
    assert any(p.endswith(".png") for p in seen) and any(p.endswith("model.onnx") for p in seen)
    shared = {path: oct(mode) for path, mode in seen.items() if mode & 0o077}
    assert not shared, shared


def test_deleting_the_dataset_takes_its_transfer_set_reports(served: Served) -> None:
    ids, report = served.ids, f"/ui/jobs/{served.ids['curate_job']}/transfer-set/report"
    with served.client() as client, httpx.Client(base_url=served.url, timeout=60) as browser:
        ui_login(served, browser)
        refused = client.delete(f"/v1/datasets/{ids['train']}")
        assert refused.status_code == 409, refused.text
        assert refused.json()["dependents"]["transfer_sets"] == [ids["transfer_set"]]
        assert browser.get(report).status_code == 200

        assert client.delete(f"/v1/datasets/{ids['train']}", params={"cascade": "true"}).status_code == 204
        assert browser.get(report).status_code == 404
        assert client.get(f"/v1/transfer-sets/{ids['transfer_set']}/report").status_code == 404
        assert not (served.data_dir / "jobs" / ids["curate_job"]).exists()
        retried = client.post(f"/v1/jobs/{ids['canceled_job']}/retry")
        assert retried.status_code == 409, retried.text
        # the model trained on it stays
        assert client.get(f"/v1/models/{ids['model']}/download").status_code == 200
