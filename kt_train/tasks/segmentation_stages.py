"""The pipeline's stages for ``task: segmentation``: the same names, inputs and outputs as the
classification stages (``kt_train.pipeline``), so ``run_pipeline``, ``kt train`` and the worker run
them unchanged. Each writes only in its ``out_dir`` and ``_SUCCESS`` last (a finished stage is
reused; an interrupted one starts again: these stages have no mid-stage checkpoint yet).

- ``finetune_teacher``: the teacher backbone + an LR-ASPP head on ``data.train`` (image + mask
  pairs): the head alone for ``linear_probe.steps``, then everything for ``full_finetune.steps``
  with the backbone at ``segmentation.backbone_lr_scale`` of the lr; batch norms in eval mode
  with ``teacher.norm_eval``.
- ``distill``: the teacher's maps on ``distill.cache.views`` views of every ``data.transfer``
  image (a teacher-output cache), then per-pixel KL at the student's output stride
  (``task_oriented``) or dense feature matching to the pretrained backbone (``task_agnostic``).
- ``finetune_student``: cross-entropy on the labeled pairs (from the distilled student, or from
  scratch when nothing was distilled; ``after_distillation: false`` keeps a distilled student).
- ``evaluate``: mean IoU, pixel accuracy, per-class IoU and the confusion matrix on ``data.test``.
- ``export``: ``kt_train.tasks.segmentation.export_segmentation`` (safetensors, ONNX; the card).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import ConfigError
from ..io import atomic_write_json, is_done, mark_done, read_outputs
from .segmentation import (
    JointAugment,
    SegmentationDataset,
    SegmentationModel,
    SegmentationRecipe,
    build_segmentation_model,
    build_teacher_maps,
    distill_segmentation,
    evaluate_segmentation,
    export_segmentation,
    fit_segmentation,
    load_segmentation,
    output_grid,
)

log = logging.getLogger(__name__)

Outputs = dict[str, Any]
MAX_SIDE = 320


def _dataset(cfg: TrainConfig, which: str, *, validate: bool = True) -> SegmentationDataset:
    ref = getattr(cfg.data, which)
    if ref is None:
        raise ConfigError(f"task segmentation needs data.{which} (a folder or zip of images/ + masks/)")
    stems = None
    if ref.split:
        stems = [s.strip() for s in Path(ref.split).read_text().splitlines() if s.strip()]
    sc = cfg.segmentation
    return SegmentationDataset(
        ref.path, classes=sc.classes, void_index=sc.void_index, stems=stems, validate=validate
    )


def input_size(cfg: TrainConfig, data: SegmentationDataset) -> tuple[int, int]:
    """``segmentation.input_size``, else the first frame scaled to a longer side <= 320 px
    (multiples of 8: the decoder's stride)."""
    if cfg.segmentation.input_size:
        return tuple(cfg.segmentation.input_size)  # type: ignore[return-value]
    w, h = data.load_image(0).size
    scale = min(1.0, MAX_SIDE / max(w, h))
    return max(8, round(h * scale / 8) * 8), max(8, round(w * scale / 8) * 8)


def _recipe(
    cfg: TrainConfig, data: SegmentationDataset, role: str, size: tuple[int, int]
) -> SegmentationRecipe:
    sc = cfg.segmentation
    mc = cfg.teacher if role == "teacher" else cfg.student
    return SegmentationRecipe(
        spec=mc.model,
        num_classes=data.num_classes,
        role=role,
        decoder_channels=sc.teacher_decoder_channels if role == "teacher" else sc.student_decoder_channels,
        model_kwargs=dict(mc.model_kwargs),
        input_size=size,
        classes=list(data.classes),
        void_index=data.void_index,
    )


def _begin(out_dir: Path) -> bool:
    """True when the stage must run (False: an earlier run finished it)."""
    if is_done(out_dir):
        return False
    out_dir.mkdir(parents=True, exist_ok=True)
    return True


def finetune_teacher(cfg: TrainConfig, inputs: Outputs, out_dir: Path, reporter: Any = None) -> Outputs:
    out_dir = Path(out_dir)
    if not _begin(out_dir):
        return read_outputs(out_dir)
    torch.manual_seed(cfg.seed)
    data = _dataset(cfg, "train")
    size = input_size(cfg, data)
    teacher = build_segmentation_model(_recipe(cfg, data, "teacher", size))
    lp, ff = cfg.finetune_teacher.linear_probe, cfg.finetune_teacher.full_finetune
    t0 = time.perf_counter()
    common = {"norm_eval": cfg.teacher.norm_eval, "reporter": reporter}
    if lp.steps:
        fit_segmentation(
            teacher,
            data,
            steps=lp.steps,
            batch_size=lp.batch_size,
            lr=lp.lr,
            weight_decay=lp.weight_decay,
            warmup_steps=lp.warmup_steps,
            augment=JointAugment(size, scale_min=lp.augment.scale_min, hflip=lp.augment.hflip),
            backbone_lr_scale=0.0,
            seed=cfg.seed,
            task="teacher linear probe",
            **common,
        )
        for p in teacher.backbone.parameters():
            p.requires_grad_(True)
    if ff.steps:
        fit_segmentation(
            teacher,
            data,
            steps=ff.steps,
            batch_size=ff.batch_size,
            lr=ff.lr,
            weight_decay=ff.weight_decay,
            warmup_steps=ff.warmup_steps,
            augment=JointAugment(size, scale_min=ff.augment.scale_min, hflip=ff.augment.hflip),
            backbone_lr_scale=cfg.segmentation.backbone_lr_scale,
            seed=cfg.seed + 1,
            task="teacher finetune",
            **common,
        )
    from .segmentation import save_segmentation

    save_segmentation(out_dir / "teacher.ckpt", teacher)
    return mark_done(
        out_dir,
        {
            "checkpoint": str(out_dir / "teacher.ckpt"),
            "classes": list(data.classes),
            "input_size": list(size),
            "seconds": round(time.perf_counter() - t0, 2),
        },
    )


def _transfer_frames(cfg: TrainConfig, inputs: Outputs) -> Any:
    from ..pipeline import open_unlabeled

    ref = cfg.data.transfer
    if inputs.get("transfer"):
        from ..config import DatasetRef

        ref = DatasetRef(path=inputs["transfer"])
    if ref is None:
        raise ConfigError("distill needs data.transfer (unlabeled images) for task segmentation")
    return open_unlabeled(ref, seed=cfg.seed, cache=cfg.data.cache_images)


def _teacher(inputs: Outputs) -> SegmentationModel:
    if not inputs.get("teacher"):
        raise ConfigError("distill needs the finetuned teacher: run finetune_teacher first")
    return load_segmentation(inputs["teacher"])[0]


def curate(cfg: TrainConfig, inputs: Outputs, out_dir: Path, reporter: Any = None) -> Outputs:
    if cfg.curate.gallery:
        raise ConfigError(
            "curate (crop-level retrieval) is not available for task segmentation yet; pass the "
            "unlabeled frames as data.transfer and leave curate.gallery unset"
        )
    return {}


def distill(cfg: TrainConfig, inputs: Outputs, out_dir: Path, reporter: Any = None) -> Outputs:
    out_dir = Path(out_dir)
    if not _begin(out_dir):
        return read_outputs(out_dir)
    torch.manual_seed(cfg.seed)
    labeled = _dataset(cfg, "train", validate=False)
    teacher = _teacher(inputs)
    size = teacher.recipe.input_size
    student = build_segmentation_model(_recipe(cfg, labeled, "student", size))
    dc = cfg.distill
    frames = _transfer_frames(cfg, inputs)
    aug = JointAugment(size, scale_min=dc.augment.scale_min, hflip=dc.augment.hflip)
    agnostic = dc.method == "task_agnostic"
    source = teacher
    if agnostic and dc.feature_source == "pretrained":
        source = build_segmentation_model(_recipe(cfg, labeled, "teacher", size))
    t0 = time.perf_counter()
    maps = build_teacher_maps(
        source,
        frames,
        aug,
        views=dc.cache.views,
        grid=output_grid(student, size),
        seed=cfg.seed,
        kind="features" if agnostic else "logits",
        reporter=reporter,
    )
    t_cache = time.perf_counter() - t0
    hist = distill_segmentation(
        student,
        frames,
        maps,
        aug,
        steps=dc.steps,
        batch_size=dc.batch_size,
        lr=dc.lr,
        weight_decay=dc.weight_decay,
        warmup_steps=dc.warmup_steps,
        temperature=dc.temperature,
        seed=cfg.seed,
        reporter=reporter,
        task="distill (task-agnostic)" if agnostic else "distill",
    )
    from .segmentation import save_segmentation

    save_segmentation(out_dir / "student.ckpt", student)
    atomic_write_json(out_dir / "history.json", {"distill": hist})
    return mark_done(
        out_dir,
        {
            "checkpoint": str(out_dir / "student.ckpt"),
            "classes": list(labeled.classes),
            "method": dc.method,
            "teacher_cache": {
                "views": dc.cache.views,
                "bytes": maps.bytes,
                "build_seconds": round(t_cache, 2),
            },
            "timings": {"distill": {"seconds": round(time.perf_counter() - t0 - t_cache, 2)}},
        },
    )


def finetune_student(cfg: TrainConfig, inputs: Outputs, out_dir: Path, reporter: Any = None) -> Outputs:
    out_dir = Path(out_dir)
    if not _begin(out_dir):
        return read_outputs(out_dir)
    data = _dataset(cfg, "train")
    fs = cfg.finetune_student
    if inputs.get("student"):
        student = load_segmentation(inputs["student"])[0]
        if not fs.after_distillation:
            from .segmentation import save_segmentation

            save_segmentation(out_dir / "student.ckpt", student)
            return mark_done(
                out_dir, {"checkpoint": str(out_dir / "student.ckpt"), "classes": list(data.classes)}
            )
        lr = fs.lr
    else:
        torch.manual_seed(cfg.seed)
        student = build_segmentation_model(_recipe(cfg, data, "student", input_size(cfg, data)))
        lr = fs.scratch_lr or fs.lr
    size = student.recipe.input_size
    hist = fit_segmentation(
        student,
        data,
        steps=fs.steps,
        batch_size=fs.batch_size,
        lr=lr,
        weight_decay=fs.weight_decay,
        warmup_steps=fs.warmup_steps,
        augment=JointAugment(size, scale_min=fs.augment.scale_min, hflip=fs.augment.hflip),
        seed=cfg.seed,
        reporter=reporter,
        task="student finetune",
    )
    from .segmentation import save_segmentation

    save_segmentation(out_dir / "student.ckpt", student)
    atomic_write_json(out_dir / "history.json", {"finetune": hist})
    return mark_done(out_dir, {"checkpoint": str(out_dir / "student.ckpt"), "classes": list(data.classes)})


def evaluate(cfg: TrainConfig, inputs: Outputs, out_dir: Path, reporter: Any = None) -> Outputs:
    out_dir = Path(out_dir)
    if not _begin(out_dir):
        return read_outputs(out_dir)
    if not inputs.get("student"):
        raise ConfigError("evaluate needs a trained student: run distill or finetune_student first")
    student = load_segmentation(inputs["student"])[0]
    test = _dataset(cfg, "test")
    metrics = {"test": evaluate_segmentation(student, test)}
    metrics["test"]["frames"] = len(test)
    if inputs.get("teacher"):
        metrics["teacher_test"] = {
            k: v
            for k, v in evaluate_segmentation(load_segmentation(inputs["teacher"])[0], test).items()
            if k != "confusion"
        }
    atomic_write_json(out_dir / "metrics.json", metrics)
    return mark_done(out_dir, {"metrics": metrics})


def export(cfg: TrainConfig, inputs: Outputs, out_dir: Path, reporter: Any = None) -> Outputs:
    out_dir = Path(out_dir)
    if not _begin(out_dir):
        return read_outputs(out_dir)
    if not inputs.get("student"):
        raise ConfigError("export needs a trained student: run distill or finetune_student first")
    student = load_segmentation(inputs["student"])[0]
    metrics = (
        {"test": {k: v for k, v in inputs["test_metrics"]["test"].items() if k != "confusion"}}
        if inputs.get("test_metrics")
        else {}
    )
    formats = [f for f in cfg.export.formats if f in ("safetensors", "onnx")]
    card = export_segmentation(student, out_dir, formats=formats, metrics=metrics)
    return mark_done(
        out_dir,
        {
            "card": str(out_dir / "model_card.json"),
            "files": card["files"],
            "failed_formats": card["failed_formats"],
        },
    )


STAGE_FUNCS = {
    "finetune_teacher": finetune_teacher,
    "curate": curate,
    "distill": distill,
    "finetune_student": finetune_student,
    "export": export,
    "evaluate": evaluate,
}
