"""Jobs, transfer sets, galleries and models through a real uvicorn server (SQLite) with a real
Redis broker: submitted jobs land in the ``cpu`` queue; no worker runs here."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import update

from service.db.models import Gallery, Job, Model, utcnow
from service.db.session import make_engine, make_session_factory
from tests.service.test_api import Api, imagefolder_zip, make_settings, running_api, upload

REDIS_URL = os.environ.get("KT_TEST_SERVICE_REDIS_URL", "redis://127.0.0.1:6379/12")


@pytest.fixture(scope="module")
def broker() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as err:
        pytest.fail(
            f"Redis is needed at {REDIS_URL} ({err}); start it, e.g. `sudo service redis-server start`."
        )
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def japi(tmp_path_factory: pytest.TempPathFactory, broker: redis.Redis) -> Iterator[Api]:
    # no worker runs, so every job submitted here stays queued: more than a tenant's default quota
    settings = make_settings(
        tmp_path_factory.mktemp("jobs") / "data",
        broker_url=REDIS_URL,
        result_backend=REDIS_URL,
        max_queued_jobs_per_tenant=0,
    )
    with running_api(settings) as running:
        yield running


def db_write(api: Api, *rows: Any, statement: Any = None) -> None:
    engine = make_engine(api.settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            session.add_all(rows)
            if statement is not None:
                session.execute(statement)
            session.commit()
    finally:
        engine.dispose()


def queued_job_ids(broker: redis.Redis, queue: str = "cpu") -> list[str]:
    """The job ids of the ``kt.run_job`` messages waiting in ``queue``."""
    ids = []
    for raw in broker.lrange(queue, 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == "kt.run_job"
        ids.append(message["headers"]["argsrepr"].strip("[]'\""))
    return ids


@pytest.fixture(scope="module")
def tenant(japi: Api) -> dict[str, Any]:
    """A tenant with a key, an uploaded dataset, a gallery; and a second tenant."""
    key = japi.key("acme")
    with japi.client(key) as client:
        dataset = upload(client, imagefolder_zip({"cat": 2, "dog": 2})).json()
        test_set = upload(client, imagefolder_zip({"cat": 1, "dog": 1}), name="test").json()
    gallery = Gallery(
        name="tiny", path="/galleries/tiny", size=10, encoder="timm:x", index_kind="flat", dim=8
    )
    db_write(japi, gallery)
    return {
        "key": key,
        "dataset": dataset,
        "test": test_set,
        "gallery_id": gallery.id,
        "other": japi.key("rival"),
    }


def job_body(dataset_id: str, **extra: Any) -> dict[str, Any]:
    body = {
        "dataset_id": dataset_id,
        "teacher": "timm:test_vit",
        "student": "timm:resnet10t",
        "steps": {"finetune_teacher": 2, "distill": 3, "finetune_student": 1},
        "export_formats": ["safetensors", "onnx"],
    }
    body.update(extra)
    return body


def test_submit_job_queues_it_and_sends_a_message(
    japi: Api, tenant: dict[str, Any], broker: redis.Redis
) -> None:
    with japi.client(tenant["key"]) as client:
        created = client.post(
            "/v1/jobs",
            json=job_body(
                tenant["dataset"]["id"],
                test_dataset_id=tenant["test"]["id"],
                gallery_id=tenant["gallery_id"],
                transfer_set_size=50,
                image_size=64,
            ),
        )
        assert created.status_code == 202, created.text
        job = created.json()
        assert (job["kind"], job["status"], job["progress"], job["model_id"]) == (
            "pipeline",
            "queued",
            0.0,
            None,
        )
        assert job["request"]["steps"]["distill"] == 3
        assert job["id"] in queued_job_ids(broker)

        fetched = client.get(f"/v1/jobs/{job['id']}").json()
        assert fetched["status"] == "queued" and fetched["created_at"] and fetched["started_at"] is None
        listing = client.get("/v1/jobs").json()
        assert listing["count"] >= 1 and job["id"] in [j["id"] for j in listing["data"]]
        assert client.get(f"/v1/jobs/{job['id']}/logs").text == ""

    engine = make_engine(japi.settings.database_url)
    with make_session_factory(engine)() as session:
        row = session.get(Job, job["id"])
        assert row is not None
        cfg = row.params["config"]
    engine.dispose()
    images = japi.settings.data_dir / "tenants"
    assert Path(cfg["data"]["train"]["path"]).is_dir() and cfg["data"]["train"]["path"].startswith(
        str(images)
    )
    assert cfg["data"]["test"]["path"].endswith(f"{tenant['test']['id']}/images")
    assert (cfg["curate"]["gallery"], cfg["curate"]["size"]) == ("/galleries/tiny", 50)
    assert cfg["stages"][-1] == "evaluate" and "curate" in cfg["stages"]
    assert cfg["distill"]["steps"] == 3 and cfg["export"] == {"formats": ["safetensors", "onnx"]}
    assert cfg["teacher"] == {"model": "timm:test_vit", "image_size": 64}

    # the worker's own validation accepts it (kt_train is importable in the test process)
    from kt_train.config import parse_config

    parse_config({**cfg, "out_dir": "/tmp/x"})


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"teacher": "resnet18"}, "teacher"),
        ({"teacher": "timm:x@/etc/passwd"}, "teacher"),
        ({"student": "open_clip:ViT-B-32"}, "student"),
        ({"steps": {"finetune_teacher": -1, "distill": 1, "finetune_student": 1}}, "steps.finetune_teacher"),
        ({"steps": {"finetune_teacher": 1, "distill": 10**9, "finetune_student": 1}}, "steps.distill"),
        ({"export_formats": ["tflite"]}, "export_formats"),
        ({"image_size": 4}, "image_size"),
        ({"lr": {"distill": 5.0}}, "lr.distill"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_submit_job_rejects_bad_requests(japi: Api, tenant: dict[str, Any], change: dict, where: str) -> None:
    with japi.client(tenant["key"]) as client:
        response = client.post("/v1/jobs", json=job_body(tenant["dataset"]["id"], **change))
    assert response.status_code == 422, response.text
    assert where in response.json()["detail"]


def test_other_tenants_and_missing_ids_are_404(japi: Api, tenant: dict[str, Any]) -> None:
    with japi.client(tenant["key"]) as client:
        job = client.post("/v1/jobs", json=job_body(tenant["dataset"]["id"])).json()
        assert (
            client.post("/v1/jobs", json=job_body(tenant["dataset"]["id"], gallery_id="nope")).status_code
            == 404
        )
    model = Model(tenant_id=_tenant_id(japi, job["id"]), job_id=job["id"], card={}, files={})
    db_write(japi, model)
    with japi.client(tenant["other"]) as rival:
        assert rival.post("/v1/jobs", json=job_body(tenant["dataset"]["id"])).status_code == 404
        for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/logs", f"/v1/models/{model.id}"):
            assert rival.get(path).status_code == 404, path
        assert rival.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
        assert rival.get("/v1/jobs").json()["count"] == 0
        body = {"dataset_id": tenant["dataset"]["id"], "gallery_id": tenant["gallery_id"]}
        assert rival.post("/v1/transfer-sets", json=body).status_code == 404


def _tenant_id(api: Api, job_id: str) -> str:
    engine = make_engine(api.settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job.tenant_id
    finally:
        engine.dispose()


def test_dataset_not_ready_is_409(japi: Api, tenant: dict[str, Any]) -> None:
    with japi.client(tenant["key"]) as client:
        dataset = upload(client, imagefolder_zip({"a": 1, "b": 1}), name="pending").json()
        db_write(japi, statement=_set_dataset_status(dataset["id"], "uploading"))
        response = client.post("/v1/jobs", json=job_body(dataset["id"]))
    assert response.status_code == 409 and "not ready" in response.json()["detail"]


def _set_dataset_status(dataset_id: str, status: str) -> Any:
    from service.db.models import Dataset

    return update(Dataset).where(Dataset.id == dataset_id).values(status=status)


def test_cancel_queued_job_and_finished_job(japi: Api, tenant: dict[str, Any]) -> None:
    with japi.client(tenant["key"]) as client:
        queued = client.post("/v1/jobs", json=job_body(tenant["dataset"]["id"])).json()
        canceled = client.post(f"/v1/jobs/{queued['id']}/cancel")
        assert canceled.status_code == 200, canceled.text
        assert (canceled.json()["status"], canceled.json()["cancel_requested"]) == ("canceled", True)
        assert canceled.json()["finished_at"] is not None
        assert client.post(f"/v1/jobs/{queued['id']}/cancel").status_code == 409

        done = client.post("/v1/jobs", json=job_body(tenant["dataset"]["id"])).json()
        db_write(
            japi,
            statement=update(Job)
            .where(Job.id == done["id"])
            .values(status="succeeded", finished_at=utcnow()),
        )
        again = client.post(f"/v1/jobs/{done['id']}/cancel")
        assert again.status_code == 409 and "succeeded" in again.json()["detail"]

        running = client.post("/v1/jobs", json=job_body(tenant["dataset"]["id"])).json()
        db_write(japi, statement=update(Job).where(Job.id == running["id"]).values(status="running"))
        flagged = client.post(f"/v1/jobs/{running['id']}/cancel").json()
        assert (flagged["status"], flagged["cancel_requested"]) == ("running", True)

        log = japi.settings.data_dir / "jobs" / running["id"] / "job.log"
        log.parent.mkdir(parents=True)
        log.write_text("stage distill\n")
        logs = client.get(f"/v1/jobs/{running['id']}/logs")
        assert logs.text == "stage distill\n" and logs.headers["content-type"].startswith("text/plain")


def test_model_card_and_download(japi: Api, tenant: dict[str, Any]) -> None:
    with japi.client(tenant["key"]) as client:
        job = client.post("/v1/jobs", json=job_body(tenant["dataset"]["id"])).json()
        weights = japi.settings.data_dir / "jobs" / job["id"] / "run" / "export" / "model.safetensors"
        weights.parent.mkdir(parents=True)
        weights.write_bytes(b"\x00weights\xff" * 100)
        model = Model(
            tenant_id=_tenant_id(japi, job["id"]),
            job_id=job["id"],
            card={"classes": ["cat", "dog"]},
            files={"safetensors": str(weights), "card": str(weights.parent / "model_card.json")},
        )
        db_write(japi, model)

        card = client.get(f"/v1/models/{model.id}").json()
        assert card["card"]["classes"] == ["cat", "dog"] and card["formats"] == ["safetensors"]
        assert client.get(f"/v1/jobs/{job['id']}").json()["model_id"] == model.id
        assert client.get("/v1/models").json()["count"] >= 1

        got = client.get(f"/v1/models/{model.id}/download", params={"format": "safetensors"})
        assert got.status_code == 200 and got.content == weights.read_bytes()
        assert f"model-{model.id}.safetensors" in got.headers["content-disposition"]
        assert client.get(f"/v1/models/{model.id}/download", params={"format": "onnx"}).status_code == 404
        assert client.get(f"/v1/models/{model.id}/download", params={"format": "pkl"}).status_code == 422


def test_transfer_set_lifecycle(japi: Api, tenant: dict[str, Any], broker: redis.Redis) -> None:
    body = {
        "dataset_id": tenant["dataset"]["id"],
        "gallery_id": tenant["gallery_id"],
        "size": 20,
        "method": "class_balanced",
        "crops": 2,
    }
    with japi.client(tenant["key"]) as client:
        assert client.post("/v1/transfer-sets", json={**body, "size": 0}).status_code == 422
        assert client.post("/v1/transfer-sets", json={**body, "method": "magic"}).status_code == 422
        assert client.post("/v1/transfer-sets", json={**body, "gallery_id": "nope"}).status_code == 404

        created = client.post("/v1/transfer-sets", json=body)
        assert created.status_code == 202, created.text
        ts = created.json()
        assert (ts["status"], ts["size"]) == ("queued", 20) and ts["job_id"] in queued_job_ids(broker)
        job = client.get(f"/v1/jobs/{ts['job_id']}").json()
        assert job["kind"] == "curate"
        for path in ("manifest", "report"):
            pending = client.get(f"/v1/transfer-sets/{ts['id']}/{path}")
            assert pending.status_code == 409 and "queued" in pending.json()["detail"]
        assert (
            client.get(f"/v1/transfer-sets/{ts['id']}/manifest", params={"format": "xml"}).status_code == 422
        )

        # what the worker leaves behind when the curate job succeeds
        out = japi.settings.data_dir / "jobs" / ts["job_id"] / "run" / "curate"
        out.mkdir(parents=True)
        (out / "manifest.jsonl").write_text('{"path": "a.jpg", "score": 0.9}\n')
        (out / "summary.json").write_text(json.dumps({"items": 1}))
        (out / "report.html").write_text("<html>report</html>")
        db_write(japi, statement=update(Job).where(Job.id == ts["job_id"]).values(status="succeeded"))

        ready = client.get(f"/v1/transfer-sets/{ts['id']}").json()
        assert (ready["status"], ready["summary"]) == ("ready", {"items": 1})
        manifest = client.get(f"/v1/transfer-sets/{ts['id']}/manifest")
        assert manifest.status_code == 200 and manifest.text == '{"path": "a.jpg", "score": 0.9}\n'
        assert (
            client.get(f"/v1/transfer-sets/{ts['id']}/manifest", params={"format": "csv"}).status_code == 404
        )
        report = client.get(f"/v1/transfer-sets/{ts['id']}/report")
        assert report.headers["content-type"].startswith("text/html") and "report" in report.text
    with japi.client(tenant["other"]) as rival:
        assert rival.get(f"/v1/transfer-sets/{ts['id']}").status_code == 404


def test_galleries_listed_for_every_tenant(japi: Api, tenant: dict[str, Any]) -> None:
    with japi.client(tenant["other"]) as client:
        listing = client.get("/v1/galleries").json()
    assert listing["count"] == 1
    assert {k: listing["data"][0][k] for k in ("name", "size", "encoder", "index_kind")} == {
        "name": "tiny",
        "size": 10,
        "encoder": "timm:x",
        "index_kind": "flat",
    }
    assert "path" not in listing["data"][0]
    assert httpx.get(f"{japi.url}/v1/galleries").status_code == 401


# --- queue routing: GPU jobs go to the `gpu` queue


def test_queue_for_device() -> None:
    from service.queue import queue_for
    from service.settings import Settings

    cpu_default, gpu_default = Settings(), Settings(default_queue="gpu")
    assert [queue_for(d, cpu_default) for d in ("cuda", "cuda:1", "cpu", "auto", None)] == [
        "gpu",
        "gpu",
        "cpu",
        "cpu",
        "cpu",
    ]
    assert [queue_for(d, gpu_default) for d in ("cuda", "cpu", "auto", None)] == ["gpu", "cpu", "gpu", "gpu"]


@pytest.mark.parametrize(
    ("device", "queue"), [("cuda", "gpu"), ("cuda:1", "gpu"), ("cpu", "cpu"), ("auto", "cpu"), (None, "cpu")]
)
def test_jobs_are_routed_by_device(
    japi: Api, tenant: dict[str, Any], broker: redis.Redis, device: str | None, queue: str
) -> None:
    extra = {"device": device} if device is not None else {}
    with japi.client(tenant["key"]) as client:
        created = client.post("/v1/jobs", json=job_body(tenant["dataset"]["id"], **extra))
        assert created.status_code == 202, created.text
        job = created.json()
    assert job["queue"] == queue and job["request"]["device"] == device
    other = "cpu" if queue == "gpu" else "gpu"
    assert job["id"] in queued_job_ids(broker, queue) and job["id"] not in queued_job_ids(broker, other)
    engine = make_engine(japi.settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            row = session.get(Job, job["id"])
            assert row is not None and row.queue == queue
            # the worker runs it on that device (kt_train's own "auto" when none was asked for)
            assert row.params["config"].get("device") == device
    finally:
        engine.dispose()


def test_default_queue_setting_routes_jobs_that_name_no_device(
    japi: Api, tenant: dict[str, Any], broker: redis.Redis
) -> None:
    gpu_settings = japi.settings.model_copy(update={"default_queue": "gpu"})
    with running_api(gpu_settings, migrate=False) as gpu_api, gpu_api.client(tenant["key"]) as client:
        plain = client.post("/v1/jobs", json=job_body(tenant["dataset"]["id"])).json()
        on_cpu = client.post("/v1/jobs", json=job_body(tenant["dataset"]["id"], device="cpu")).json()
        ts = client.post(
            "/v1/transfer-sets",
            json={"dataset_id": tenant["dataset"]["id"], "gallery_id": tenant["gallery_id"]},
        ).json()
    assert (plain["queue"], on_cpu["queue"]) == ("gpu", "cpu")
    assert plain["id"] in queued_job_ids(broker, "gpu") and on_cpu["id"] in queued_job_ids(broker, "cpu")
    assert ts["job_id"] in queued_job_ids(broker, "gpu")


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_a_422_not_a_500(japi: Api, tenant: dict[str, Any], number: str) -> None:
    """Python's JSON parser takes NaN / Infinity / 1e400; the 422 echoes the input back, which must
    still encode (JSON has no NaN)."""
    import json

    body = json.dumps(job_body(tenant["dataset"]["id"])).replace(
        '"dataset_id"', f'"lr": {{"distill": {number}}}, "dataset_id"'
    )
    with japi.client(tenant["key"]) as client:
        response = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert "lr.distill" in response.json()["detail"]


# --- the recipe: a job that names only its data and models runs the budget's recipe


def stored_config(api: Api, job_id: str) -> dict[str, Any]:
    engine = make_engine(api.settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            row = session.get(Job, job_id)
            assert row is not None
            return dict(row.params["config"])
    finally:
        engine.dispose()


def leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b": 1}`` for ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def submit_config(api: Api, key: str, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the job as answered, the training config stored for it)."""
    with api.client(key) as client:
        created = client.post("/v1/jobs", json=body)
    assert created.status_code == 202, created.text
    job = created.json()
    return job, stored_config(api, job["id"])


