"""Registered models: an operator registers a safetensors file once (``kt admin register-model``),
tenants name it as ``timm:<arch>@registered:<name>``; the service resolves it at submit to the
stored file, and refuses specs that name paths, pickles, weights of another shape and other
tenants' models. Real uvicorn over SQLite (the SQLite broker: submitted jobs stay queued), the
real shape check in a subprocess, and one case on PostgreSQL."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from service.admin import cli, create_tenant_key
from service.api.errors import Invalid
from service.db.models import RegisteredModel, Tenant
from service.db.session import init_db, make_engine, make_session_factory
from service.registry import (
    CARD_FILE,
    WEIGHTS_FILE,
    RegistrationError,
    read_safetensors_header,
    register_model,
    resolve_spec,
    resolve_teacher,
)
from service.settings import Settings, get_settings
from tests.service.test_api import Api, imagefolder_zip, make_settings, running_api, upload
from tests.service.test_jobs_api import stored_config

CARD = {
    "arch": "resnet10t",
    "create_model_kwargs": {"drop_rate": 0.25, "num_classes": 3},
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "input_size": [3, 96, 96],
    "norm_eval": True,
    "source": "tests/service/test_registered_models.py",
}


def save_timm(path: Path, arch: str, **kwargs: Any) -> Path:
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model(arch, **kwargs).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Weights files: a tiny resnet10t (3 classes) with its card beside it, a resnet18, pickles, garbage."""
    import torch

    root = tmp_path_factory.mktemp("weights")
    tiny = save_timm(root / "tiny.safetensors", "resnet10t", num_classes=3)
    (root / "tiny.card.json").write_text(json.dumps(CARD))
    resnet18 = save_timm(root / "r18.safetensors", "resnet18", num_classes=3)
    pt = root / "tiny.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), str(pt))
    legacy = root / "legacy.safetensors"  # a pickle under a safetensors name
    legacy.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}, protocol=4))
    zipped = root / "zipped.safetensors"
    zipped.write_bytes(pt.read_bytes())
    garbage = root / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    truncated = root / "truncated.safetensors"
    truncated.write_bytes(tiny.read_bytes()[:-100])
    return {
        "tiny": tiny,
        "r18": resnet18,
        "pt": pt,
        "legacy": legacy,
        "zipped": zipped,
        "garbage": garbage,
        "truncated": truncated,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, files: dict[str, Path]) -> Iterator[dict[str, Any]]:
    """A running API; tenants acme (a dataset, a key, an admin key) and rival; models registered
    through the CLI: `tiny` for every tenant, `acme-only` for acme only."""
    data_dir = tmp_path_factory.mktemp("registry") / "data"
    settings = make_settings(data_dir)
    with running_api(settings) as api:
        acme, admin, rival = api.key("acme"), _key(api, "acme", admin=True), api.key("rival")
        runner = CliRunner()
        env = {"KT_DATA_DIR": str(data_dir)}
        get_settings.cache_clear()  # the CLI reads its settings from env
        shared = runner.invoke(cli, ["register-model", "tiny", str(files["tiny"])], env=env)
        assert shared.exit_code == 0, shared.output
        assert "timm:resnet10t@registered:tiny" in shared.output and "every tenant" in shared.output
        private = runner.invoke(
            cli,
            ["register-model", "acme-only", str(files["tiny"]), "--tenant", "acme", "--no-norm-eval"],
            env=env,
        )
        assert private.exit_code == 0, private.output
        get_settings.cache_clear()
        datasets = {}
        for who, key in (("acme", acme), ("rival", rival)):
            with api.client(key) as client:
                datasets[who] = upload(client, imagefolder_zip({"cat": 2, "dog": 2})).json()["id"]
        yield {"api": api, "acme": acme, "admin": admin, "rival": rival, "datasets": datasets}


