"""Every pipeline stage on the tiny demo task, and the stage contract.

Contract: a stage writes ``outputs.json`` (equal to what it returns) and ``_SUCCESS`` last, leaves no
temp files, and, called again on the same ``out_dir``, returns the same outputs without doing work.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from kt_train import pipeline
from kt_train.config import TrainConfig, parse_config
from kt_train.demo import DEMO_CLASSES
from kt_train.errors import ConfigError, DatasetError
from kt_train.models import load_checkpoint

from ..conftest import BN_TEACHER, NUM_CLASSES, STUDENT, TEST_PER_CLASS, UNLABELED, small_config_dict

CLASSES = sorted(DEMO_CLASSES)


# --------------------------------------------------------------------------- helpers


def _cfg(data: dict[str, Path], out: Path, **overrides: Any) -> TrainConfig:
    return parse_config(small_config_dict(data, out, **overrides))


def _json_roundtrip(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def assert_stage_contract(out_dir: Path, outputs: dict[str, Any]) -> None:
    out = Path(out_dir)
    assert (out / "_SUCCESS").is_file()
    assert json.loads((out / "outputs.json").read_text()) == _json_roundtrip(outputs)
    assert (out / "config.yaml").is_file()
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert not leftovers


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a finished stage must not do any work")


def assert_skips_when_done(
    monkeypatch: pytest.MonkeyPatch,
    stage: Callable,
    cfg: TrainConfig,
    inputs: dict,
    out_dir: Path,
    outputs: dict,
) -> None:
    """Calling a finished stage again returns its outputs at once: nothing is trained, built or written."""
    marker = Path(out_dir) / "_SUCCESS"
    stamps = {p: p.stat().st_mtime_ns for p in Path(out_dir).rglob("*") if p.is_file()}
    with monkeypatch.context() as m:
        for name in (
            "train_loop",
            "create_teacher",
            "create_student",
            "create_backbone",
            "load_checkpoint",
            "evaluate_model",
            "open_labeled",
            "open_unlabeled",
        ):
            m.setattr(pipeline, name, _boom)
        m.setattr("kt_train.export.export_model", _boom)
        again = stage(cfg, dict(inputs), out_dir)
    assert again == _json_roundtrip(outputs)
    assert marker.is_file()
    assert {p: p.stat().st_mtime_ns for p in Path(out_dir).rglob("*") if p.is_file()} == stamps


class LoopSpy:
    """Wraps ``pipeline.train_loop`` to record each call's task, param groups and result."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.real = pipeline.train_loop

    def __call__(self, **kwargs: Any) -> Any:
        res = self.real(**kwargs)
        self.calls.append({**kwargs, "result": res})
        return res

    def by_task(self, task: str) -> dict[str, Any]:
        (call,) = [c for c in self.calls if c["task"] == task]
        return call


def _bn_buffers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


# --------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, demo_data: dict[str, Path]) -> dict[str, Any]:
    """finetune_teacher (linear probe + full finetune with layer decay on test_vit), then distill."""
    root = tmp_path_factory.mktemp("stages")
    cfg = _cfg(
        demo_data,
        root,
        finetune_teacher__full_finetune__steps=3,
        finetune_teacher__layer_decay=0.7,
    )
    spy = LoopSpy()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(pipeline, "train_loop", spy)
        teacher_out = pipeline.finetune_teacher(cfg, {}, root / "finetune_teacher")
        inputs = {"teacher": teacher_out["checkpoint"], "classes": teacher_out["classes"]}
        distill_out = pipeline.distill(cfg, dict(inputs), root / "distill")
    return {
        "cfg": cfg,
        "root": root,
        "spy": spy,
        "teacher": teacher_out,
        "teacher_inputs": inputs,
        "distill": distill_out,
    }


# --------------------------------------------------------------------------- finetune_teacher


