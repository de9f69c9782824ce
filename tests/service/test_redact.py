"""``service.redact``: server paths rewritten into ids and relative names (issue 14 item 10), and
``service.storage.secure_data_dir``: the data dir private at startup (item 11). The rewriting as
tenants see it, through a real server and worker, is ``tests/e2e/test_tenant_data.py``."""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.redact import PROJECT_ROOT, Redactor, public_copy
from service.settings import Settings
from service.storage import secure_data_dir


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    data, roots, gallery = tmp_path / "data", tmp_path / "roots", tmp_path / "galleries" / "open"
    for folder in (data, roots, gallery):
        folder.mkdir(parents=True)
    sources = [str(tmp_path / "unlabeled"), str(data / "tenants" / "t1" / "datasets" / "d1" / "images")]
    (gallery / "gallery.json").write_text(json.dumps({"sources": [{"path": s} for s in sources]}))
    return {"root": tmp_path, "data": data, "roots": roots, "gallery": gallery}


@pytest.fixture
def redactor(places: dict[str, Path]) -> Redactor:
    settings = Settings(data_dir=places["data"], gallery_roots=[places["roots"]])  # type: ignore[call-arg]
    return Redactor(settings, lambda: [("open set", str(places["gallery"]))])


def test_server_paths_become_ids_and_relative_names(redactor: Redactor, places: dict[str, Path]) -> None:
    d = places["data"]
    cases = {
        f"{d}/tenants/t1/datasets/d1/images/cat/1.png": "dataset:d1/cat/1.png",
        f"{d}/tenants/t1/datasets/d1": "dataset:d1",
        f"{d}/jobs/j1/run/curate/manifest.jsonl": "job:j1/run/curate/manifest.jsonl",
        f"timm:resnet18@{d}/registry/proxy/model.safetensors": "timm:resnet18@registered:proxy",
        f"{d}/tmp/upload-1.zip": "KT_DATA_DIR/tmp/upload-1.zip",
        f"free space in KT_DATA_DIR ({d}), then retry": "free space in KT_DATA_DIR, then retry",
        f"{places['gallery']}/shards": "gallery:open%20set/shards",
        f"{places['root']}/unlabeled/dog.png": "gallery:open%20set/sources/0/dog.png",
        f"{places['roots']}/web/a.jpg": "gallery-root:roots/web/a.jpg",
        f'File "{PROJECT_ROOT}/kt_train/pipeline.py", line 3': 'File "./kt_train/pipeline.py", line 3',
        f"{d}base/x": None,  # not the data dir: a sibling that starts with its name
    }
    for text, expected in cases.items():
        assert redactor.known(text) == (text if expected is None else expected), text
    assert redactor.free(f"{sys.prefix}/lib/x.py").startswith(("site-packages", "python"))


def test_free_text_keeps_routes_and_urls_and_hides_other_paths(redactor: Redactor) -> None:
    text = "retry it (POST /v1/jobs/abc/retry), see http://host:8000/ui/jobs/abc; read /opt/cache/hf/w.bin, 3/4 img/s"
    assert redactor.free(text) == (
        "retry it (POST /v1/jobs/abc/retry), see http://host:8000/ui/jobs/abc; read …/w.bin, 3/4 img/s"
    )
    # a tenant's own names keep their slashes; the server's messages do not
    assert redactor.value({"name": "/etc/passwd", "error": "denied: /etc/passwd"}) == {
        "name": "/etc/passwd",
        "error": "denied: …/passwd",
    }
    assert not redactor.might_name_paths('{"error":null,"detail":"POST /v1/jobs/x/retry"}')


def test_html_keeps_links_and_embedded_images(redactor: Redactor, places: dict[str, Path]) -> None:
    page = (
        '<a href="/ui/jobs/j1">job</a><img src="data:image/jpeg;base64,/9j/4AAQ/Sk+/Rg">'
        f"<td>{places['data']}/jobs/j1/run/curate</td>"
    )
    assert redactor.known(page, html=True) == (
        '<a href="/ui/jobs/j1">job</a><img src="data:image/jpeg;base64,/9j/4AAQ/Sk+/Rg"><td>job:j1/run/curate</td>'
    )