def _key(api: Api, tenant: str, admin: bool = False) -> str:
    engine = make_engine(api.settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            return create_tenant_key(session, tenant, admin=admin)
    finally:
        engine.dispose()


def job_body(dataset_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "dataset_id": dataset_id,
        "teacher": "timm:resnet10t@registered:tiny",
        "student": "timm:resnet10t",
        "steps": {"finetune_teacher": 1, "distill": 1, "finetune_student": 1},
        "export_formats": ["safetensors"],
        **extra,
    }


def submit(world: dict[str, Any], key: str = "acme", **extra: Any) -> httpx.Response:
    with world["api"].client(world[key]) as client:
        return client.post("/v1/jobs", json=job_body(world["datasets"][key], **extra))


# --- registration, and use in a job


def test_registered_model_is_stored_with_its_card(world: dict[str, Any], files: dict[str, Path]) -> None:
    api: Api = world["api"]
    stored = api.settings.data_dir / "registry" / "tiny"
    assert sorted(p.name for p in stored.iterdir()) == sorted([WEIGHTS_FILE, CARD_FILE])
    assert (stored / WEIGHTS_FILE).read_bytes() == files["tiny"].read_bytes()
    card = json.loads((stored / CARD_FILE).read_text())
    assert card["arch"] == "resnet10t" and card["norm_eval"] is True and card["input_size"] == [3, 96, 96]
    assert card["source"] == CARD["source"]  # the rest of the card is kept
    engine = make_engine(api.settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            rows = {row.name: row for row in session.scalars(select(RegisteredModel)).all()}
            acme = session.scalar(select(Tenant).where(Tenant.name == "acme"))
            assert acme is not None
            assert rows["tiny"].tenant_id is None and rows["acme-only"].tenant_id == acme.id
            assert rows["tiny"].bytes == files["tiny"].stat().st_size and len(rows["tiny"].sha256) == 64
            assert rows["acme-only"].card["norm_eval"] is False  # --no-norm-eval over the card's
    finally:
        engine.dispose()


def test_job_config_names_the_stored_file_and_the_card(world: dict[str, Any]) -> None:
    response = submit(world)
    assert response.status_code == 202, response.text
    assert response.json()["request"]["teacher"] == "timm:resnet10t@registered:tiny"
    teacher = stored_config(world["api"], response.json()["id"])["teacher"]
    stored = world["api"].settings.data_dir / "registry" / "tiny" / WEIGHTS_FILE
    assert teacher["model"] == f"timm:resnet10t@{stored}"
    assert teacher["model_kwargs"] == {"drop_rate": 0.25}  # the task decides num_classes
    assert teacher["norm_eval"] is True

    # the worker builds that teacher from the stored file (its card beside it: mean/std, size)
    from kt_train.models import create_teacher

    model = create_teacher(teacher["model"], 2, model_kwargs=teacher["model_kwargs"])
    assert model.data_config.input_size == 96 and model.data_config.mean == (0.5, 0.5, 0.5)


def test_the_requests_norm_eval_wins_over_the_cards(world: dict[str, Any]) -> None:
    response = submit(world, recipe={"teacher": {"norm_eval": False}})
    assert response.status_code == 202, response.text
    assert stored_config(world["api"], response.json()["id"])["teacher"]["norm_eval"] is False


def test_listing_shows_what_the_tenant_may_use(world: dict[str, Any]) -> None:
    with world["api"].client(world["acme"]) as client:
        mine = client.get("/v1/registered-models").json()
    with world["api"].client(world["rival"]) as client:
        theirs = client.get("/v1/registered-models").json()
    assert [m["name"] for m in mine["data"]] == ["acme-only", "tiny"] and mine["count"] == 2
    assert [m["name"] for m in theirs["data"]] == ["tiny"] and theirs["count"] == 1
    tiny = theirs["data"][0]
    assert (tiny["arch"], tiny["spec"], tiny["norm_eval"], tiny["input_size"], tiny["shared"]) == (
        "resnet10t",
        "timm:resnet10t@registered:tiny",
        True,
        96,
        True,
    )
    assert "path" not in tiny and tiny["bytes"] > 0
    assert httpx.get(f"{world['api'].url}/v1/registered-models").status_code == 401


def test_gallery_build_resolves_a_registered_encoder(world: dict[str, Any]) -> None:
    body = {
        "name": "from-registered",
        "sources": [{"dataset_id": world["datasets"]["acme"]}],
        "encoder": "timm:resnet10t@registered:acme-only",
    }
    with world["api"].client(world["admin"]) as client:
        response = client.post("/v1/admin/galleries", json=body)
        assert response.status_code == 202, response.text
        stored = world["api"].settings.data_dir / "registry" / "acme-only" / WEIGHTS_FILE
        assert stored_config(world["api"], response.json()["id"])["encoder"] == f"timm:resnet10t@{stored}"
        refused = client.post(
            "/v1/admin/galleries", json={**body, "name": "x", "encoder": "timm:resnet10t@registered:nope"}
        )
    assert refused.status_code == 422 and "Unknown registered model 'nope'" in refused.json()["detail"]


# --- refusals at submit


def detail(response: httpx.Response, status: int = 422) -> str:
    assert response.status_code == status, response.text
    text = response.json()["detail"]
    assert isinstance(text, str)
    return text


@pytest.mark.parametrize(
    "spec",
    ["timm:resnet10t@/etc/passwd", "open_clip:ViT-B-32@secret.txt", "timm:resnet10t@weights.pt", "timm:../x"],
)
def test_a_spec_that_names_a_path_is_refused(world: dict[str, Any], spec: str) -> None:
    text = detail(submit(world, teacher=spec))
    assert "looks like a file path" in text and "kt admin register-model" in text


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("timm:resnet_18", "did you mean resnet18"),
        ("timm:resnet18@a1_in1", "did you mean a1_in1k"),
        ("open_clip:ViT-B-33@openai", "did you mean ViT-B-32"),
        ("open_clip:ViT-B-32@not_a_tag", "open_clip lists no pretrained tag 'not_a_tag'"),
    ],
)
def test_unknown_names_and_tags_say_what_exists(world: dict[str, Any], spec: str, needle: str) -> None:
    assert needle in detail(submit(world, teacher=spec))