def minimal_body(dataset_id: str, **extra: Any) -> dict[str, Any]:
    return {"dataset_id": dataset_id, "teacher": "timm:test_vit", "student": "timm:resnet10t", **extra}


@pytest.mark.parametrize("budget", [None, "fast", "balanced", "best"])
def test_a_minimal_job_runs_the_recipe_of_its_budget(
    japi: Api, tenant: dict[str, Any], budget: str | None
) -> None:
    from kt_train.config import parse_config
    from kt_train.recipe import recipe

    extra = {"budget": budget} if budget else {}
    body = minimal_body(tenant["dataset"]["id"], gallery_id=tenant["gallery_id"], **extra)
    job, cfg = submit_config(japi, tenant["key"], body)
    assert job["request"]["budget"] == (budget or "balanced")
    expected = leaves(recipe(budget or "balanced"))
    got = leaves(cfg)
    assert {k: got.get(k) for k in expected} == expected
    assert cfg["stages"] == ["finetune_teacher", "curate", "distill", "finetune_student", "export"]
    assert cfg["seed"] == 0 and cfg["curate"]["gallery"] == "/galleries/tiny"
    parse_config(cfg)  # what the worker will do with it


def test_budgets_order_the_distillation_length(japi: Api, tenant: dict[str, Any]) -> None:
    from kt_train.recipe import BUDGETS, recipe

    assert BUDGETS == ("fast", "balanced", "best")
    steps = []
    for budget in BUDGETS:
        _, cfg = submit_config(japi, tenant["key"], minimal_body(tenant["dataset"]["id"], budget=budget))
        assert cfg["distill"]["steps"] == recipe(budget)["distill"]["steps"]
        steps.append(cfg["distill"]["steps"])
    assert steps[0] < steps[1] < steps[2]