def test_finetune_teacher_outputs(base: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    out = base["root"] / "finetune_teacher"
    res = base["teacher"]
    assert_stage_contract(out, res)
    assert res["classes"] == CLASSES
    assert res["checkpoint"] == str(out / "teacher.pt")
    assert res["bad_images"] == []
    assert set(res["timings"]) == {"linear_probe", "full_finetune"}
    history = json.loads((out / "history.json").read_text())
    assert history["linear_probe"][-1]["step"] == 4
    assert history["full_finetune"][-1]["step"] == 3
    assert all(np.isfinite(h["loss"]) for h in history["linear_probe"] + history["full_finetune"])
    teacher, ckpt = load_checkpoint(res["checkpoint"])
    assert ckpt["classes"] == CLASSES
    assert ckpt["lineage"]["teacher"] == "timm:test_vit"
    with torch.no_grad():
        assert teacher.eval()(torch.rand(2, 3, 32, 32)).shape == (2, NUM_CLASSES)
    assert_skips_when_done(monkeypatch, pipeline.finetune_teacher, base["cfg"], {}, out, res)


def test_linear_probe_trains_the_head_only_then_full_finetune_moves_the_trunk(base: dict[str, Any]) -> None:
    spy, out = base["spy"], base["root"] / "finetune_teacher"
    probe = spy.by_task("teacher linear probe")
    teacher = probe["modules"]["teacher"]
    head_ids = {id(p) for p in teacher.head.parameters()}
    probe_ids = {id(p) for g in probe["groups"] for p in g["params"]}
    assert probe_ids == head_ids
    # The trunk after the probe (linear_probe.last.ckpt) differs from the final, fully finetuned one.
    after_probe = torch.load(out / "linear_probe.last.ckpt", weights_only=False)["modules"]["teacher"]
    final = torch.load(out / "teacher.pt", weights_only=False)["state_dict"]
    moved = [
        k
        for k in final
        if k.startswith("net.") and final[k].is_floating_point() and not torch.equal(final[k], after_probe[k])
    ]
    assert moved


def test_full_finetune_uses_layer_decay(base: dict[str, Any]) -> None:
    ft = base["spy"].by_task("teacher finetune")
    scales = sorted({round(g["lr_scale"], 6) for g in ft["groups"]})
    assert len(scales) > 3  # one scale per depth of test_vit
    assert scales[-1] == 1.0
    assert scales[0] < 0.7**3
    teacher = ft["modules"]["teacher"]
    grouped = [p for g in ft["groups"] for p in g["params"]]
    assert {id(p) for p in grouped} == {id(p) for p in teacher.parameters()}  # every parameter trains
    assert len(grouped) == len({id(p) for p in grouped})  # once


def test_finetune_teacher_norm_eval_keeps_bn_statistics(demo_data: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(
        demo_data,
        tmp_path,
        teacher__model=BN_TEACHER,
        teacher__norm_eval=True,
        finetune_teacher__linear_probe__steps=2,
        finetune_teacher__full_finetune__steps=3,
    )
    res = pipeline.finetune_teacher(cfg, {}, tmp_path / "ft")
    assert_stage_contract(tmp_path / "ft", res)
    sd = torch.load(res["checkpoint"], weights_only=False)["state_dict"]
    bn = _bn_buffers(sd)
    assert bn
    for k, v in bn.items():  # still the fresh-init statistics: BN stayed in eval mode throughout
        if k.endswith("running_mean"):
            assert torch.equal(v, torch.zeros_like(v)), k
        elif k.endswith("running_var"):
            assert torch.equal(v, torch.ones_like(v)), k
        else:
            assert int(v) == 0, k
    after_probe = torch.load(tmp_path / "ft" / "linear_probe.last.ckpt", weights_only=False)["modules"][
        "teacher"
    ]
    assert any(
        not torch.equal(sd[k], after_probe[k]) for k in sd if k.endswith(".weight") and k.startswith("net.")
    )


def test_empty_class_folder_is_a_dataset_error(demo_data: dict[str, Path], tmp_path: Path) -> None:
    train = tmp_path / "train"
    shutil.copytree(demo_data["train"], train)
    (train / "zebra").mkdir()
    cfg = _cfg(demo_data, tmp_path / "run", data__train={"path": str(train)})
    with pytest.raises(DatasetError) as ei:
        pipeline.finetune_teacher(cfg, {}, tmp_path / "run" / "finetune_teacher")
    assert "'zebra'" in str(ei.value)
    assert not (tmp_path / "run" / "finetune_teacher" / "_SUCCESS").exists()


def test_corrupt_image_is_reported_not_fatal(demo_data: dict[str, Path], tmp_path: Path) -> None:
    train = tmp_path / "train"
    shutil.copytree(demo_data["train"], train)
    bad = train / CLASSES[1] / "x.jpg"
    bad.write_bytes(b"this is not a jpeg" * 10)
    cfg = _cfg(
        demo_data, tmp_path / "run", data__train={"path": str(train)}, finetune_teacher__linear_probe__steps=2
    )
    out = tmp_path / "run" / "finetune_teacher"
    res = pipeline.finetune_teacher(cfg, {}, out)
    assert_stage_contract(out, res)
    assert [p for p, _ in res["bad_images"]] == [str(bad)]
    assert res["classes"] == CLASSES
    saved = json.loads((out / "outputs.json").read_text())
    assert saved["bad_images"][0][0] == str(bad)


# --------------------------------------------------------------------------- distill


def test_distill_task_oriented(base: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    out, res = base["root"] / "distill", base["distill"]
    assert_stage_contract(out, res)
    assert res["classes"] == CLASSES
    assert res["timings"]["distill"]["resumed_from"] == 0
    history = json.loads((out / "history.json").read_text())["distill"]
    assert history[-1]["step"] == 5
    assert "kd" in history[-1] and "ce" not in history[-1]
    student, ckpt = load_checkpoint(res["checkpoint"])
    assert student.recipe.role == "student" and student.recipe.spec == STUDENT
    lineage = ckpt["lineage"]
    assert lineage["method"] == "task_oriented"
    assert lineage["teacher"] == "timm:test_vit"
    assert lineage["teacher_checkpoint"] == base["teacher"]["checkpoint"]
    assert lineage["transfer_set_size"] == UNLABELED
    # the loop's checkpoint holds the trained student at its last step
    last = torch.load(out / "last.ckpt", weights_only=False)
    assert last["step"] == 5
    for k, v in last["modules"]["student"].items():
        assert torch.equal(v, ckpt["state_dict"][k]), k
    assert_skips_when_done(monkeypatch, pipeline.distill, base["cfg"], base["teacher_inputs"], out, res)


def test_distill_with_cross_entropy_term(
    base: dict[str, Any], demo_data: dict[str, Path], tmp_path: Path
) -> None:
    cfg = _cfg(demo_data, tmp_path, distill__ce_weight=0.5, distill__steps=3)
    res = pipeline.distill(cfg, dict(base["teacher_inputs"]), tmp_path / "distill")
    assert_stage_contract(tmp_path / "distill", res)
    last = json.loads((tmp_path / "distill" / "history.json").read_text())["distill"][-1]
    assert last["step"] == 3
    assert np.isfinite(last["ce"]) and np.isfinite(last["kd"])
    assert last["loss"] > last["kd"]  # the CE term is added


@pytest.mark.parametrize(
    ("feature_loss", "feature_source"), [("cosine", "pretrained"), ("contrastive", "finetuned")]
)
def test_distill_task_agnostic(
    feature_loss: str,
    feature_source: str,
    base: dict[str, Any],
    demo_data: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = _cfg(
        demo_data,
        tmp_path,
        distill__method="task_agnostic",
        distill__feature_loss=feature_loss,
        distill__feature_source=feature_source,
        distill__steps=3,
    )
    inputs = dict(base["teacher_inputs"]) if feature_source == "finetuned" else {}
    spy = LoopSpy()
    monkeypatch.setattr(pipeline, "train_loop", spy)
    out = tmp_path / "distill"
    res = pipeline.distill(cfg, inputs, out)
    monkeypatch.undo()
    assert_stage_contract(out, res)
    assert res["classes"] == CLASSES
    assert res["metrics"] == {}
    (call,) = spy.calls
    assert set(call["modules"]) == {"student", "projection"}
    projection = call["modules"]["projection"]
    assert isinstance(projection, nn.Linear) and projection.out_features == 64  # test_vit's feature width
    history = json.loads((out / "history.json").read_text())["distill"]
    assert history[-1]["step"] == 3 and np.isfinite(history[-1]["loss"])
    if feature_loss == "cosine":
        assert 0 <= history[-1]["loss"] <= 2
    _, ckpt = load_checkpoint(res["checkpoint"])
    assert ckpt["lineage"]["method"] == "task_agnostic"
    assert ckpt["lineage"]["feature_loss"] == feature_loss
    assert_skips_when_done(monkeypatch, pipeline.distill, cfg, inputs, out, res)


def test_distill_without_transfer_set_is_a_config_error(
    base: dict[str, Any], demo_data: dict[str, Path], tmp_path: Path
) -> None:
    cfg = _cfg(demo_data, tmp_path, data__transfer=None)
    with pytest.raises(ConfigError, match=r"data\.transfer"):
        pipeline.distill(cfg, dict(base["teacher_inputs"]), tmp_path / "d1")
    cfg = _cfg(demo_data, tmp_path, data__transfer=None, distill__method="task_agnostic")
    with pytest.raises(ConfigError, match=r"data\.transfer"):
        pipeline.distill(cfg, {}, tmp_path / "d2")
    assert not (tmp_path / "d1" / "_SUCCESS").exists()


def test_distill_without_teacher_is_a_config_error(demo_data: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="finetune_teacher"):
        pipeline.distill(_cfg(demo_data, tmp_path), {}, tmp_path / "d")


# --------------------------------------------------------------------------- finetune_student


def test_finetune_student_from_scratch(
    demo_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(demo_data, tmp_path, finetune_student__steps=3)
    out = tmp_path / "fs"
    res = pipeline.finetune_student(cfg, {}, out)
    assert_stage_contract(out, res)
    assert res["classes"] == CLASSES
    history = json.loads((out / "history.json").read_text())["finetune"]
    assert history[-1]["step"] == 3 and 0 <= history[-1]["acc"] <= 1
    student, ckpt = load_checkpoint(res["checkpoint"])
    assert ckpt["lineage"] == {"method": "scratch"}
    assert student.recipe.num_classes == NUM_CLASSES
    assert_skips_when_done(monkeypatch, pipeline.finetune_student, cfg, {}, out, res)


def test_finetune_student_starts_from_the_distilled_checkpoint(
    base: dict[str, Any], demo_data: dict[str, Path], tmp_path: Path
) -> None:
    distilled = base["distill"]["checkpoint"]
    # steps=0: the result is exactly the distilled student (no re-init, no head swap)
    cfg = _cfg(demo_data, tmp_path, finetune_student__steps=0)
    res = pipeline.finetune_student(cfg, {"student": distilled, "classes": CLASSES}, tmp_path / "fs0")
    _, src = load_checkpoint(distilled)
    _, ckpt = load_checkpoint(res["checkpoint"])
    for k, v in src["state_dict"].items():
        assert torch.equal(ckpt["state_dict"][k], v), k
    assert ckpt["lineage"]["method"] == "task_oriented"  # the distillation lineage is carried on
    assert ckpt["lineage"]["distilled_checkpoint"] == distilled
    # a few steps move it
    cfg = _cfg(demo_data, tmp_path, finetune_student__steps=2)
    res = pipeline.finetune_student(cfg, {"student": distilled}, tmp_path / "fs2")
    assert_stage_contract(tmp_path / "fs2", res)
    _, ckpt = load_checkpoint(res["checkpoint"])
    assert any(
        not torch.equal(ckpt["state_dict"][k], v)
        for k, v in src["state_dict"].items()
        if v.is_floating_point()
    )


def test_finetune_student_scratch_lr_and_norm_eval(
    base: dict[str, Any], demo_data: dict[str, Path], tmp_path: Path
) -> None:
    # scratch_lr applies only without a distilled student; lr otherwise
    cfg = _cfg(
        demo_data,
        tmp_path,
        finetune_student__steps=2,
        finetune_student__lr=1e-4,
        finetune_student__scratch_lr=0.05,
    )
    res = pipeline.finetune_student(cfg, {"classes": CLASSES}, tmp_path / "scratch")
    hist = json.loads((tmp_path / "scratch" / "history.json").read_text())["finetune"]
    assert max(h["lr"] for h in hist) > 1e-3
    distilled = base["distill"]["checkpoint"]
    res = pipeline.finetune_student(cfg, {"student": distilled}, tmp_path / "dist")
    hist = json.loads((tmp_path / "dist" / "history.json").read_text())["finetune"]
    assert max(h["lr"] for h in hist) <= 1e-4
    # norm_eval: the distilled batch-norm statistics survive the finetune unchanged
    cfg = _cfg(demo_data, tmp_path, finetune_student__steps=2, finetune_student__norm_eval=True)
    res = pipeline.finetune_student(cfg, {"student": distilled}, tmp_path / "ne")
    _, src = load_checkpoint(distilled)
    _, ckpt = load_checkpoint(res["checkpoint"])
    stats = {k: v for k, v in _bn_buffers(src["state_dict"]).items() if "running" in k}
    assert stats
    for k, v in stats.items():
        assert torch.equal(ckpt["state_dict"][k], v), k


def test_finetune_student_keeps_a_task_distilled_student_when_after_distillation_is_false(
    base: dict[str, Any], demo_data: dict[str, Path], tmp_path: Path
) -> None:
    distilled = base["distill"]["checkpoint"]
    _, src = load_checkpoint(distilled)
    assert src["lineage"]["method"] == "task_oriented"
    cfg = _cfg(demo_data, tmp_path, finetune_student__steps=3, finetune_student__after_distillation=False)
    res = pipeline.finetune_student(cfg, {"student": distilled}, tmp_path / "kept")
    assert_stage_contract(tmp_path / "kept", res)
    _, ckpt = load_checkpoint(res["checkpoint"])
    assert ckpt["lineage"]["finetune"].startswith("skipped")
    for k, v in src["state_dict"].items():
        assert torch.equal(ckpt["state_dict"][k], v), k
    # a student from scratch is still trained: the flag only keeps a task-distilled one
    res = pipeline.finetune_student(cfg, {"classes": CLASSES}, tmp_path / "scratch")
    hist = json.loads((tmp_path / "scratch" / "history.json").read_text())["finetune"]
    assert len(hist) >= 1


# --------------------------------------------------------------------------- evaluate and export


def test_evaluate(base: dict[str, Any], demo_data: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, out = base["cfg"], base["root"] / "evaluate"
    inputs = {"student": base["distill"]["checkpoint"], "teacher": base["teacher"]["checkpoint"]}
    res = pipeline.evaluate(cfg, inputs, out)
    assert_stage_contract(out, res)
    metrics = json.loads((out / "metrics.json").read_text())
    assert res["metrics"] == str(out / "metrics.json")
    n_test = TEST_PER_CLASS * NUM_CLASSES
    for role in ("student", "teacher"):
        m = metrics[role]
        assert res[f"{role}_top1"] == m["top1"]
        assert 0 <= m["top1"] <= 100
        assert m["n"] == n_test
        assert m["classes"] == CLASSES
        assert list(m["per_class"]) == CLASSES
        conf = np.array(m["confusion"])
        assert conf.shape == (NUM_CLASSES, NUM_CLASSES)
        assert conf.sum() == n_test
        assert (conf.sum(1) == TEST_PER_CLASS).all()  # rows are the true classes
        assert m["top1"] == pytest.approx(np.trace(conf) / n_test * 100, abs=1e-3)
        for k, c in enumerate(CLASSES):
            assert m["per_class"][c] == pytest.approx(conf[k, k] / TEST_PER_CLASS * 100, abs=1e-3)
    assert_skips_when_done(monkeypatch, pipeline.evaluate, cfg, inputs, out, res)


def test_evaluate_without_models_is_a_config_error(base: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a model"):
        pipeline.evaluate(base["cfg"], {}, tmp_path / "ev")


def test_export(base: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, out = base["cfg"], base["root"] / "export"
    inputs = {"student": base["distill"]["checkpoint"]}
    res = pipeline.export(cfg, inputs, out)
    assert_stage_contract(out, res)
    assert set(res) == {"safetensors", "onnx", "card", "formats", "failed_formats", "parity"}
    assert res["formats"] == ["safetensors", "onnx"] and res["failed_formats"] == {}
    for fmt in res["formats"] + ["card"]:
        assert Path(res[fmt]).is_file() and Path(res[fmt]).parent == out
    assert res["parity"]["onnx"]["argmax_agree"] == res["parity"]["onnx"]["inputs"]
    assert not (out / "model.torchscript.pt").exists()  # not asked for

    student, ckpt = load_checkpoint(inputs["student"])
    net = student.net.eval()
    x = student.preprocess(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        ref = net(x)
    plain = timm.create_model("test_efficientnet", num_classes=NUM_CLASSES)
    plain.load_state_dict(safetensors.torch.load_file(res["safetensors"]), strict=True)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), ref)

    sess = ort.InferenceSession(res["onnx"], providers=["CPUExecutionProvider"])
    (onnx_out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(onnx_out, ref.numpy(), atol=1e-4, rtol=0)

    card = json.loads(Path(res["card"]).read_text())
    assert card["classes"] == CLASSES == ckpt["classes"]
    assert card["preprocessing"]["input_size"] == 32
    assert card["preprocessing"]["mean"] == list(student.data_config.mean)
    assert card["lineage"]["student"] == STUDENT
    assert card["lineage"]["method"] == "task_oriented"
    assert card["failed_formats"] == {} and card["export"]["parity"] == res["parity"]
    assert "test" not in card["metrics"]  # evaluate did not run before it
    assert_skips_when_done(monkeypatch, pipeline.export, cfg, inputs, out, res)


def _sabotage_onnx(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime picks another class than torch for every input."""
    from kt_train import export as E

    real = E._run_onnx

    def run(path: Path, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], int | None]:
        got, opset = real(path, xs)
        return [g.flip(-1) * 10 for g in got], opset

    monkeypatch.setattr(E, "_run_onnx", run)


def test_export_carries_test_metrics_and_survives_a_failed_format(
    base: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """evaluate first, then export: the card has the test metrics; ONNX failing its check leaves
    the safetensors model and a card that says why; exporting again adds the format."""
    cfg = base["cfg"]
    inputs: dict[str, Any] = {"student": base["distill"]["checkpoint"]}
    ev = pipeline.evaluate(cfg, dict(inputs), tmp_path / "evaluate")
    pipeline.wire_outputs("evaluate", ev, inputs)
    assert inputs["test_metrics"] == ev["metrics"]
    out = tmp_path / "export"
    with monkeypatch.context() as m:
        _sabotage_onnx(m)
        res = pipeline.export(cfg, dict(inputs), out)
    assert_stage_contract(out, res)
    assert res["formats"] == ["safetensors"] and set(res["failed_formats"]) == {"onnx"}
    assert "argmax disagrees" in res["failed_formats"]["onnx"] and "onnx" not in res
    assert not (out / "model.onnx").exists()
    card = json.loads(Path(res["card"]).read_text())
    assert card["files"] == {"safetensors": "model.safetensors"}
    assert card["failed_formats"] == res["failed_formats"]
    assert card["metrics"]["test"]["top1"] == ev["student_top1"]
    assert card["metrics"]["test"]["n"] == TEST_PER_CLASS * NUM_CLASSES
    weights_sha = card["sha256"]["safetensors"]

    # the stage again, with the exporter fixed: ONNX is added, safetensors kept
    again = pipeline.export(cfg, dict(inputs), out)
    assert_stage_contract(out, again)
    assert again["formats"] == ["safetensors", "onnx"] and again["failed_formats"] == {}
    card = json.loads(Path(again["card"]).read_text())
    assert card["sha256"]["safetensors"] == weights_sha and set(card["files"]) == {"safetensors", "onnx"}
    assert card["metrics"]["test"]["top1"] == ev["student_top1"]
    assert_skips_when_done(monkeypatch, pipeline.export, cfg, inputs, out, again)


def test_run_order_puts_evaluate_before_export() -> None:
    assert pipeline.run_order(["finetune_teacher", "distill", "export", "evaluate"]) == [
        "finetune_teacher",
        "distill",
        "evaluate",
        "export",
    ]
    assert pipeline.run_order(["evaluate", "export"]) == ["evaluate", "export"]
    assert pipeline.run_order(["export"]) == ["export"]


def test_finished_inputs_feed_a_stage_run_alone(tmp_path: Path) -> None:
    from kt_train.io import mark_done

    (tmp_path / "finetune_student").mkdir()
    mark_done(tmp_path / "finetune_student", {"checkpoint": "s.pt", "classes": ["a", "b"]})
    (tmp_path / "evaluate").mkdir()
    mark_done(tmp_path / "evaluate", {"metrics": "m.json", "student_top1": 50.0})
    (tmp_path / "distill").mkdir()  # unfinished: ignored
    assert pipeline.finished_inputs(tmp_path, ["export"]) == {
        "student": "s.pt",
        "classes": ["a", "b"],
        "test_metrics": "m.json",
    }
    # a stage after the first one run never feeds it (its outputs are of an older model)
    assert pipeline.finished_inputs(tmp_path, ["finetune_student", "export"]) == {}


def test_export_without_student_is_a_config_error(base: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="student"):
        pipeline.export(base["cfg"], {"teacher": base["teacher"]["checkpoint"]}, tmp_path / "ex")


# --------------------------------------------------------------------------- finetune check (after_distillation auto)


def test_check_split_holds_out_a_share_of_each_class_and_leaves_two() -> None:
    from kt_train.data import Item

    ds = type("DS", (), {})()
    ds.items = [
        Item(key=f"{c}{i}", label=c, shard=0) for c, n in enumerate([10, 5, 3, 2, 1]) for i in range(n)
    ]
    kept, held = pipeline.check_split(ds, 0.2, seed=0)  # type: ignore[arg-type]
    assert sorted(kept + held) == list(range(len(ds.items))) and not set(kept) & set(held)
    held_per_class = [sum(ds.items[i].label == c for i in held) for c in range(5)]
    assert held_per_class == [2, 1, 1, 0, 0]  # round(0.2 n), at least 1, two left; none below 3 images
    assert pipeline.check_split(ds, 0.2, seed=0) == (kept, held)  # the same split on a resume
    assert pipeline.check_split(ds, 0.2, seed=1)[1] != held
    _, most = pipeline.check_split(ds, 0.9, seed=0)
    assert [sum(ds.items[i].label == c for i in most) for c in range(5)] == [8, 3, 1, 0, 0]


def _weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_check_judges_on_held_out_labels_and_the_result_follows_it(
    base: dict[str, Any], demo_data: dict[str, Path], tmp_path: Path
) -> None:
    from kt_train.evaluate import evaluate_model

    distilled = base["distill"]["checkpoint"]
    student, src = load_checkpoint(distilled)
    cfg = _cfg(demo_data, tmp_path, finetune_student__steps=3, finetune_student__after_distillation="auto")
    res = pipeline.finetune_student(cfg, {"student": distilled}, tmp_path / "auto")
    assert_stage_contract(tmp_path / "auto", res)
    decision = json.loads((tmp_path / "auto" / "finetune_check.json").read_text())
    _, ckpt = load_checkpoint(res["checkpoint"])
    assert ckpt["lineage"]["finetune_check"] == decision
    # the recorded score of the distilled student is its top-1 on the held-out slice, recomputed
    train = pipeline.open_labeled(cfg.data.train, what="train", classes=CLASSES)
    _, held = pipeline.check_split(train, cfg.finetune_student.check_fraction, cfg.seed)
    assert len(held) == NUM_CLASSES and decision["on"] == f"{len(held)} held-out labeled images"
    recomputed = evaluate_model(student, train.subset(held), device=torch.device("cpu"))["top1"]
    assert decision["distilled_top1"] == recomputed
    assert decision["finetune"] == (decision["finetuned_top1"] > decision["distilled_top1"])
    history = json.loads((tmp_path / "auto" / "history.json").read_text())
    assert history["finetune_check"][-1]["step"] == 3  # the check's finetune ran on the rest
    # kept: the distilled weights as they were; finetuned: changed
    assert _weights_equal(src["state_dict"], ckpt["state_dict"]) == (not decision["finetune"])


@pytest.mark.parametrize("helps", [True, False])
def test_finetune_check_finetunes_on_all_labels_only_when_the_check_says_so(
    base: dict[str, Any],
    demo_data: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    helps: bool,
) -> None:
    seen: list[int] = []

    def verdict(distilled: Any, tuned: Any, judge: Any, device: Any, *, on: str) -> dict[str, Any]:
        seen.append(len(judge))
        return {
            "finetune": helps,
            "on": on,
            "reason": f"{'finetuned' if helps else 'kept as distilled'} (test)",
        }

    monkeypatch.setattr(pipeline, "_compare", verdict)
    distilled = base["distill"]["checkpoint"]
    _, src = load_checkpoint(distilled)
    cfg = _cfg(demo_data, tmp_path, finetune_student__steps=3, finetune_student__after_distillation="auto")
    out = tmp_path / "run"
    res = pipeline.finetune_student(cfg, {"student": distilled}, out)
    _, ckpt = load_checkpoint(res["checkpoint"])
    assert seen == [NUM_CLASSES]
    assert _weights_equal(src["state_dict"], ckpt["state_dict"]) == (not helps)
    assert ckpt["lineage"].get("finetune", "").startswith("skipped") == (not helps)
    history = json.loads((out / "history.json").read_text())
    steps = [h["step"] for h in history["finetune"]]
    assert (steps[-1] == 3) if helps else not steps
    # a resumed stage (the decision on disk) does not check again
    (out / "_SUCCESS").unlink()
    monkeypatch.setattr(pipeline, "_compare", _boom)
    again = pipeline.finetune_student(cfg, {"student": distilled}, out)
    _, ckpt2 = load_checkpoint(again["checkpoint"])
    assert _weights_equal(ckpt["state_dict"], ckpt2["state_dict"])


def test_finetune_check_uses_data_val_when_given_and_keeps_the_finetuned_copy(
    base: dict[str, Any], demo_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    judged: list[int] = []
    real = pipeline._compare

    def spy(distilled: Any, tuned: Any, judge: Any, device: Any, *, on: str) -> dict[str, Any]:
        judged.append(len(judge))
        return {**real(distilled, tuned, judge, device, on=on), "finetune": True}

    monkeypatch.setattr(pipeline, "_compare", spy)
    distilled = base["distill"]["checkpoint"]
    _, src = load_checkpoint(distilled)
    cfg = _cfg(
        demo_data,
        tmp_path,
        finetune_student__steps=3,
        finetune_student__after_distillation="auto",
        data__val={"path": str(demo_data["test"])},
    )
    res = pipeline.finetune_student(cfg, {"student": distilled}, tmp_path / "val")
    assert judged == [TEST_PER_CLASS * NUM_CLASSES]  # judged on data.val, no labeled image held out
    _, ckpt = load_checkpoint(res["checkpoint"])
    assert ckpt["lineage"]["finetune_check"]["on"] == "data.val"
    history = json.loads((tmp_path / "val" / "history.json").read_text())
    assert "finetune_check" not in history and history["finetune"][-1]["step"] == 3
    assert not _weights_equal(src["state_dict"], ckpt["state_dict"])


def test_finetune_check_is_planned_as_its_own_phase(demo_data: dict[str, Path], tmp_path: Path) -> None:
    from kt_train.progress import STUDENT_FINETUNE, STUDENT_FINETUNE_CHECK, plan_phases

    def names(**overrides: Any) -> dict[str, float]:
        return {
            p.name: p.units
            for p in plan_phases(_cfg(demo_data, tmp_path, finetune_student__steps=7, **overrides))
        }

    auto = names(finetune_student__after_distillation="auto")
    assert auto[STUDENT_FINETUNE_CHECK] == 7 and auto[STUDENT_FINETUNE] == 7
    assert STUDENT_FINETUNE_CHECK not in names(finetune_student__after_distillation=True)
    assert STUDENT_FINETUNE_CHECK not in names(
        finetune_student__after_distillation="auto", data__val={"path": str(demo_data["test"])}
    )