def test_the_spec_must_name_the_registered_arch(world: dict[str, Any]) -> None:
    text = detail(submit(world, teacher="timm:resnet18@registered:tiny"))
    assert "is a resnet10t" in text and "timm:resnet10t@registered:tiny" in text


def test_another_tenants_model_answers_like_a_missing_one(world: dict[str, Any]) -> None:
    # acme's own model, for the rival: the same answer as a name nobody registered
    hidden = detail(submit(world, key="rival", teacher="timm:resnet10t@registered:acme-only"))
    missing = detail(submit(world, key="rival", teacher="timm:resnet10t@registered:acme-none"))
    assert "Unknown registered model" in hidden
    assert hidden.replace("acme-only", "NAME") == missing.replace("acme-none", "NAME")
    # a wrong architecture does not reveal what another tenant's model is either
    assert "Unknown registered model" in detail(
        submit(world, key="rival", teacher="timm:resnet18@registered:acme-only")
    )


def test_a_misspelt_name_gets_a_did_you_mean_among_the_names_the_tenant_may_see(
    world: dict[str, Any],
) -> None:
    assert "Unknown registered model 'tinyy' (did you mean 'tiny'?)" in detail(
        submit(world, teacher="timm:resnet10t@registered:tinyy")
    )
    # acme's own model is never suggested to another tenant
    rival = detail(submit(world, key="rival", teacher="timm:resnet10t@registered:acme-onyl"))
    assert "did you mean" not in rival and "acme-only" not in rival
    mine = detail(submit(world, teacher="timm:resnet10t@registered:acme-onyl"))
    assert "(did you mean 'acme-only'?)" in mine


def test_a_registered_student_is_refused(world: dict[str, Any]) -> None:
    text = detail(submit(world, student="timm:resnet10t@registered:tiny"))
    assert "teachers and gallery encoders only" in text


# --- refusals at registration


def registration_error(settings: Settings, path: Path, **kwargs: Any) -> str:
    init_db(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            with pytest.raises(RegistrationError) as err:
                register_model(session, settings, kwargs.pop("name", "m"), path, **kwargs)
            assert session.scalars(select(RegisteredModel)).all() == []
    finally:
        engine.dispose()
    registry = settings.data_dir / "registry"
    assert not registry.exists() or list(registry.iterdir()) == []  # no staging copy left behind
    return str(err.value)


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        ("pt", ("zip archive", "torch.save", "safetensors")),
        ("zipped", ("zip archive",)),
        ("legacy", ("Python pickle",)),
        ("garbage", ("not a safetensors file",)),
        ("truncated", ("truncated",)),
    ],
)
def test_pickles_and_garbage_are_refused(
    tmp_path: Path, files: dict[str, Path], name: str, needles: tuple[str, ...]
) -> None:
    text = registration_error(make_settings(tmp_path / "data"), files[name], arch="resnet10t")
    for needle in needles:
        assert needle in text, text