def test_per_job_recipe_overrides_land_in_the_config(japi: Api, tenant: dict[str, Any]) -> None:
    from kt_train.recipe import recipe

    overrides = {
        "teacher": {
            "linear_probe_steps": 7,
            "linear_probe_lr": 0.02,
            "full_finetune_steps": 11,
            "full_finetune_lr": 1e-4,
            "layer_decay": 0.7,
            "norm_eval": True,
        },
        "distill": {
            "steps": 5000,
            "lr": 0.001,
            "batch_size": 16,
            "temperature": 2.0,
            "ce_weight": 0.5,
            "cache_views": 4,
            "cache_mode": "online",
        },
        "curate": {
            "size": 300,
            "crops": 2,
            "min_score": 0.1,
            "teacher_min_prob": 0.3,
            "teacher_filter": False,
            "teacher_rerank": 0.5,
            "dedup_threshold": 0.9,
            "top_up": False,
        },
        "finetune_student": {"steps": 9, "lr": 0.002, "after_distillation": True},
    }
    body = minimal_body(tenant["dataset"]["id"], gallery_id=tenant["gallery_id"], budget="fast", seed=1234)
    job, cfg = submit_config(japi, tenant["key"], {**body, "recipe": overrides})
    assert job["request"]["recipe"]["distill"]["temperature"] == 2.0 and job["request"]["seed"] == 1234
    teacher, distill, student = cfg["finetune_teacher"], cfg["distill"], cfg["finetune_student"]
    assert (teacher["linear_probe"]["steps"], teacher["linear_probe"]["lr"]) == (7, 0.02)
    assert (teacher["full_finetune"]["steps"], teacher["full_finetune"]["lr"]) == (11, 1e-4)
    assert teacher["layer_decay"] == 0.7 and cfg["teacher"]["norm_eval"] is True
    assert {k: distill[k] for k in ("steps", "lr", "batch_size", "temperature", "ce_weight")} == {
        "steps": 5000,
        "lr": 0.001,
        "batch_size": 16,
        "temperature": 2.0,
        "ce_weight": 0.5,
    }
    assert (distill["cache"]["views"], distill["cache"]["mode"]) == (4, "online")
    assert {k: cfg["curate"][k] for k in overrides["curate"]} == overrides["curate"]
    assert (student["steps"], student["lr"]) == (9, 0.002)
    # the recipe keeps a task-distilled student as distilled; a job can ask for the finetune anyway
    assert (
        student["after_distillation"] is True
        and recipe("fast")["finetune_student"]["after_distillation"] is False
    )
    assert cfg["seed"] == 1234
    # what was not overridden is still the budget's
    fast = recipe("fast")
    assert distill["warmup_steps"] == fast["distill"]["warmup_steps"]
    assert student["scratch_lr"] == fast["finetune_student"]["scratch_lr"]
    assert cfg["curate"]["k_per_crop"] == fast["curate"]["k_per_crop"]


