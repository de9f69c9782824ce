"""One real server for the client tests: ``python -m service.serve`` (the embedded default: SQLite,
SQLite broker, one Celery worker) on a free 127.0.0.1 port, two tenants' keys, small zips, and one
tiny training job submitted at the start (timm test models, a few steps) that later tests wait for."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from service.demo import embedded_server, free_port, service_env, write_zip

REPO = Path(__file__).resolve().parents[2]
TINY_JOB: dict[str, Any] = {
    "teacher": "timm:test_vit",
    "student": "timm:test_efficientnet",
    "image_size": 32,
    "steps": {"finetune_teacher": 3, "distill": 6, "finetune_student": 3},
    "recipe": {"teacher": {"full_finetune_steps": 0}},  # linear probe only: a few steps in all
    "export_formats": ["safetensors", "onnx"],
    "device": "cpu",
}


@dataclass(frozen=True)
class Server:
    url: str
    key: str  # tenant "alice"
    other_key: str  # tenant "bob"
    data_dir: Path


def create_key(data_dir: Path, tenant: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "service.admin", "create-key", "--tenant", tenant],
        env=service_env(data_dir), cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("kt-server") / "data"
    with embedded_server(data_dir, free_port(), timeout=120) as url:
        yield Server(url, create_key(data_dir, "alice"), create_key(data_dir, "bob"), data_dir)


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``train.zip`` (4 classes x 6), ``test.zip`` (4 x 3) and ``train_dir`` (train.zip unpacked)."""
    import zipfile

    root = tmp_path_factory.mktemp("kt-data")
    train = write_zip(root / "train.zip", per_class=6, seed=0, size=32)
    test = write_zip(root / "test.zip", per_class=3, seed=1, size=32)
    with zipfile.ZipFile(train) as zf:
        zf.extractall(root / "train_dir")
    return {"train": train, "test": test, "train_dir": root / "train_dir"}


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[Any]:
    from kt_client import Client

    with Client(server.url, server.key) as kt:
        yield kt


@pytest.fixture(scope="session")
def datasets(client: Any, data: dict[str, Path]) -> dict[str, dict[str, Any]]:
    return {
        "train": client.datasets.upload(data["train"], name="train"),
        "test": client.datasets.upload(data["test"], name="test"),
    }


@pytest.fixture(scope="session")
def submitted_job(client: Any, datasets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The tiny job, queued (it trains while other tests run)."""
    body = {**TINY_JOB, "dataset_id": datasets["train"]["id"], "test_dataset_id": datasets["test"]["id"]}
    return dict(client.jobs.submit(body))


@pytest.fixture(scope="session")
def finished_job(client: Any, submitted_job: dict[str, Any]) -> dict[str, Any]:
    job = client.jobs.wait(submitted_job["id"], poll_s=0.5, timeout=300)
    assert job["status"] == "succeeded", job.get("error")
    return dict(job)


@pytest.fixture
def kt_env(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of a `kt` command: this server, alice's key, a private config dir."""
    env = {"KT_API_URL": server.url, "KT_API_KEY": server.key, "KT_CONFIG_DIR": str(tmp_path / "config")}
    for name in [k for k in os.environ if k.startswith("KT_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env
