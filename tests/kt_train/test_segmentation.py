"""Segmentation in the library (issue 15): image + index-mask datasets and their refusals, image
and mask moved together by the augmentation, the LR-ASPP model on timm backbones, void ignored by
the loss and the metrics, mIoU against a hand-computed example, and per-pixel distillation."""

from __future__ import annotations

import json
import math
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kt_train.errors import DatasetError
from kt_train.tasks.segmentation import (
    ConfusionMatrix,
    JointAugment,
    SegmentationDataset,
    SegmentationRecipe,
    TeacherMaps,
    build_segmentation_model,
    build_teacher_maps,
    distill_segmentation,
    evaluate_segmentation,
    fit_segmentation,
    output_grid,
    pixel_distillation_loss,
    segmentation_loss,
)

PALETTE = np.array([[220, 40, 40], [40, 200, 60], [50, 70, 230]], dtype=np.uint8)  # class -> colour
VOID = 255


def scene(
    rng: np.random.Generator, h: int = 48, w: int = 64, block: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """A frame of coloured blocks whose colour is its class (left half never class 2, so a flip
    applied to one of image and mask shows), a void border of one block."""
    gh, gw = h // block, w // block
    grid = rng.integers(0, 3, size=(gh, gw))
    grid[:, : gw // 2] = rng.integers(0, 2, size=(gh, gw // 2))
    mask = np.kron(grid, np.ones((block, block), dtype=np.int64)).astype(np.uint8)
    img = PALETTE[mask]
    mask[:block, :] = VOID
    return img, mask


def write_dataset(root: Path, n: int = 6, *, seed: int = 0, split: str = "train") -> Path:
    rng = np.random.default_rng(seed)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "masks" / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, mask = scene(rng)
        Image.fromarray(img).save(root / "images" / split / f"f{i:03d}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / split / f"f{i:03d}.png")
    (root / "classes.json").write_text(json.dumps({"classes": ["red", "green", "blue"], "void_index": VOID}))
    return root


def zip_dir(src: Path, dest: Path, top: str = "camvid") -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, f"{top}/{p.relative_to(src).as_posix()}")
    return dest


# --------------------------------------------------------------------------- data


def test_pairs_from_a_folder_and_from_a_zip_with_a_top_folder(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", n=5)
    write_dataset(root, n=2, seed=1, split="test")
    folder = SegmentationDataset(root)
    zipped = SegmentationDataset(zip_dir(root, tmp_path / "ds.zip"))
    assert len(folder) == len(zipped) == 7
    assert folder.classes == zipped.classes == ["red", "green", "blue"] and folder.void_index == VOID
    assert len(SegmentationDataset(root, split="test")) == 2
    assert len(SegmentationDataset(root, stems=["f000", "f001"], split="train")) == 2
    img, mask = zipped.load(0)
    assert img.size == (64, 48) and mask.shape == (48, 64) and set(np.unique(mask)) <= {0, 1, 2, VOID}


def test_palette_masks_are_read_as_their_indices(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", n=1)
    m = Image.open(root / "masks/train/f000.png")
    values = np.asarray(m)
    p = Image.fromarray(values, mode="P")
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [9] * (256 * 3 - 9))
    p.save(root / "masks/train/f000.png")
    assert (SegmentationDataset(root).load(0)[1] == values).all()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("wrong_size", "masks/train/f001.png is 32x48 but its image images/train/f001.png is 64x48"),
        ("out_of_range", "masks/train/f001.png has values [7]"),
        ("missing_mask", "image(s) have no mask, e.g. images/train/f001.png"),
        ("mask_without_image", "mask(s) have no image, e.g. masks/train/f001.png"),
        ("colour_mask", "masks/train/f001.png is a RGB image"),
        ("no_classes", "has no classes.json"),
    ],
)
def test_bad_masks_are_refused_naming_the_file(tmp_path: Path, damage: str, message: str) -> None:
    root = write_dataset(tmp_path / "ds", n=3)
    mask_path, img_path = root / "masks/train/f001.png", root / "images/train/f001.png"
    if damage == "wrong_size":
        Image.fromarray(np.zeros((48, 32), np.uint8), mode="L").save(mask_path)
    elif damage == "out_of_range":
        arr = np.asarray(Image.open(mask_path)).copy()
        arr[20, 20] = 7
        Image.fromarray(arr, mode="L").save(mask_path)
    elif damage == "missing_mask":
        mask_path.unlink()
    elif damage == "mask_without_image":
        img_path.unlink()
    elif damage == "colour_mask":
        Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(mask_path)
    elif damage == "no_classes":
        (root / "classes.json").unlink()
    with pytest.raises(DatasetError) as e:
        SegmentationDataset(root)
    assert message in str(e.value)


# --------------------------------------------------------------------------- augmentation


def _agreement(x: torch.Tensor, m: torch.Tensor) -> float:
    """Share of labeled pixels whose colour in the augmented image is their mask class's colour."""
    pix = (x.permute(1, 2, 0).numpy() * 255).astype(np.float64)
    nearest = np.argmin(((pix[:, :, None, :] - PALETTE[None, None].astype(np.float64)) ** 2).sum(-1), axis=-1)
    labeled = m.numpy() != VOID
    return float((nearest[labeled] == m.numpy()[labeled]).mean())


def test_the_augmentation_moves_image_and_mask_together(tmp_path: Path) -> None:
    """Crops and flips land on both: the class each augmented pixel shows is its mask's class. The
    same check on a view flipped in one of the two fails, so the test sees a misalignment."""
    ds = SegmentationDataset(write_dataset(tmp_path / "ds", n=4))
    aug = JointAugment((24, 32), scale_min=0.4, hflip=True)
    rng = random.Random(0)
    flips = 0
    for i in range(20):
        img, mask = ds.load(i % len(ds))
        box, flip = aug.params(img.width, img.height, rng)
        flips += flip
        x, m = aug.apply(img, mask, box, flip)
        assert m is not None and x.shape == (3, 24, 32) and m.shape == (24, 32)
        assert m.dtype == torch.int64 and set(m.unique().tolist()) <= {0, 1, 2, VOID}  # nearest: no blends
        if (m != VOID).sum() > 50:
            assert _agreement(x, m) > 0.9
            assert _agreement(x.flip(-1), m) < 0.8  # one of the two flipped: misaligned, and seen
    assert 0 < flips < 20


# --------------------------------------------------------------------------- losses and metrics


def test_void_pixels_do_not_count_in_the_loss_nor_the_metrics() -> None:
    torch.manual_seed(0)
    mask = torch.randint(0, 3, (2, 8, 8))
    mask[:, :2] = VOID
    logits = torch.randn(2, 3, 8, 8)
    other = logits.clone()
    other[:, :, :2] = torch.randn(2, 3, 2, 8) * 50  # anything at the void pixels
    assert segmentation_loss(logits, mask, VOID) == pytest.approx(float(segmentation_loss(other, mask, VOID)))
    a, b = ConfusionMatrix(3, VOID), ConfusionMatrix(3, VOID)
    a.update(logits.argmax(1), mask)
    b.update(other.argmax(1), mask)
    assert torch.equal(a.matrix, b.matrix) and int(a.matrix.sum()) == 2 * 6 * 8


def test_miou_against_a_hand_computed_example() -> None:
    # ground truth / prediction over 8 labeled pixels (and 2 void ones, predicted anything)
    gt = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, VOID, VOID])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 1, 2])
    cm = ConfusionMatrix(3, VOID)
    cm.update(pred, gt)
    # class 0: TP 2, FP 1 (a 2 predicted 0), FN 1 -> 2/4; class 1: TP 1, FP 1, FN 1 -> 1/3;
    # class 2: TP 2, FP 1, FN 1 -> 2/4
    assert cm.per_class_iou() == pytest.approx([50.0, 100 / 3, 50.0])
    assert cm.mean_iou() == pytest.approx((50 + 100 / 3 + 50) / 3)
    assert cm.pixel_accuracy() == pytest.approx(100 * 5 / 8)
    absent = ConfusionMatrix(4, VOID)
    absent.update(pred, gt)  # class 3 is in neither: left out of the mean, not counted as 0
    assert math.isnan(absent.per_class_iou()[3]) and absent.mean_iou() == pytest.approx(cm.mean_iou())


