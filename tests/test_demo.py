"""The demo's parts that need no server: its generated world, its stand-in VFM (pretrained,
checked and registered as ``kt admin register-model`` takes it), the two jobs it submits (the
scratch one trains with the distilled one's steps, batch and learning rate, without distillation),
its pass/fail rule, and ``kt demo`` / ``bash .ci/demo`` being the same command. The whole demo,
at a reduced size, runs in tests/e2e/test_e2e.py::test_demo_on_the_embedded_default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kt_train.demo import TASK_CLASSES, WORLD_FAMILIES, task_families, world_image, write_world
from service import demo

REPO = Path(__file__).resolve().parents[1]


def test_world_is_the_task_and_its_gallery(tmp_path: Path) -> None:
    world = write_world(tmp_path / "w", per_class=3, test_per_class=2, gallery=20, seed=5)
    assert world["classes"] == list(TASK_CLASSES) and len(TASK_CLASSES) == 4
    for split, n in (("train", 3), ("test", 2)):
        for cls in TASK_CLASSES:
            assert len(list((tmp_path / "w" / split / cls).glob("*.png"))) == n
    assert len(list((tmp_path / "w" / "gallery").glob("*.png"))) == 20
    again = write_world(tmp_path / "again", per_class=3, test_per_class=2, gallery=20, seed=5)
    first, second = (sorted((Path(w["train"])).rglob("*.png")) for w in (world, again))
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]  # a seed is a world
    # every user class is a group of world families; the pretext task has other, finer labels
    groups = [set(task_families(cls)) for cls in TASK_CLASSES]
    assert all(groups) and not set.intersection(*groups)
    assert len(WORLD_FAMILIES) == 20 > len(set.union(*groups))
    img = world_image(0, np.random.default_rng(0), 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8


def test_stand_in_vfm_registers_as_kt_admin_register_model_takes_it(tmp_path: Path) -> None:
    from kt_train.demo import pretrain_teacher
    from kt_train.weights import check_weights
    from service.db.session import init_db, make_engine, make_session_factory
    from service.registry import register_model
    from service.settings import Settings

    args = {"arch": demo.TEACHER_ARCH, "model_kwargs": demo.TEACHER_KWARGS, "steps": 2, "batch_size": 4}
    res = pretrain_teacher(tmp_path / "teacher", **args)  # type: ignore[arg-type]
    card = json.loads(Path(res["card"]).read_text())
    assert card["arch"] == "test_resnet" and card["create_model_kwargs"] == {"layers": [2, 2, 2, 2]}
    assert card["input_size"] == [3, 32, 32] and res["parameters"] > 0
    assert check_weights(card["arch"], card["create_model_kwargs"], res["weights"]) == []
    # the same arguments again: the weights are reused, not trained again
    mtime = Path(res["weights"]).stat().st_mtime_ns
    assert pretrain_teacher(tmp_path / "teacher", **args)["weights"] == res["weights"]  # type: ignore[arg-type]
    assert Path(res["weights"]).stat().st_mtime_ns == mtime
    url = f"sqlite:///{tmp_path / 'kt.db'}"
    init_db(url)
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            row = register_model(
                session, Settings(data_dir=str(tmp_path / "data")), "demo-vfm", res["weights"],
                card_path=res["card"], check=check_weights,
            )  # fmt: skip
            assert (row.arch, row.card["create_model_kwargs"]) == ("test_resnet", {"layers": [2, 2, 2, 2]})
    finally:
        engine.dispose()
    # the demo's shortcut answers the registration's shape check with the preparing process's
    check = demo._checked({**res, "weights_problems": []})
    assert check("test_resnet", {"layers": [2, 2, 2, 2]}, Path(res["weights"])) == []
    assert check("test_resnet", {}, Path(res["weights"]))  # not what was checked: refused


def test_scratch_job_is_the_distilled_one_without_distillation() -> None:
    from service.schemas import JobCreate

    args = demo.parse_args(["--steps", "40,120", "--lr", "0.02", "--batch-size", "48", "--seed", "3"])
    distilled = demo.distilled_request(args, "timm:test_resnet@registered:demo-vfm", "ds1", "ds2", "ts1")
    scratch = demo.scratch_request(distilled, args.batch_size)
    JobCreate.model_validate(distilled)  # both are requests the service accepts
    JobCreate.model_validate(scratch)
    assert distilled["recipe"]["distill"] == {"steps": 120, "lr": 0.02, "batch_size": 48}
    assert distilled["recipe"]["finetune_student"] == {"enabled": False}  # the student is the distilled one
    assert scratch["recipe"]["distill"]["steps"] == 0 and "transfer_set_id" not in scratch
    assert scratch["recipe"]["finetune_student"] == {"steps": 120, "lr": 0.02, "after_distillation": True}
    assert scratch["batch_size"] == {"finetune_student": 48}
    for key in ("dataset_id", "test_dataset_id", "student", "image_size", "seed"):
        assert scratch[key] == distilled[key], key


def test_demo_fails_unless_the_distilled_student_beats_the_scratch_one() -> None:
    summary = {"distilled_student": {"top1": 80.0}, "scratch_student": {"top1": 40.0}}
    assert demo.verdict(summary, 5.0) is None
    summary["scratch_student"]["top1"] = 77.0
    assert "does not beat the scratch student (77.0%) by 5 points" in str(demo.verdict(summary, 5.0))
    assert demo.verdict({"distilled_student": {"top1": 10.0}}, 5.0) is None  # --no-baseline


def test_demo_with_url_needs_a_teacher(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        demo.parse_args(["--url", "http://127.0.0.1:9", "--api-key", "kt_x"])
    assert "--url needs --teacher" in capsys.readouterr().err


def test_kt_demo_is_the_ci_demo() -> None:
    from kt_client.cli import app

    res = CliRunner().invoke(app, ["demo", "--help"])
    assert res.exit_code == 0, res.output
    assert "usage: kt demo" in res.output and "--min-gain" in res.output  # service.demo's own options
    ci = (REPO / ".ci" / "demo").read_text()
    assert ".venv/bin/kt demo " in ci
    readme = (REPO / "README.md").read_text()
    assert readme.index("bash .ci/demo") < readme.index("bash .ci/test")  # the README's first command
    assert "kt demo" in readme
