"""Jobs on segmentation datasets through a real uvicorn server (SQLite) and a real Redis broker,
no worker: the training config the service builds (``task: segmentation``, the dataset folders,
no curate stage) and the requests it refuses (a gallery, a transfer set, image sizes, a test
dataset of the other task or other classes; curating a transfer set for a segmentation dataset).
``tests/e2e/test_segmentation_job.py`` runs such a job to a downloaded model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from kt_train.config import parse_config
from service.db.models import Job
from service.db.session import make_engine, make_session_factory
from tests.service.test_api import Api, imagefolder_zip, make_settings, make_zip, running_api, upload
from tests.service.test_jobs_api import REDIS_URL, broker  # noqa: F401 - the fixture
from tests.service.test_segmentation_uploads import seg_files

TINY = {"teacher": "timm:test_efficientnet", "student": "timm:test_vit", "device": "cpu"}


@pytest.fixture(scope="module")
def sapi(tmp_path_factory: pytest.TempPathFactory, broker: redis.Redis) -> Iterator[Api]:  # noqa: F811
    settings = make_settings(
        tmp_path_factory.mktemp("seg-jobs") / "data",
        broker_url=REDIS_URL,
        result_backend=REDIS_URL,
        max_queued_jobs_per_tenant=0,
    )
    with running_api(settings) as running:
        yield running


@pytest.fixture(scope="module")
def ids(sapi: Api) -> dict[str, Any]:
    key = sapi.key("seg-jobs")
    with sapi.client(key) as client:

        def seg(files: dict[str, bytes], **fields: str) -> str:
            form = {"task": "segmentation", **fields}
            r = client.post(
                "/v1/datasets", files={"file": ("s.zip", make_zip(files), "application/zip")}, data=form
            )
            assert r.status_code == 201, r.text
            return str(r.json()["id"])

        other_classes = {k: v for k, v in seg_files(2).items() if not k.endswith("classes.json")}
        return {
            "key": key,
            "train": seg(seg_files(3)),
            "test": seg(seg_files(2)),
            "other_classes": seg(other_classes, classes="a,b,c", void_index="255"),
            "images": upload(client, imagefolder_zip({"cat": 2, "dog": 2})).json()["id"],
        }


@pytest.fixture(scope="module")
def client(sapi: Api, ids: dict[str, Any]) -> Iterator[httpx.Client]:
    with sapi.client(ids["key"]) as c:
        yield c


def stored_config(api: Api, job_id: str) -> dict[str, Any]:
    engine = make_engine(api.settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            job = session.get(Job, job_id)
            assert job is not None
            return dict(job.params["config"])
    finally:
        engine.dispose()


def test_a_segmentation_job_trains_on_the_dataset_folders_without_curation(
    sapi: Api, client: httpx.Client, ids: dict[str, Any]
) -> None:
    r = client.post("/v1/jobs", json={**TINY, "dataset_id": ids["train"], "test_dataset_id": ids["test"]})
    assert r.status_code == 202, r.text
    config = stored_config(sapi, r.json()["id"])
    assert config["task"] == "segmentation"
    assert config["stages"] == ["finetune_teacher", "distill", "finetune_student", "export", "evaluate"]
    assert "curate" not in config
    train = Path(config["data"]["train"]["path"])
    assert train.name == ids["train"] and (train / "classes.json").is_file() and (train / "masks").is_dir()
    assert config["data"]["transfer"]["path"] == str(train / "images")
    assert Path(config["data"]["test"]["path"]).name == ids["test"]
    assert config["export"]["formats"] == ["safetensors", "onnx"]  # torchscript: not for segmentation
    cfg = parse_config({**config, "out_dir": "/tmp/unused"})  # what the worker parses
    assert cfg.task == "segmentation"
    without_test = client.post("/v1/jobs", json={**TINY, "dataset_id": ids["train"]})
    assert without_test.status_code == 202, without_test.text
    assert "evaluate" not in stored_config(sapi, without_test.json()["id"])["stages"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"gallery_id": "0" * 32}, "crop-level retrieval for segmentation is not available yet"),
        ({"transfer_set_id": "0" * 32}, "remove `transfer_set_id`"),
        ({"image_size": 64}, "`image_size` don't apply to a segmentation job"),
        ({"export_formats": ["torchscript"]}, "exported as safetensors or onnx"),
        ({"test_dataset_id": "images"}, "is a classification dataset"),
        ({"test_dataset_id": "other_classes"}, "must mean the same classes"),
    ],
)
def test_segmentation_jobs_refuse_what_does_not_apply(
    client: httpx.Client, ids: dict[str, Any], extra: dict[str, Any], needle: str
) -> None:
    if "test_dataset_id" in extra:
        extra = {"test_dataset_id": ids[extra["test_dataset_id"]]}
    r = client.post("/v1/jobs", json={**TINY, "dataset_id": ids["train"], **extra})
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"], r.json()["detail"]


def test_classification_jobs_refuse_a_segmentation_test_dataset(
    client: httpx.Client, ids: dict[str, Any]
) -> None:
    r = client.post("/v1/jobs", json={**TINY, "dataset_id": ids["images"], "test_dataset_id": ids["test"]})
    assert r.status_code == 422, r.text
    assert "is a segmentation dataset and the training dataset a classification one" in r.json()["detail"]


def test_no_transfer_set_is_curated_for_a_segmentation_dataset(
    client: httpx.Client, ids: dict[str, Any]
) -> None:
    r = client.post("/v1/transfer-sets", json={"dataset_id": ids["train"], "gallery_id": "0" * 32})
    assert r.status_code == 422, r.text
    assert "crop-level retrieval for segmentation is not available yet" in json.loads(r.text)["detail"]
