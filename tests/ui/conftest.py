"""A tenant with a FINISHED job, built for real once per session: a dataset stored where uploads
go, a gallery built by ``kt_train`` from generated images, and a pipeline job (teacher finetune,
curation from that gallery, distillation, student finetune, export, evaluation; tiny timm models
on CPU) run to the end by ``worker.runner.run_job`` against the same database and data dir that
the app under test reads. Plus a second tenant that must never see any of it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service import storage
from service.admin import create_tenant_key, register_gallery
from service.db.models import Dataset, Job, Model, Tenant, TransferSet
from service.db.session import init_db, make_engine, make_session_factory
from service.settings import Settings
from tests.conftest import small_config_dict

GALLERY_ENCODER = "timm:test_efficientnet"  # random init, 32 px: seconds on CPU


@dataclass(frozen=True)
class World:
    settings: Settings
    key: str  # the tenant that owns everything below
    other_key: str  # another tenant: owns nothing here
    tenant_id: str
    dataset_id: str
    job_id: str
    model_id: str
    transfer_set_id: str
    classes: list[str]
    class_counts: dict[str, int]
    student_top1: float
    student_per_class: dict[str, float]
    confusion: list[list[int]]


def _store_dataset(settings: Settings, tenant_id: str, name: str, source: Path) -> Dataset:
    """A ready dataset, laid out exactly as an upload leaves it (``service.storage``)."""
    ds = Dataset(tenant_id=tenant_id, name=name, status="ready")
    from service.db.models import new_id

    ds.id = new_id()
    images = storage.dataset_dir(settings.data_dir, tenant_id, ds.id) / "images"
    shutil.copytree(source, images)
    classes = sorted(p.name for p in images.iterdir() if p.is_dir())
    counts = {c: len(list((images / c).iterdir())) for c in classes}
    ds.classes, ds.class_counts, ds.num_images = classes, counts, sum(counts.values())
    return ds


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from kt_train.demo import make_demo_data
    from kt_train.gallery import build_gallery
    from worker import runner

    root = tmp_path_factory.mktemp("ui_world")
    data = make_demo_data(root / "demo", per_class=6, test_per_class=4, unlabeled=96, size=32)
    settings = Settings(data_dir=root / "data", database_url=f"sqlite:///{root / 'kt.db'}")
    settings.data_dir.mkdir(parents=True)
    init_db(settings.database_url)
    engine = make_engine(settings.database_url)
    factory = make_session_factory(engine)
    gallery_dir = root / "gallery"
    build_gallery([data["transfer"]], gallery_dir, encoder=GALLERY_ENCODER, image_size=32, index_kind="flat")
    with factory() as s:
        key = create_tenant_key(s, "acme")
        other_key = create_tenant_key(s, "globex")
        tenant = s.query(Tenant).filter_by(name="acme").one()
        gallery = register_gallery(s, gallery_dir)
        train = _store_dataset(settings, tenant.id, "shapes-train", data["train"])
        test = _store_dataset(settings, tenant.id, "shapes-test", data["test"])
        s.add_all([train, test])
        s.commit()
        config = small_config_dict(
            {
                "train": Path(runner_images(settings, train)),
                "test": Path(runner_images(settings, test)),
                "transfer": data["transfer"],
            },
            root / "ignored",
            finetune_teacher__linear_probe__steps=30,
            distill__steps=30,
            finetune_student__steps=20,
            curate={
                "gallery": str(gallery_dir),
                "size": 72,
                "crops": 1,
                "dedup_threshold": None,
                "leakage_threshold": None,
                "guard_eval_sets": False,
            },
            export__formats=["safetensors", "onnx"],
        )
        job = Job(
            tenant_id=tenant.id,
            kind="pipeline",
            params={"config": config, "request": {"dataset_id": train.id, "test_dataset_id": test.id}},
        )
        s.add(job)
        s.commit()
        job_id, tenant_id, train_id, gallery_id = job.id, tenant.id, train.id, gallery.id
        classes, counts = list(train.classes), dict(train.class_counts)

    status = runner.run_job(factory, job_id, settings, log_interval_s=0)
    with factory() as s:
        row = s.get(Job, job_id)
        assert row is not None
        assert status == "succeeded", f"the UI test's job did not finish: {row.error}"
        model = s.query(Model).filter_by(job_id=job_id).one()
        # the same curation, as the API records a transfer set (its files are the job's curate stage)
        ts = TransferSet(tenant_id=tenant_id, dataset_id=train_id, gallery_id=gallery_id, job_id=job_id)
        s.add(ts)
        s.commit()
        student = row.metrics["test"]["student"]
        result = World(
            settings=settings,
            key=key,
            other_key=other_key,
            tenant_id=tenant_id,
            dataset_id=train_id,
            job_id=job_id,
            model_id=model.id,
            transfer_set_id=ts.id,
            classes=classes,
            class_counts=counts,
            student_top1=float(student["top1"]),
            student_per_class=dict(student["per_class"]),
            confusion=student["confusion"],
        )
    engine.dispose()
    yield result


def runner_images(settings: Settings, ds: Dataset) -> str:
    return str(storage.dataset_dir(settings.data_dir, ds.tenant_id, ds.id) / "images")