def test_pixel_distillation_is_zero_on_the_teacher_and_resizes_its_maps() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 4, 6)
    same = torch.nn.functional.interpolate(teacher, size=(8, 12), mode="bilinear", align_corners=False)
    assert float(pixel_distillation_loss(same, teacher, 4.0)) == pytest.approx(0.0, abs=1e-5)
    assert float(pixel_distillation_loss(torch.randn(2, 3, 8, 12), teacher, 4.0)) > 0.01
    valid = torch.zeros(2, 8, 12, dtype=torch.bool)
    off = same.clone()
    off[:, :, :, 6:] += torch.randn(2, 3, 8, 6) * 5
    valid[:, :, :6] = True  # only the untouched half counts
    assert float(pixel_distillation_loss(off, teacher, 4.0, valid)) == pytest.approx(0.0, abs=1e-5)


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize("backbone, stride", [("timm:test_efficientnet", 8), ("timm:test_vit", 16)])
def test_models_give_class_maps_at_their_output_stride(backbone: str, stride: int) -> None:
    recipe = SegmentationRecipe(spec=backbone, num_classes=3, decoder_channels=16, input_size=(32, 64))
    model = build_segmentation_model(recipe)
    out = model(torch.rand(2, 3, 32, 64))
    assert model.output_stride == stride and out.shape == (2, 3, 32 // stride, 64 // stride)


def test_a_student_learns_the_task_and_distils_from_a_teacher(tmp_path: Path) -> None:
    """A few steps on the block task: the finetuned student beats its random init in mIoU; a second
    student trained on the teacher's maps alone (no labels) lowers its distillation loss."""
    torch.set_num_threads(1)
    ds = SegmentationDataset(write_dataset(tmp_path / "ds", n=8))
    recipe = SegmentationRecipe(
        spec="timm:test_efficientnet",
        num_classes=3,
        decoder_channels=16,
        input_size=(48, 64),
        classes=ds.classes,
    )
    student = build_segmentation_model(recipe)
    before = evaluate_segmentation(student, ds)["miou"]
    fit_segmentation(
        student, ds, steps=60, batch_size=4, lr=3e-3, augment=JointAugment((48, 64), scale_min=0.6)
    )
    after = evaluate_segmentation(student, ds)
    assert after["miou"] > before + 15 and after["miou"] > 50
    assert set(after["per_class_iou"]) == {"red", "green", "blue"} and 0 <= after["pixel_acc"] <= 100
    pupil = build_segmentation_model(recipe)
    hist = fit_segmentation(
        pupil,
        ds,
        steps=30,
        batch_size=4,
        lr=3e-3,
        teacher=student,
        ce_weight=0.0,
        augment=JointAugment((48, 64)),
    )
    first, last = np.mean([h["kd"] for h in hist[:5]]), np.mean([h["kd"] for h in hist[-5:]])
    assert last < 0.7 * first


def test_cached_teacher_maps_are_the_teachers_outputs_on_the_views_the_student_sees(tmp_path: Path) -> None:
    """The cache stores each view's box, flip and the teacher's maps at the student's grid; the
    view re-rendered from the box gives the teacher's same output (consistent function matching);
    distilling from the cache (logits or the task-agnostic features) lowers its loss; the cache
    round-trips through a file."""
    torch.set_num_threads(1)
    ds = SegmentationDataset(write_dataset(tmp_path / "ds", n=4))
    teacher = build_segmentation_model(
        SegmentationRecipe(
            spec="timm:test_efficientnet", num_classes=3, decoder_channels=16, input_size=(32, 48)
        )
    )
    student = build_segmentation_model(
        SegmentationRecipe(spec="timm:test_vit", num_classes=3, decoder_channels=16, input_size=(32, 48))
    )
    aug = JointAugment((32, 48), scale_min=0.5)
    grid = output_grid(student, (32, 48))
    maps = build_teacher_maps(teacher, ds, aug, views=3, grid=grid, seed=0, batch_size=5)
    assert maps.targets.shape == (4, 3, 3, *grid) and maps.targets.dtype == torch.float16
    img = ds.load_image(2)
    box = tuple(int(c) for c in maps.boxes[2, 1].tolist())
    x = aug.apply(img, None, box, bool(maps.flips[2, 1]))[0]  # type: ignore[arg-type]
    with torch.no_grad():
        again = torch.nn.functional.interpolate(
            teacher(x[None]), size=grid, mode="bilinear", align_corners=False
        )
    assert torch.allclose(again[0], maps.targets[2, 1].float(), atol=2e-2)
    maps.save(tmp_path / "maps.pt")
    assert torch.equal(TeacherMaps.load(tmp_path / "maps.pt").targets, maps.targets)
    hist = distill_segmentation(student, ds, maps, aug, steps=30, batch_size=4, lr=3e-3)
    assert np.mean([h["loss"] for h in hist[-5:]]) < 0.7 * np.mean([h["loss"] for h in hist[:5]])
    feats = build_teacher_maps(teacher, ds, aug, views=2, grid=grid, kind="features")
    assert feats.kind == "features" and feats.targets.shape[2] == teacher.features(x[None])[1].shape[1]
    hist = distill_segmentation(student, ds, feats, aug, steps=20, batch_size=4, lr=3e-3)
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_export_round_trip_onnx_within_tolerance_and_a_card_with_the_palette(tmp_path: Path) -> None:
    import onnxruntime as ort

    from kt_train.tasks.segmentation import export_segmentation, load_segmentation

    recipe = SegmentationRecipe(
        spec="timm:test_efficientnet",
        num_classes=3,
        decoder_channels=16,
        input_size=(32, 48),
        classes=["red", "green", "blue"],
        void_index=VOID,
    )
    model = build_segmentation_model(recipe).eval()
    card = export_segmentation(model, tmp_path / "out", metrics={"test": {"miou": 12.5}})
    assert card["failed_formats"] == {} and set(card["files"]) == {"safetensors", "onnx", "checkpoint"}
    assert (
        len(card["palette"]) == 3
        and card["classes"] == ["red", "green", "blue"]
        and card["void_index"] == VOID
    )
    assert card["metrics"]["test"]["miou"] == 12.5 and card["parameters"] > 0
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        want = torch.nn.functional.interpolate(model(x), size=(32, 48), mode="bilinear", align_corners=False)
    got = ort.InferenceSession(str(tmp_path / "out/model.onnx")).run(None, {"input": x.numpy()})[0]
    assert got.shape == (1, 3, 32, 48) and np.abs(got - want.numpy()).max() < 1e-4
    again, ckpt = load_segmentation(tmp_path / "out/model.ckpt")
    with torch.no_grad():
        assert torch.allclose(again(x), model(x), atol=1e-6)
    assert ckpt["metrics"]["test"]["miou"] == 12.5


def test_the_pipeline_runs_every_stage_for_task_segmentation(tmp_path: Path) -> None:
    """``task: segmentation`` through ``run_pipeline`` (what ``kt train`` and the worker call): the
    teacher on labeled pairs, its cached maps on unlabeled frames, distillation, finetune,
    evaluate (mIoU) before export (ONNX + card with the metrics); a second run reuses every stage."""
    from kt_train.config import parse_config
    from kt_train.pipeline import run_pipeline

    torch.set_num_threads(1)
    train = write_dataset(tmp_path / "train", n=6)
    test = write_dataset(tmp_path / "test", n=3, seed=5)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, p in enumerate(sorted((write_dataset(tmp_path / "pool", n=6, seed=9) / "images/train").iterdir())):
        p.rename(frames / f"u{i}.png")
    opt = {"batch_size": 4, "lr": 3e-3, "weight_decay": 0.0}
    cfg = parse_config(
        {
            "task": "segmentation",
            "device": "cpu",
            "out_dir": str(tmp_path / "run"),
            "teacher": {"model": "timm:test_efficientnet"},
            "student": {"model": "timm:test_vit"},
            "data": {
                "train": {"path": str(train)},
                "test": {"path": str(test)},
                "transfer": {"path": str(frames)},
            },
            "segmentation": {
                "input_size": [32, 48],
                "teacher_decoder_channels": 16,
                "student_decoder_channels": 16,
            },
            "finetune_teacher": {"linear_probe": {**opt, "steps": 5}, "full_finetune": {**opt, "steps": 5}},
            "distill": {**opt, "steps": 5, "cache": {"views": 2}},
            "finetune_student": {**opt, "steps": 5},
            "export": {"formats": ["safetensors", "onnx"]},
        }
    )
    results = run_pipeline(cfg)
    assert list(results) == [
        "finetune_teacher",
        "curate",
        "distill",
        "finetune_student",
        "evaluate",
        "export",
    ]
    metrics = results["evaluate"]["metrics"]["test"]
    assert 0 <= metrics["miou"] <= 100 and set(metrics["per_class_iou"]) == {"red", "green", "blue"}
    assert results["distill"]["teacher_cache"]["bytes"] > 0
    card = json.loads((tmp_path / "run/export/model_card.json").read_text())
    assert card["task"] == "segmentation" and card["metrics"]["test"]["miou"] == metrics["miou"]
    assert (tmp_path / "run/export/model.onnx").is_file() and card["failed_formats"] == {}
    again = run_pipeline(cfg)  # every stage finished: reused, nothing retrained
    assert again["evaluate"]["metrics"]["test"]["miou"] == metrics["miou"]


def test_kt_predict_writes_the_masks_evaluation_would_score(tmp_path: Path) -> None:
    """`kt predict model.onnx IMAGES -o DIR` on a segmentation model: one index PNG per image at the
    image's size, the torch model's own argmax (resized the card's way) on all but rounding pixels."""
    from typer.testing import CliRunner

    from kt_train import cli
    from kt_train.tasks.segmentation import eval_inputs, export_segmentation, upsample

    root = write_dataset(tmp_path / "ds", n=3)
    recipe = SegmentationRecipe(
        spec="timm:test_efficientnet",
        num_classes=3,
        decoder_channels=16,
        input_size=(32, 48),
        classes=["r", "g", "b"],
    )
    model = build_segmentation_model(recipe).eval()
    export_segmentation(model, tmp_path / "out", formats=["onnx"])
    result = CliRunner().invoke(
        cli.app,
        ["predict", str(tmp_path / "out/model.onnx"), str(root / "images"), "-o", str(tmp_path / "masks")],
    )
    assert result.exit_code == 0, result.output
    assert "3 masks in" in result.output
    for img_path in sorted((root / "images/train").iterdir()):
        img = Image.open(img_path).convert("RGB")
        mask = np.asarray(Image.open(tmp_path / "masks" / img_path.name))
        assert mask.shape == (img.height, img.width)
        with torch.no_grad():
            logits = upsample(model(eval_inputs(img, (32, 48))[None]), (32, 48))
        want = np.asarray(
            Image.fromarray(logits.argmax(1)[0].numpy().astype(np.uint8)).resize(img.size, Image.NEAREST)
        )
        assert (mask == want).mean() > 0.99