def test_a_job_can_ask_for_the_checked_student_finetune(japi: Api, tenant: dict[str, Any]) -> None:
    body = minimal_body(tenant["dataset"]["id"], gallery_id=tenant["gallery_id"], budget="fast")
    _, cfg = submit_config(
        japi, tenant["key"], {**body, "recipe": {"finetune_student": {"after_distillation": "auto"}}}
    )
    assert cfg["finetune_student"]["after_distillation"] == "auto"
    with japi.client(tenant["key"]) as client:
        bad = client.post(
            "/v1/jobs", json={**body, "recipe": {"finetune_student": {"after_distillation": "maybe"}}}
        )
    assert bad.status_code == 422 and "after_distillation" in bad.text, bad.text


def test_finetune_steps_in_the_request_finetune_the_distilled_student(
    japi: Api, tenant: dict[str, Any]
) -> None:
    from kt_train.recipe import recipe

    # the tutorial's `kt jobs submit ... --gallery G --steps 100,2000,200` had run no student finetune:
    # the budget keeps a task-distilled student as distilled, so the 200 steps were dropped silently
    body = minimal_body(tenant["dataset"]["id"], gallery_id=tenant["gallery_id"], budget="fast")
    assert recipe("fast")["finetune_student"]["after_distillation"] is False
    for extra in (
        {"steps": {"finetune_teacher": 2, "distill": 3, "finetune_student": 20}},
        {"recipe": {"finetune_student": {"steps": 20}}},
    ):
        _, cfg = submit_config(japi, tenant["key"], {**body, **extra})
        assert (
            cfg["finetune_student"]["steps"] == 20 and cfg["finetune_student"]["after_distillation"] is True
        )
    # an explicit after_distillation wins; no steps (or 0) keeps the budget's choice
    _, cfg = submit_config(
        japi,
        tenant["key"],
        {**body, "recipe": {"finetune_student": {"steps": 20, "after_distillation": "auto"}}},
    )
    assert cfg["finetune_student"]["after_distillation"] == "auto"
    for extra in ({}, {"steps": {"finetune_student": 0}}):
        _, cfg = submit_config(japi, tenant["key"], {**body, **extra})
        assert cfg["finetune_student"]["after_distillation"] is False