def test_weights_of_another_architecture_are_refused(tmp_path: Path, files: dict[str, Path]) -> None:
    """A resnet18 file is no resnet10t (its body differs); only the classifier may differ."""
    text = registration_error(make_settings(tmp_path / "data"), files["r18"], arch="resnet10t")
    assert (
        "does not fit resnet10t" in text
        and "another shape" in text
        and "the classifier fc may differ" in text
    )


def test_registration_limits(tmp_path: Path, files: dict[str, Path]) -> None:
    settings = make_settings(tmp_path / "data")
    small = make_settings(tmp_path / "data", max_model_bytes=1000)
    assert "KT_MAX_MODEL_BYTES" in registration_error(small, files["tiny"], arch="resnet10t")
    assert "must be 1-64 lowercase" in registration_error(
        settings, files["tiny"], name="../up", arch="resnet10t"
    )
    assert "did you mean resnet10t" in registration_error(settings, files["tiny"], arch="resnet10")
    assert "no tenant named 'ghost'" in registration_error(
        settings, files["tiny"], arch="resnet10t", tenant_name="ghost"
    )
    bad_card = tmp_path / "bad.card.json"
    bad_card.write_text(json.dumps({**CARD, "create_model_kwargs": {"checkpoint_path": "/etc/passwd"}}))
    assert "may not set checkpoint_path" in registration_error(settings, files["tiny"], card_path=bad_card)
    bad_card.write_text(json.dumps({**CARD, "weights_sha256": "0" * 64}))
    assert "the card belongs to another file" in registration_error(
        settings, files["tiny"], card_path=bad_card
    )


def test_cli_reports_a_refusal(tmp_path: Path, files: dict[str, Path]) -> None:
    result = CliRunner().invoke(
        cli,
        ["register-model", "m", str(files["pt"]), "--arch", "resnet10t"],
        env={"KT_DATA_DIR": str(tmp_path / "data")},
    )
    assert result.exit_code == 1 and "not a safetensors file" in result.output


def test_header_reader_lists_the_tensors(files: dict[str, Path]) -> None:
    tensors = read_safetensors_header(files["tiny"])
    assert tensors["fc.weight"].shape == (3, 512) and tensors["fc.weight"].dtype == "F32"


# --- resolution, on PostgreSQL


def test_resolution_on_postgres(postgres_url: str, tmp_path: Path, files: dict[str, Path]) -> None:
    settings = make_settings(tmp_path / "data", database_url=postgres_url)
    init_db(postgres_url)
    engine = make_engine(postgres_url)
    try:
        with make_session_factory(engine)() as session:
            owner, other = Tenant(name="pg-owner"), Tenant(name="pg-other")
            session.add_all([owner, other])
            session.commit()
            row = register_model(
                session,
                settings,
                "pg-tiny",
                files["tiny"],
                tenant_name="pg-owner",
                check=lambda arch, kwargs, path: [],  # the real check runs in the SQLite tests
            )
            assert row.card["norm_eval"] is True and row.bytes == files["tiny"].stat().st_size
            resolved = resolve_spec(session, settings, owner, "timm:resnet10t@registered:pg-tiny")
            assert resolved is not None and resolved.spec.endswith("registry/pg-tiny/model.safetensors")
            teacher: dict[str, Any] = {"model": "timm:resnet10t@registered:pg-tiny", "norm_eval": False}
            resolve_teacher(session, settings, owner, teacher)
            assert teacher == {
                "model": resolved.spec,
                "model_kwargs": {"drop_rate": 0.25},
                "norm_eval": False,
            }
            assert resolve_spec(session, settings, owner, "timm:resnet10t") is None
            with pytest.raises(Invalid, match="Unknown registered model 'pg-tiny'"):
                resolve_spec(session, settings, other, "timm:resnet10t@registered:pg-tiny")
            with pytest.raises(RegistrationError, match="registered already"):
                register_model(session, settings, "pg-tiny", files["tiny"], check=lambda *a: [])
            session.delete(row)
            session.commit()
    finally:
        engine.dispose()