def test_public_copies_of_manifests_and_reports(redactor: Redactor, places: dict[str, Path]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = f"{places['data']}/tenants/t1/datasets/d1/images"
    folder = places["root"] / "curate"
    folder.mkdir()
    row = {"id": 1, "source": source, "key": "cat/1.png", "score": 0.5}
    (folder / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    (folder / "manifest.csv").write_text(f'"id","source","key"\n1,"{source}","cat/1.png"\n')
    pq.write_table(pa.Table.from_pylist([row, {**row, "id": 2}]), folder / "manifest.parquet")
    (folder / "report.html").write_text(f'<img src="data:image/png;base64,/9j/x"><td>source: {source}</td>')

    copies = {name: public_copy(folder / name, redactor) for name in os.listdir(folder)}
    assert json.loads(copies["manifest.jsonl"].read_text())["source"] == "dataset:d1"
    assert copies["manifest.csv"].read_text().splitlines()[1] == '1,"dataset:d1","cat/1.png"'
    assert pq.read_table(copies["manifest.parquet"]).column("source").to_pylist() == ["dataset:d1"] * 2
    assert (
        copies["report.html"].read_text()
        == '<img src="data:image/png;base64,/9j/x"><td>source: dataset:d1</td>'
    )
    assert source in (folder / "manifest.jsonl").read_text()  # the worker's file is left as it was

    # made once; an original written again (a retried stage) gets a new copy
    assert public_copy(folder / "manifest.jsonl", redactor) == copies["manifest.jsonl"]
    (folder / "manifest.jsonl").write_text(json.dumps({**row, "key": "dog/2.png"}) + "\n")
    os.utime(folder / "manifest.jsonl", ns=(2**62, 2**62))
    assert "dog/2.png" in public_copy(folder / "manifest.jsonl", redactor).read_text()


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The process umask 022 for the test (as a login shell has it), restored afterwards."""
    saved = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(saved)


def test_secure_data_dir_makes_what_a_launcher_left_private(tmp_path: Path, umask_022: None) -> None:
    data = tmp_path / "data"
    (data / "logs").mkdir(parents=True)
    (data / "kt.db").write_bytes(b"")
    (data / "logs" / "worker-0.log").write_bytes(b"")
    assert stat.S_IMODE((data / "kt.db").stat().st_mode) == 0o644

    secure_data_dir(data)
    assert os.umask(0o077) == 0o077  # set for what the process writes next
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in (data, data / "logs", data / "kt.db")} == {
        "data": 0o700,
        "logs": 0o700,
        "kt.db": 0o600,
    }
    assert stat.S_IMODE((data / "logs" / "worker-0.log").stat().st_mode) == 0o600


def test_the_api_makes_its_data_dir_private_at_startup(tmp_path: Path, umask_022: None) -> None:
    """``python -m service.serve`` and uvicorn create the database before the app starts (with
    the launcher's umask): the app's startup makes it private, and what it writes next is too."""
    data = tmp_path / "data"
    settings = Settings(data_dir=data)  # type: ignore[call-arg]
    from service.db.session import init_db

    data.mkdir()
    init_db(settings.database_url)
    assert stat.S_IMODE((data / "kt.db").stat().st_mode) == 0o644
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [data, *data.iterdir()]}
    assert modes["data"] == 0o700 and modes["kt.db"] == 0o600, modes
    assert not {name: oct(m) for name, m in modes.items() if m & 0o077}


def test_api_answers_name_no_server_path(tmp_path: Path) -> None:
    """A job's error, log and page as the API answers them (the worker wrote the server's paths)."""
    from service.admin import create_tenant_key
    from service.db.models import Job, Tenant

    data = tmp_path / "data"
    settings = Settings(data_dir=data)  # type: ignore[call-arg]
    images = f"{data}/tenants/t1/datasets/d1/images"
    trace = f'Traceback:\n  File "{PROJECT_ROOT}/kt_train/data.py", line 9\nDatasetError: {images} is empty\n'
    with TestClient(create_app(settings)) as client:
        factory = client.app.state.session_factory  # type: ignore[attr-defined]
        with factory() as session:
            key = create_tenant_key(session, "acme")
            tenant = session.query(Tenant).filter_by(name="acme").one()
            job = Job(tenant_id=tenant.id, kind="pipeline", status="failed", error=f"{images} is empty")
            job.metrics = {"warnings": [f"onnx left out: {data}/jobs/x/run/export/.tmp failed"]}
            session.add(job)
            session.commit()
            job_id = job.id
        (data / "jobs" / job_id).mkdir(parents=True)
        (data / "jobs" / job_id / "job.log").write_text(trace)
        client.headers["Authorization"] = f"Bearer {key}"
        shown = client.get(f"/v1/jobs/{job_id}").json()
        assert shown["error"] == "dataset:d1 is empty"
        assert shown["metrics"]["warnings"] == ["onnx left out: job:x/run/export/.tmp failed"]
        assert client.get("/v1/jobs").json()["data"][0]["error"] == "dataset:d1 is empty"
        log = client.get(f"/v1/jobs/{job_id}/logs")
        assert (
            log.text == 'Traceback:\n  File "./kt_train/data.py", line 9\nDatasetError: dataset:d1 is empty\n'
        )
        assert int(log.headers["content-length"]) == len(log.content)