def test_the_older_fields_still_work_and_agree_with_recipe(japi: Api, tenant: dict[str, Any]) -> None:
    body = job_body(
        tenant["dataset"]["id"],
        lr={"distill": 0.004},
        batch_size={"finetune_teacher": 8},
        recipe={"distill": {"steps": 3, "lr": 0.004}},  # the same values as steps/lr: fine
    )
    _, cfg = submit_config(japi, tenant["key"], body)
    assert (cfg["distill"]["steps"], cfg["distill"]["lr"]) == (3, 0.004)
    assert cfg["finetune_teacher"]["linear_probe"]["steps"] == 2
    assert cfg["finetune_teacher"]["linear_probe"]["batch_size"] == 8
    assert cfg["finetune_student"]["steps"] == 1


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"budget": "huge"}, "budget"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**31}, "seed"),
        ({"teacher_image_size": 16}, "teacher_image_size"),
        ({"student_image_size": 4096}, "student_image_size"),
        ({"image_size": 64, "teacher_image_size": 96}, "teacher_image_size"),
        ({"recipe": {"distill": {"temperature": 0}}}, "recipe.distill.temperature"),
        ({"recipe": {"distill": {"cache_mode": "sometimes"}}}, "recipe.distill.cache_mode"),
        ({"recipe": {"distill": {"cache_views": 0}}}, "recipe.distill.cache_views"),
        ({"recipe": {"distill": {"stepz": 10}}}, "recipe.distill.stepz"),
        ({"recipe": {"teacher": {"layer_decay": 1.5}}}, "recipe.teacher.layer_decay"),
        ({"recipe": {"teacher": {"full_finetune_steps": -1}}}, "recipe.teacher.full_finetune_steps"),
        ({"recipe": {"curate": {"teacher_min_prob": 2}}}, "recipe.curate.teacher_min_prob"),
        ({"recipe": {"finetune_student": {"lr": 0}}}, "recipe.finetune_student.lr"),
        ({"recipe": {"distill": {"steps": 4}}}, "recipe.distill.steps"),  # job_body has steps.distill=3
        ({"transfer_set_size": 10, "recipe": {"curate": {"size": 20}}}, "recipe.curate.size"),
        ({"recipe": {"finetune_student": {"enabled": False}}}, "steps.finetune_student"),
        ({"transfer_set_id": "a" * 32, "gallery_id": "b" * 32}, "transfer_set_id"),
        ({"recipe": {"curate": {"crops": 2}}}, "recipe.curate.crops"),  # no gallery: nothing to curate
    ],
)
def test_bad_recipe_values_are_422_naming_the_field(
    japi: Api, tenant: dict[str, Any], change: dict[str, Any], where: str
) -> None:
    with japi.client(tenant["key"]) as client:
        response = client.post("/v1/jobs", json=job_body(tenant["dataset"]["id"], **change))
    assert response.status_code == 422, response.text
    assert where in response.json()["detail"]


