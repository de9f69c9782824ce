"""One segmentation job through a real ``kt serve`` (API, ingest processes, its own Celery worker;
SQLite) on tiny timm models (issue 15 item 4): segmentation datasets uploaded with
``task=segmentation``, a job on them trained, evaluated (mIoU) and exported, its model registered
with its card, and the ONNX file downloaded and run in onnxruntime; a gallery on a segmentation
job is refused with a clear 422."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.demo import free_port
from tests.e2e.test_tenant_data import create_key, start_serve, stop_serve, wait_job
from tests.service.test_segmentation_uploads import CLASSES, frame, png

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

H, W = 32, 48
TINY_SEGMENTATION_JOB: dict[str, Any] = {
    "teacher": "timm:test_efficientnet",
    "student": "timm:test_vit",
    "steps": {"finetune_teacher": 3, "distill": 3, "finetune_student": 3},
    "batch_size": {"finetune_teacher": 4, "distill": 4, "finetune_student": 4},
    "recipe": {"teacher": {"full_finetune_steps": 2}, "distill": {"cache_views": 2}},
    "export_formats": ["safetensors", "onnx"],
    "device": "cpu",
}


def segmentation_zip(n: int, seed: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            img, mask = frame(seed * 100 + i, h=H, w=W)
            zf.writestr(f"scenes/images/f{i:03d}.png", img)
            zf.writestr(f"scenes/masks/f{i:03d}.png", png(mask, "L"))
        zf.writestr("scenes/classes.json", json.dumps({"classes": CLASSES, "void_index": 255}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    root = tmp_path_factory.mktemp("seg-job")
    data_dir, log = root / "data", root / "serve.log"
    port = free_port()
    proc = start_serve(data_dir, port, log)
    try:
        yield f"http://127.0.0.1:{port}", create_key(data_dir, "seg"), log
    finally:
        stop_serve(proc)


def test_a_segmentation_job_trains_registers_and_serves_its_onnx_model(
    served: tuple[str, str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort
    from typer.testing import CliRunner

    from kt_client.cli import app

    url, key, log = served
    for name in [k for k in os.environ if k.startswith("KT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("KT_API_URL", url)
    monkeypatch.setenv("KT_API_KEY", key)
    monkeypatch.setenv("KT_CONFIG_DIR", str(tmp_path / "config"))
    # the training set from a folder, by `kt datasets upload --task segmentation` (zipped on the fly)
    with zipfile.ZipFile(io.BytesIO(segmentation_zip(6, 0))) as zf:
        zf.extractall(tmp_path / "train")
    runner = CliRunner()
    res = runner.invoke(
        app, ["datasets", "upload", str(tmp_path / "train" / "scenes"), "--task", "segmentation", "--json"]
    )
    assert res.exit_code == 0, (res.stdout, res.stderr)
    ids = {"train": json.loads(res.stdout)["id"]}
    listed = runner.invoke(app, ["datasets", "list"])
    assert listed.exit_code == 0 and "segmentation" in listed.stdout, listed.stdout
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        assert client.get(f"/v1/datasets/{ids['train']}").json()["num_images"] == 6
        for name, n, seed in (("test", 3, 1),):
            created = client.post(
                "/v1/datasets",
                files={"file": (f"{name}.zip", segmentation_zip(n, seed), "application/zip")},
                data={"name": name, "task": "segmentation"},
            )
            assert created.status_code == 201, created.text
            assert created.json()["task"] == "segmentation" and created.json()["num_images"] == n
            ids[name] = created.json()["id"]
        body = {**TINY_SEGMENTATION_JOB, "dataset_id": ids["train"], "test_dataset_id": ids["test"]}

        refused = client.post("/v1/jobs", json={**body, "gallery_id": "0" * 32})
        assert refused.status_code == 422, refused.text
        assert "crop-level retrieval for segmentation is not available yet" in refused.json()["detail"]

        submitted = client.post("/v1/jobs", json=body)
        assert submitted.status_code == 202, submitted.text
        job = wait_job(client, submitted.json()["id"], log)
        assert job["status"] == "succeeded", (
            job["error"],
            client.get(f"/v1/jobs/{job['id']}/logs").text[-3000:],
        )
        assert 0 <= job["metrics"]["test"]["miou"] <= 100
        assert set(job["metrics"]["test"]["per_class_iou"]) == set(CLASSES)

        model = client.get(f"/v1/models/{job['model_id']}")
        assert model.status_code == 200, model.text
        card = model.json()["card"]
        assert card["task"] == "segmentation" and card["classes"] == CLASSES and card["void_index"] == 255
        assert card["metrics"]["test"]["miou"] == job["metrics"]["test"]["miou"]
        assert set(model.json()["formats"]) == {"safetensors", "onnx"}

        onnx = client.get(f"/v1/models/{job['model_id']}/download", params={"format": "onnx"})
        assert onnx.status_code == 200, onnx.text
    session = ort.InferenceSession(onnx.content, providers=["CPUExecutionProvider"])
    h, w = card["preprocessing"]["input_size"]
    x = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    assert logits.shape == (1, len(CLASSES), h, w)
    assert np.isfinite(logits).all()