def test_teacher_and_student_image_sizes(japi: Api, tenant: dict[str, Any]) -> None:
    body = minimal_body(tenant["dataset"]["id"], teacher_image_size=96, student_image_size=64)
    _, cfg = submit_config(japi, tenant["key"], body)
    assert (cfg["teacher"]["image_size"], cfg["student"]["image_size"]) == (96, 64)
    _, cfg = submit_config(japi, tenant["key"], minimal_body(tenant["dataset"]["id"], student_image_size=64))
    from kt_train.recipe import recipe

    # an unset size is the recipe's
    assert cfg["teacher"].get("image_size") == recipe("balanced").get("teacher", {}).get("image_size")
    assert cfg["student"]["image_size"] == 64
    _, cfg = submit_config(japi, tenant["key"], minimal_body(tenant["dataset"]["id"], image_size=48))
    assert (cfg["teacher"]["image_size"], cfg["student"]["image_size"]) == (48, 48)


def test_student_finetune_can_be_dropped(japi: Api, tenant: dict[str, Any]) -> None:
    body = minimal_body(
        tenant["dataset"]["id"],
        test_dataset_id=tenant["test"]["id"],
        recipe={"finetune_student": {"enabled": False}},
    )
    job, cfg = submit_config(japi, tenant["key"], body)
    # export (and evaluate) take the distilled student
    assert cfg["stages"] == ["finetune_teacher", "distill", "export", "evaluate"]
    assert job["request"]["recipe"]["finetune_student"]["enabled"] is False


def ready_transfer_set(api: Api, key: str, dataset_id: str, gallery_id: str) -> dict[str, Any]:
    """A transfer set as the worker leaves it when its curate job succeeds."""
    with api.client(key) as client:
        created = client.post("/v1/transfer-sets", json={"dataset_id": dataset_id, "gallery_id": gallery_id})
        assert created.status_code == 202, created.text
        ts = created.json()
        out = api.settings.data_dir / "jobs" / ts["job_id"] / "run" / "curate"
        out.mkdir(parents=True)
        (out / "manifest.jsonl").write_text('{"path": "/galleries/tiny/a.jpg", "score": 0.9}\n')
        (out / "summary.json").write_text(json.dumps({"size": 1}))
        db_write(api, statement=update(Job).where(Job.id == ts["job_id"]).values(status="succeeded"))
        ready = client.get(f"/v1/transfer-sets/{ts['id']}").json()
    assert ready["status"] == "ready"
    return dict(ready)


def test_a_ready_transfer_set_is_reused_without_curating(japi: Api, tenant: dict[str, Any]) -> None:
    ts = ready_transfer_set(japi, tenant["key"], tenant["dataset"]["id"], tenant["gallery_id"])
    body = minimal_body(tenant["dataset"]["id"], transfer_set_id=ts["id"])
    job, cfg = submit_config(japi, tenant["key"], body)
    manifest = japi.settings.data_dir / "jobs" / ts["job_id"] / "run" / "curate" / "manifest.jsonl"
    assert cfg["data"]["transfer"] == {"path": str(manifest)}
    assert "curate" not in cfg["stages"] and "curate" not in cfg
    assert job["request"]["transfer_set_id"] == ts["id"]

    with japi.client(tenant["key"]) as client:
        # knobs of a curation that will not run
        for extra in ({"transfer_set_size": 10}, {"recipe": {"curate": {"size": 10}}}):
            refused = client.post("/v1/jobs", json={**body, **extra})
            assert refused.status_code == 422 and "remove them" in refused.json()["detail"]
        queued = client.post(
            "/v1/transfer-sets",
            json={"dataset_id": tenant["dataset"]["id"], "gallery_id": tenant["gallery_id"]},
        ).json()
        pending = client.post("/v1/jobs", json={**body, "transfer_set_id": queued["id"]})
        assert pending.status_code == 409 and "not ready" in pending.json()["detail"]
        missing = client.post("/v1/jobs", json={**body, "transfer_set_id": "f" * 32})
        assert missing.status_code == 404 and "kt transfer-sets list" in missing.json()["detail"]


def test_another_tenants_transfer_set_is_404(japi: Api, tenant: dict[str, Any]) -> None:
    ts = ready_transfer_set(japi, tenant["key"], tenant["dataset"]["id"], tenant["gallery_id"])
    with japi.client(tenant["other"]) as rival:
        own = upload(rival, imagefolder_zip({"cat": 2, "dog": 2}), name="rival").json()
        response = rival.post("/v1/jobs", json=minimal_body(own["id"], transfer_set_id=ts["id"]))
    assert response.status_code == 404, response.text
    assert ts["id"] in response.json()["detail"] and "kt transfer-sets list" in response.json()["detail"]


def test_transfer_set_curates_with_the_recipe_and_an_optional_teacher(
    japi: Api, tenant: dict[str, Any]
) -> None:
    from kt_train.recipe import recipe

    rc = recipe()["curate"]
    body = {"dataset_id": tenant["dataset"]["id"], "gallery_id": tenant["gallery_id"], "size": 30}
    with japi.client(tenant["key"]) as client:
        plain = client.post("/v1/transfer-sets", json=body)
        assert plain.status_code == 202, plain.text
        cfg = stored_config(japi, plain.json()["job_id"])
        assert cfg["stages"] == ["curate"]
        cur = cfg["curate"]
        # the recipe's curation, less what needs a teacher
        assert (cur["crops"], cur["k_per_crop"], cur["dedup_threshold"]) == (
            rc["crops"],
            rc["k_per_crop"],
            rc["dedup_threshold"],
        )
        assert cur["teacher_filter"] is False and cur["teacher_rerank"] == 0.0 and cur["size"] == 30

        own = client.post("/v1/transfer-sets", json={**body, "crops": 3, "dedup_threshold": 0.9})
        cur = stored_config(japi, own.json()["job_id"])["curate"]
        assert (cur["crops"], cur["dedup_threshold"]) == (3, 0.9)

        taught = client.post(
            "/v1/transfer-sets",
            json={**body, "teacher": "timm:resnet10t", "teacher_min_prob": 0.7, "top_up": False},
        )
        assert taught.status_code == 202, taught.text
        cfg = stored_config(japi, taught.json()["job_id"])
        assert cfg["stages"] == ["finetune_teacher", "curate"]
        assert cfg["teacher"]["model"] == "timm:resnet10t"
        assert cfg["finetune_teacher"] == recipe()["finetune_teacher"]
        assert cfg["curate"]["teacher_filter"] is True and cfg["curate"]["teacher_min_prob"] == 0.7
        assert cfg["curate"]["top_up"] is False

        for bad, field in (
            ({"teacher": "timm:resnet10t@/etc/passwd"}, "teacher"),
            ({"teacher_min_prob": 2}, "teacher_min_prob"),
        ):
            r = client.post("/v1/transfer-sets", json={**body, **bad})
            assert r.status_code == 422 and field in r.text, r.text
