"""The pipeline stages, each a plain function ``stage(cfg, inputs, out_dir) -> outputs``.

A stage writes only inside ``out_dir`` (atomically), writes ``_SUCCESS`` last and returns at once
when it finds that marker, so a crashed or redelivered run resumes instead of redoing work.
Training stages also resume mid-way from ``last.ckpt``. ``export`` is the exception that proves
it: run again with a format it does not hold (one that failed its check, or newly asked for), it
exports again, keeping the formats it holds.

``evaluate`` runs before ``export`` (``run_order``): it needs only the student checkpoint, so the
test metrics are kept whatever happens to the export, and the model card carries them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from . import sizing
from .config import STAGES, DatasetRef, OptimConfig, TrainConfig, dump_config
from .data import ImageDataset, load_labeled, load_unlabeled
from .distributed import barrier, init_from_env, is_distributed, local_device, rank, world_size
from .errors import ConfigError, DatasetError
from .evaluate import evaluate_model
from .io import SUCCESS, atomic_write_json, atomic_write_text, is_done, mark_done, read_outputs
from .losses import contrastive_feature_loss, cosine_feature_loss, kd_loss
from .models import (
    ImageClassifier,
    create_backbone,
    create_student,
    create_teacher,
    load_checkpoint,
    preprocessing,
    save_checkpoint,
    set_norm_eval,
)
from .progress import STUDENT_FINETUNE, STUDENT_FINETUNE_CHECK
from .train import (
    LoopResult,
    Reporter,
    param_groups,
    resolve_device,
    resolve_num_workers,
    resolve_precision,
    train_loop,
)
from .transforms import TrainAugment

log = logging.getLogger(__name__)

Outputs = dict[str, Any]


# --------------------------------------------------------------------------- data


# Decoded datasets kept for the life of the process: a benchmark or a worker that runs several
# stages over the same images decodes them once. Keyed by everything that decides the content.
_DECODED: OrderedDict[tuple, ImageDataset] = OrderedDict()
_DECODED_MAX = 6


def _stamp(ref: DatasetRef) -> tuple:
    """Size and mtime of the files a dataset comes from, so a changed file is decoded anew."""
    out = []
    for p in (ref.path, ref.split):
        try:
            st = os.stat(p) if p else None
        except OSError:
            st = None
        out.append((st.st_size, st.st_mtime_ns) if st else None)
    return tuple(out)


def _memo(key: tuple, build: Callable[[], ImageDataset], cache: bool) -> ImageDataset:
    if not cache:
        return build()
    if key in _DECODED:
        _DECODED.move_to_end(key)
        return copy.copy(_DECODED[key])
    ds = build()
    if not ds.cache_in_memory(max_bytes=_cache_budget()):
        return ds  # too large to keep decoded: decoded on every use
    _DECODED[key] = ds
    while len(_DECODED) > _DECODED_MAX:
        _DECODED.popitem(last=False)
    return copy.copy(ds)


def _cache_budget() -> int | None:
    """Half the memory available now: decoded images beyond it are not cached (a huge transfer set
    is decoded on use instead of taking the machine down)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    return None


def open_labeled(
    ref: DatasetRef | None, *, what: str, classes: list[str] | None = None, seed: int = 0, cache: bool = True
) -> ImageDataset:
    if ref is None:
        raise ConfigError(f"data.{what} is not set; give the path of the {what} images (data.{what}.path)")
    key = ("labeled", ref.model_dump_json(), _stamp(ref), tuple(classes or ()), seed if ref.max_items else 0)
    ds = _memo(key, lambda: _load_labeled(ref, what, classes, seed), cache)
    ds.name = ds.name or f"{what} ({ref.path})"
    empty = [c for c, n in ds.class_counts().items() if n == 0]
    if empty and classes is None:
        raise DatasetError(
            f"class{'es' if len(empty) > 1 else ''} {', '.join(map(repr, empty))} of {ref.path} "
            f"{'have' if len(empty) > 1 else 'has'} no readable images; add images or remove the class"
        )
    return ds


def open_unlabeled(
    ref: DatasetRef | None, *, what: str = "transfer", seed: int = 0, cache: bool = True
) -> ImageDataset:
    if ref is None:
        raise ConfigError(
            f"data.{what} is not set; give the path of the unlabeled {what} images (data.{what}.path)"
        )

    def build() -> ImageDataset:
        ds = load_unlabeled(ref.path, split=ref.split, root=ref.root)
        ds.name = ds.name or f"{what} ({ref.path})"
        return _subset(ds, ref.max_items, seed)

    return _memo(
        ("unlabeled", ref.model_dump_json(), _stamp(ref), seed if ref.max_items else 0), build, cache
    )


def _load_labeled(ref: DatasetRef, what: str, classes: list[str] | None, seed: int) -> ImageDataset:
    ds = load_labeled(ref.path, split=ref.split, root=ref.root, classes=classes)
    ds.name = ds.name or f"{what} ({ref.path})"
    return _subset(ds, ref.max_items, seed)


def _subset(ds: ImageDataset, n: int | None, seed: int) -> ImageDataset:
    if n is None or n >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(ds), generator=g)[:n].tolist())
    return ImageDataset(ds.stores, [ds.items[i] for i in keep], ds.classes, ds.transform, ds.name)


def with_transform(ds: ImageDataset, transform: Any) -> ImageDataset:
    """A view of ``ds`` (sharing its decoded-image cache) with another transform."""
    view = copy.copy(ds)
    view.transform = transform
    return view


def augment_for(opt: OptimConfig, size: int) -> TrainAugment:
    a = opt.augment
    return TrainAugment(
        size, scale=(a.scale_min, 1.0), hflip=a.hflip, vflip=a.vflip, color_jitter=a.color_jitter
    )


# --------------------------------------------------------------------------- helpers


def _side(size: int | str | None) -> int | None:
    if isinstance(size, str):
        raise ConfigError(f"image_size {size!r} was not resolved (pipeline.resolve_sizes)")
    return size


def resolve_sizes(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``image_size: auto`` of the teacher and student replaced by the sizes that
    follow the labeled images (``kt_train.sizing``); the same answer in every stage."""
    if "auto" not in (cfg.teacher.image_size, cfg.student.image_size):
        return cfg
    if cfg.data.train is None:
        raise ConfigError("image_size: auto needs data.train (the sizes follow the labeled images)")
    train = open_labeled(cfg.data.train, what="train", seed=cfg.seed, cache=cfg.data.cache_images)
    sides = []
    for i in sizing.sample_indices(len(train)):
        try:
            img = train.load_image(i)
        except DatasetError:
            continue
        sides.append(min(img.size))
    teacher, student = sizing.auto_sizes(sides)
    cfg = cfg.model_copy(deep=True)
    if cfg.teacher.image_size == "auto":
        cfg.teacher.image_size = teacher
    if cfg.student.image_size == "auto":
        cfg.student.image_size = student
    log.info("image_size auto: teacher %s, student %s px", cfg.teacher.image_size, cfg.student.image_size)
    return cfg


def _stage_begin(out_dir: str | Path, cfg: TrainConfig) -> Path | None:
    out = Path(out_dir)
    if is_done(out):
        return None
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    return out


M = TypeVar("M", bound=nn.Module)


def _freeze(model: M) -> M:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _to_device(model: M, device: torch.device, channels_last: bool = False) -> M:
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _views(batch: Any, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    x = batch[0].to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _save_history(out: Path, **loops: LoopResult) -> dict[str, Any]:
    timings = {
        name: {
            "seconds": round(r.seconds, 2),
            "images_per_s": round(r.images_per_s, 1),
            "steady_images_per_s": round(r.steady_images_per_s, 1),
            "data_wait_share": round(r.data_wait_share, 3),
            "resumed_from": r.resumed_from,
        }
        for name, r in loops.items()
    }
    atomic_write_json(out / "history.json", {name: r.history for name, r in loops.items()})
    return timings


def _fit(
    cfg: TrainConfig,
    opt: OptimConfig,
    *,
    seed: int,
    device: torch.device,
    reporter: Reporter | None,
    lr: float | None = None,
    **loop: Any,
) -> LoopResult:
    """train_loop with the schedule of one OptimConfig and the run-wide settings of cfg."""
    return train_loop(
        batch_size=opt.batch_size,
        steps=opt.steps,
        lr=opt.lr if lr is None else lr,
        warmup_steps=opt.warmup_steps,
        seed=seed,
        checkpoint_every=cfg.checkpoint_every,
        num_workers=resolve_num_workers(cfg.data.num_workers, device),
        device=device,
        reporter=reporter,
        autocast_dtype=resolve_precision(cfg.precision, device),
        ema_decay=opt.ema_decay,
        ema_start=opt.ema_start,
        **loop,
    )


def _val_metrics(
    cfg: TrainConfig, model: ImageClassifier, classes: list[str], device: torch.device
) -> dict[str, Any]:
    if cfg.data.val is None:
        return {}
    val = open_labeled(cfg.data.val, what="val", classes=classes, seed=cfg.seed, cache=cfg.data.cache_images)
    m = evaluate_model(model, val, device=device, batch_size=256)
    return {"val_acc": m["top1"]}


# --------------------------------------------------------------------------- stages


def finetune_teacher(
    cfg: TrainConfig, inputs: Outputs, out_dir: str | Path, reporter: Reporter | None = None
) -> Outputs:
    """Task head on the foundation model: a linear probe, then (optionally) a full finetune."""
    cfg = resolve_sizes(cfg)
    out = _stage_begin(out_dir, cfg)
    if out is None:
        return read_outputs(out_dir)
    device = resolve_device(cfg.device)
    train = open_labeled(cfg.data.train, what="train", seed=cfg.seed, cache=cfg.data.cache_images)
    classes = list(train.classes or [])
    tc = cfg.teacher
    teacher = create_teacher(
        tc.model, len(classes), head=tc.head, image_size=_side(tc.image_size), model_kwargs=tc.model_kwargs
    )
    teacher = _to_device(teacher, device)
    size = cfg.data.view_size or teacher.data_config.input_size
    ft = cfg.finetune_teacher

    def ce_step(opt: OptimConfig):
        def step(batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
            x, y = _views(batch, device), batch[1].to(device)
            logits = teacher(x)
            loss = F.cross_entropy(logits, y, label_smoothing=opt.label_smoothing)
            return loss, {"acc": (logits.argmax(-1) == y).float().mean().detach()}

        return step

    # Phase 1: linear probe. The trunk is frozen and in eval mode, so its features are those of
    # the pretrained model and the head learns a clean readout before any trunk weight moves.
    for p in teacher.net.parameters():
        p.requires_grad_(False)
    assert teacher.head is not None
    probe = _fit(
        cfg,
        ft.linear_probe,
        task="teacher linear probe",
        modules={"teacher": teacher},
        groups=param_groups(teacher.head, ft.linear_probe.weight_decay),
        step_fn=ce_step(ft.linear_probe),
        dataset=with_transform(train, augment_for(ft.linear_probe, size)),
        ckpt_path=out / "linear_probe.last.ckpt",
        seed=cfg.seed,
        device=device,
        reporter=reporter,
        train_mode=lambda: _probe_mode(teacher),
    )
    loops = {"linear_probe": probe}
    # Phase 2: full finetune with layer-wise lr decay (ViTs) and, if asked, frozen batch norm.
    if ft.full_finetune.steps > 0:
        for p in teacher.parameters():
            p.requires_grad_(True)

        def finetune_mode() -> None:
            teacher.train()
            if tc.norm_eval:
                set_norm_eval(teacher)

        groups = param_groups(teacher.net, ft.full_finetune.weight_decay, ft.layer_decay) + param_groups(
            teacher.head, ft.full_finetune.weight_decay
        )
        loops["full_finetune"] = _fit(
            cfg,
            ft.full_finetune,
            task="teacher finetune",
            modules={"teacher": teacher},
            groups=groups,
            step_fn=ce_step(ft.full_finetune),
            dataset=with_transform(train, augment_for(ft.full_finetune, size)),
            ckpt_path=out / "last.ckpt",
            seed=cfg.seed + 1,
            device=device,
            reporter=reporter,
            train_mode=finetune_mode,
        )
    teacher.eval()
    metrics = _val_metrics(cfg, teacher, classes, device)
    timings = _save_history(out, **loops)
    save_checkpoint(
        out / "teacher.pt", teacher.cpu(), classes=classes, metrics=metrics, lineage={"teacher": tc.model}
    )
    return mark_done(
        out,
        {
            "checkpoint": str(out / "teacher.pt"),
            "classes": classes,
            "metrics": metrics,
            "timings": timings,
            "bad_images": train.bad,
        },
    )


def distill(
    cfg: TrainConfig, inputs: Outputs, out_dir: str | Path, reporter: Reporter | None = None
) -> Outputs:
    """Task-oriented distillation: the student matches the finetuned teacher's softened class
    probabilities on the transfer set, both models seeing the same augmented view."""
    if cfg.distill.method == "task_agnostic":
        return distill_task_agnostic(cfg, inputs, out_dir, reporter)
    cfg = resolve_sizes(cfg)
    out = _stage_begin(out_dir, cfg)
    if out is None:
        return read_outputs(out_dir)
    device = local_device(resolve_device(cfg.device))
    if "teacher" not in inputs:
        raise ConfigError(
            "distill needs a finetuned teacher: run finetune_teacher first (stages) or pass inputs['teacher']"
        )
    teacher, ckpt = load_checkpoint(inputs["teacher"])
    classes = list(ckpt["classes"])
    teacher = _freeze(_to_device(teacher, device, channels_last=True))
    student = _to_device(
        create_student(
            cfg.student.model,
            len(classes),
            image_size=_side(cfg.student.image_size),
            model_kwargs=cfg.student.model_kwargs,
        ),
        device,
        channels_last=_channels_last(cfg, device),
    )
    dc = cfg.distill
    size = cfg.data.view_size or max(teacher.data_config.input_size, student.data_config.input_size)
    augment = augment_for(dc, size)
    images = open_unlabeled(_transfer_ref(cfg, inputs), seed=cfg.seed, cache=cfg.data.cache_images)
    labeled_iter = _labeled_stream(cfg, classes, size, dc) if dc.ce_weight > 0 else None
    forward: nn.Module = student
    if is_distributed():
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        forward = torch.compile(forward)  # type: ignore[assignment]
    cache_info: dict[str, Any] | None = None
    held_cache: Any = None
    transfer: Any
    if _use_cache(dc, len(images)):
        from .teacher_cache import CachedViews, kd_loss_topk, open_or_build

        cache, built = open_or_build(
            dc.cache.dir or Path(cfg.out_dir) / "teacher_cache",
            inputs["teacher"],
            lambda: teacher,
            images,
            augment,
            views=cache_views(dc, len(images)),
            topk=dc.cache.topk,
            seed=cfg.seed,
            num_classes=len(classes),
            max_bytes=dc.cache.max_bytes,
            batch_size=dc.cache.batch_size,
            num_workers=resolve_num_workers(cfg.data.num_workers, device),
            device=device,
            autocast_dtype=resolve_precision(cfg.precision, device),
            reporter=reporter,
        )
        held_cache = cache
        del teacher  # no teacher in the loop: its memory goes back before training starts
        transfer = CachedViews(images, augment, cache, render_size=min(size, student.data_config.input_size))
        cache_info = {**_cache_info(cache, built), "topk": cache.topk}

        def targets(batch: Any, s_logits: torch.Tensor) -> torch.Tensor:
            vals, idx = batch[1].to(device, non_blocking=True), batch[2].to(device, non_blocking=True)
            return kd_loss_topk(s_logits, vals, idx, dc.temperature)

    else:
        transfer = with_transform(images, augment)

        def targets(batch: Any, s_logits: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                t_logits = teacher(x_cl(batch))
            return kd_loss(s_logits, t_logits, dc.temperature)

    def x_cl(batch: Any) -> torch.Tensor:
        return _views(batch, device, channels_last=True)

    def step(batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        x = _views(batch, device, channels_last=cfg.channels_last)
        loss = targets(batch, forward(x))
        metrics = {"kd": loss.detach()}
        if labeled_iter is not None:
            xl, yl = next(labeled_iter)
            ce = F.cross_entropy(forward(xl.to(device)), yl.to(device))
            loss = loss + dc.ce_weight * ce
            metrics["ce"] = ce.detach()
        return loss, metrics

    try:
        loop = _fit(
            cfg,
            dc,
            task="distill",
            modules={"student": student},
            groups=param_groups(student, dc.weight_decay),
            step_fn=step,
            dataset=transfer,
            ckpt_path=out / "last.ckpt",
            seed=cfg.seed,
            device=device,
            reporter=reporter,
            data_parallel=is_distributed(),
        )
    finally:  # the cache may be evicted once no run reads it
        if held_cache is not None:
            held_cache.release()
    if rank() != 0:  # data parallel: rank 0 writes the student and the outputs
        barrier()
        return read_outputs(out)
    res = _finish_student(
        cfg,
        out,
        student,
        classes,
        device,
        {"distill": loop},
        lineage={
            "world_size": world_size(),
            "teacher": ckpt.get("lineage", {}).get("teacher", str(inputs["teacher"])),
            "teacher_checkpoint": str(inputs["teacher"]),
            "transfer_set": _transfer_ref(cfg, inputs).model_dump(),
            "transfer_set_size": len(images),
            "method": "task_oriented",
            "teacher_outputs": "cached" if cache_info else "online",
        },
        bad=images.bad,
        extra={"teacher_cache": cache_info} if cache_info else None,
    )
    barrier()
    return res


def max_distill_batch(cfg: TrainConfig, teacher_checkpoint: str | Path, *, limit: int = 4096) -> int:
    """The largest distillation batch that fits on ``cfg.device``: one student forward + backward
    (and a teacher forward unless the cache mode is ``cached``) at the view size, at the config's
    precision; the search doubles from 16 (``train.find_batch_size``)."""
    from .distributed import world_size
    from .train import find_batch_size

    device = local_device(resolve_device(cfg.device))
    teacher, ckpt = load_checkpoint(teacher_checkpoint)
    teacher = _freeze(_to_device(teacher, device, channels_last=True))
    student = _to_device(
        create_student(cfg.student.model, len(ckpt["classes"]), image_size=_side(cfg.student.image_size)),
        device,
        channels_last=cfg.channels_last,
    )
    size = cfg.data.view_size or max(teacher.data_config.input_size, student.data_config.input_size)
    with_teacher = cfg.distill.cache.mode != "cached"
    dtype = resolve_precision(cfg.precision, device)

    def try_step(bs: int) -> None:
        x = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            if with_teacher:
                with torch.no_grad():
                    t = teacher(x.contiguous(memory_format=torch.channels_last))
            else:
                t = torch.zeros(bs, len(ckpt["classes"]), device=device)
            loss = kd_loss(student(x), t, cfg.distill.temperature)
        loss.backward()
        student.zero_grad(set_to_none=True)

    return find_batch_size(try_step, limit=limit, multiple_of=world_size())


def _cache_info(cache: Any, built: bool) -> dict[str, Any]:
    """What a distillation records of its teacher-output cache: built now (``build_seconds``: this
    run's) or reused (built: false, ``build_seconds`` 0; ``reused_build_seconds``: what the run that
    built it spent)."""
    info = {
        "path": str(cache.path),
        "key": cache.path.name,
        "built": built,
        "views": cache.views,
        "build_seconds": cache.meta["build_seconds"] if built else 0.0,
        "build_views_per_s": cache.meta["build_views_per_s"],
    }
    if not built:
        info["reused_build_seconds"] = cache.meta["build_seconds"]
    return info


def cache_views(dc: Any, num_images: int) -> int:
    """Views per image the teacher-output cache stores: ``cache.views``, or with ``cache.replays``
    as many as the schedule replays about ``replays`` times each (at most ``cache.views``)."""
    c = dc.cache
    if c.replays is None or num_images == 0:
        return int(c.views)
    wanted = -(-dc.steps * dc.batch_size // (num_images * c.replays))  # ceil
    return int(min(c.views, max(1, wanted)))


def _use_cache(dc: Any, num_images: int) -> bool:
    mode = dc.cache.mode
    if mode == "auto":
        return cache_views(dc, num_images) * num_images < dc.steps * dc.batch_size
    return mode == "cached"


def _channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    # On by default: oneDNN (CPU) and cuDNN (CUDA) both run convnets, depthwise ones above all,
    # faster in NHWC (a small convnet student's CPU training step: 51 -> 32 ms); ViTs ignore it.
    return cfg.channels_last


def distill_task_agnostic(
    cfg: TrainConfig, inputs: Outputs, out_dir: str | Path, reporter: Reporter | None = None
) -> Outputs:
    """The baseline: student features, through a projection, regress (cosine) or contrast onto the
    frozen teacher backbone's features on the transfer set; no task knowledge is used."""
    cfg = resolve_sizes(cfg)
    out = _stage_begin(out_dir, cfg)
    if out is None:
        return read_outputs(out_dir)
    device = resolve_device(cfg.device)
    dc, tc = cfg.distill, cfg.teacher
    if dc.feature_source == "finetuned":
        if "teacher" not in inputs:
            raise ConfigError("distill.feature_source=finetuned needs the finetune_teacher stage first")
        backbone, ckpt = load_checkpoint(inputs["teacher"])
        backbone.head = nn.Identity()
        classes = list(ckpt["classes"])
    else:
        backbone = create_backbone(tc.model, image_size=_side(tc.image_size), model_kwargs=tc.model_kwargs)
        classes = _classes(cfg, inputs)
    backbone = _freeze(_to_device(backbone, device, channels_last=True))
    student = _to_device(
        create_student(
            cfg.student.model,
            len(classes),
            image_size=_side(cfg.student.image_size),
            model_kwargs=cfg.student.model_kwargs,
        ),
        device,
        channels_last=_channels_last(cfg, device),
    )
    with torch.no_grad():
        probe = torch.zeros(
            2, 3, student.data_config.input_size, student.data_config.input_size, device=device
        )
        t_dim = backbone(probe).shape[-1]
        s_dim = student.features(probe).shape[-1]
    projection = nn.Linear(s_dim, t_dim).to(device)
    size = cfg.data.view_size or max(backbone.data_config.input_size, student.data_config.input_size)
    augment = augment_for(dc, size)
    images = open_unlabeled(_transfer_ref(cfg, inputs), seed=cfg.seed, cache=cfg.data.cache_images)
    loss_fn = cosine_feature_loss if dc.feature_loss == "cosine" else contrastive_feature_loss
    transfer: Any
    cache_info: dict[str, Any] | None = None
    held_cache: Any = None
    if _use_cache(dc, len(images)):
        # The same cache as task-oriented distillation, holding the backbone's full feature vector
        # per view (top-k over all t_dim dimensions: values + their positions, scattered back).
        from .teacher_cache import CachedViews, module_sha256, open_or_build

        cache, built = open_or_build(
            dc.cache.dir or Path(cfg.out_dir) / "teacher_cache",
            None,
            lambda: backbone,
            images,
            augment,
            views=cache_views(dc, len(images)),
            topk=t_dim,
            seed=cfg.seed,
            num_classes=t_dim,
            teacher_sha256="features:" + module_sha256(backbone),
            max_bytes=dc.cache.max_bytes,
            batch_size=dc.cache.batch_size,
            num_workers=resolve_num_workers(cfg.data.num_workers, device),
            device=device,
            autocast_dtype=resolve_precision(cfg.precision, device),
            reporter=reporter,
        )
        held_cache = cache
        del backbone
        transfer = CachedViews(images, augment, cache, render_size=min(size, student.data_config.input_size))
        cache_info = {**_cache_info(cache, built), "features": t_dim}

        def step(batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
            x = _views(batch, device, channels_last=cfg.channels_last)
            vals, idx = batch[1].to(device).float(), batch[2].to(device).long()
            target = torch.zeros(vals.shape[0], t_dim, device=device).scatter_(1, idx, vals)
            return loss_fn(projection(student.features(x)), target), {}

    else:
        transfer = with_transform(images, augment)

        def step(batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
            x = _views(batch, device, channels_last=cfg.channels_last)
            with torch.no_grad():
                target = backbone(x.contiguous(memory_format=torch.channels_last))
            return loss_fn(projection(student.features(x)), target), {}

    try:
        loop = _fit(
            cfg,
            dc,
            task="distill (task-agnostic)",
            modules={"student": student, "projection": projection},
            groups=param_groups(student, dc.weight_decay) + param_groups(projection, dc.weight_decay),
            step_fn=step,
            dataset=transfer,
            ckpt_path=out / "last.ckpt",
            seed=cfg.seed,
            device=device,
            reporter=reporter,
        )
    finally:  # the cache may be evicted once no run reads it
        if held_cache is not None:
            held_cache.release()
    return _finish_student(
        cfg,
        out,
        student,
        classes,
        device,
        {"distill": loop},
        lineage={
            "teacher": tc.model,
            "transfer_set": _transfer_ref(cfg, inputs).model_dump(),
            "transfer_set_size": len(transfer),
            "method": "task_agnostic",
            "feature_loss": dc.feature_loss,
            "teacher_cache": cache_info,
        },
        bad=transfer.bad,
        evaluate=False,
        extra={"teacher_cache": cache_info} if cache_info else None,
    )


def finetune_student(
    cfg: TrainConfig, inputs: Outputs, out_dir: str | Path, reporter: Reporter | None = None
) -> Outputs:
    """Cross-entropy on the labeled images, from the distilled student (or from scratch if none).
    A task-distilled student is kept as it is when ``finetune_student.after_distillation`` is false."""
    cfg = resolve_sizes(cfg)
    out = _stage_begin(out_dir, cfg)
    if out is None:
        return read_outputs(out_dir)
    device = resolve_device(cfg.device)
    lineage: dict[str, Any] = {}
    if inputs.get("student"):
        student, ckpt = load_checkpoint(inputs["student"])
        classes = list(ckpt["classes"])
        lineage = dict(ckpt.get("lineage", {}))
        lineage["distilled_checkpoint"] = str(inputs["student"])
    else:
        classes = _classes(cfg, inputs)
        student = create_student(
            cfg.student.model,
            len(classes),
            image_size=_side(cfg.student.image_size),
            model_kwargs=cfg.student.model_kwargs,
        )
        lineage["method"] = "scratch"
    student = _to_device(student, device, channels_last=_channels_last(cfg, device))
    fs = cfg.finetune_student
    train = open_labeled(
        cfg.data.train, what="train", classes=classes, seed=cfg.seed, cache=cfg.data.cache_images
    )
    size = cfg.data.view_size or student.data_config.input_size
    distilled = lineage.get("method") == "task_oriented"

    def finetune(model: ImageClassifier, data: ImageDataset, ckpt: Path, task: str, steps: int) -> LoopResult:
        def step(batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
            x, y = _views(batch, device), batch[1].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=fs.label_smoothing)
            return loss, {"acc": (logits.argmax(-1) == y).float().mean().detach()}

        def finetune_mode() -> None:
            model.train()
            if fs.norm_eval and inputs.get("student"):
                set_norm_eval(model)

        return _fit(
            cfg,
            fs.model_copy(update={"steps": steps}),
            task=task,
            modules={"student": model},
            groups=param_groups(model, fs.weight_decay),
            step_fn=step,
            dataset=with_transform(data, augment_for(fs, size)),
            ckpt_path=ckpt,
            seed=cfg.seed + 2,
            device=device,
            reporter=reporter,
            train_mode=finetune_mode,
            lr=fs.lr if inputs.get("student") or fs.scratch_lr is None else fs.scratch_lr,
        )

    loops: dict[str, LoopResult] = {}
    if distilled and fs.after_distillation == "auto":
        student, loops, decision = _finetune_if_it_helps(cfg, out, student, train, classes, device, finetune)
        lineage["finetune_check"] = decision
        if not decision["finetune"]:
            lineage["finetune"] = f"skipped: {decision['reason']}"
    elif distilled and not fs.after_distillation:
        # bench/quality/FINDINGS.md: after a long distillation on an in-domain transfer set every
        # finetune on the few labeled images cost val_tune points (0.4-2.5); on an out-of-domain set
        # it gained 17 (A3), which is what after_distillation "auto" decides per job
        lineage["finetune"] = "skipped: finetune_student.after_distillation is false"
        loops["finetune"] = finetune(student, train, out / "last.ckpt", STUDENT_FINETUNE, 0)
    else:
        loops["finetune"] = finetune(student, train, out / "last.ckpt", STUDENT_FINETUNE, fs.steps)
    return _finish_student(cfg, out, student, classes, device, loops, lineage=lineage, bad=train.bad)


def check_split(ds: ImageDataset, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (kept, held out) of a per-class split of ``ds``: ``round(fraction * n)`` of each
    class's ``n`` images held out, at least one and always leaving two, for classes of 3 or more."""
    by_class: dict[int, list[int]] = {}
    for i, item in enumerate(ds.items):
        by_class.setdefault(item.label, []).append(i)
    rng = torch.Generator().manual_seed(seed)
    kept: list[int] = []
    held: list[int] = []
    for label in sorted(by_class):
        idx = by_class[label]
        order = [idx[j] for j in torch.randperm(len(idx), generator=rng).tolist()]
        n_held = min(max(1, round(fraction * len(idx))), len(idx) - 2) if len(idx) >= 3 else 0
        held += order[:n_held]
        kept += order[n_held:]
    return sorted(kept), sorted(held)


def _finetune_if_it_helps(
    cfg: TrainConfig,
    out: Path,
    student: ImageClassifier,
    train: ImageDataset,
    classes: list[str],
    device: torch.device,
    finetune: Callable[[ImageClassifier, ImageDataset, Path, str, int], LoopResult],
) -> tuple[ImageClassifier, dict[str, LoopResult], dict[str, Any]]:
    """``finetune_student.after_distillation: auto``: the distilled student, or the one finetuned on
    the labeled images if that scores higher (strictly) on labeled images its finetune did not see.
    With data.val those are data.val, and the finetuned copy is the result. Without, a held-out slice
    of data.train (``check_split``) judges a copy finetuned on the rest; if it wins, the distilled
    student is finetuned on all the labeled images. A tie keeps the distilled student. The teacher
    was finetuned on the held-out slice too, which can only favour the distilled student (whose
    targets came from it): the check errs towards the recipe's default."""
    fs = cfg.finetune_student
    saved = out / "finetune_check.json"
    loops: dict[str, LoopResult] = {}
    decision: dict[str, Any] | None = json.loads(saved.read_text()) if saved.exists() else None
    if cfg.data.val is not None:
        judge = open_labeled(
            cfg.data.val, what="val", classes=classes, seed=cfg.seed, cache=cfg.data.cache_images
        )
        tuned = copy.deepcopy(student)
        loops["finetune"] = finetune(tuned, train, out / "last.ckpt", STUDENT_FINETUNE, fs.steps)
        if decision is None:
            decision = _compare(student, tuned, judge, device, on="data.val")
            atomic_write_json(saved, decision)
        return (tuned if decision["finetune"] else student), loops, decision
    kept, held = check_split(train, fs.check_fraction, cfg.seed)
    if decision is None and not held:
        decision = {
            "finetune": False,
            "on": None,
            "reason": "too few labeled images to check a finetune (a class needs 3 or more); kept as distilled",
        }
        atomic_write_json(saved, decision)
    if decision is None:
        probe = copy.deepcopy(student)
        loops["finetune_check"] = finetune(
            probe, train.subset(kept), out / "check.ckpt", STUDENT_FINETUNE_CHECK, fs.steps
        )
        decision = _compare(
            student, probe, train.subset(held), device, on=f"{len(held)} held-out labeled images"
        )
        atomic_write_json(saved, decision)
        del probe
    loops["finetune"] = finetune(
        student, train, out / "last.ckpt", STUDENT_FINETUNE, fs.steps if decision["finetune"] else 0
    )
    return student, loops, decision


def _compare(
    distilled: ImageClassifier, tuned: ImageClassifier, judge: ImageDataset, device: torch.device, *, on: str
) -> dict[str, Any]:
    before = evaluate_model(distilled, judge, device=device, batch_size=256)["top1"]
    after = evaluate_model(tuned, judge, device=device, batch_size=256)["top1"]
    better = after > before
    verdict = "finetuned" if better else "kept as distilled"
    reason = f"top-1 on {on}: distilled {before:.1f}, finetuned {after:.1f}; {verdict}"
    log.info("finetune check: %s", reason)
    return {"finetune": better, "on": on, "distilled_top1": before, "finetuned_top1": after, "reason": reason}


def evaluate(
    cfg: TrainConfig, inputs: Outputs, out_dir: str | Path, reporter: Reporter | None = None
) -> Outputs:
    """Top-1, per-class accuracy and confusion matrix on data.test for every model given."""
    cfg = resolve_sizes(cfg)
    out = _stage_begin(out_dir, cfg)
    if out is None:
        return read_outputs(out_dir)
    device = resolve_device(cfg.device)
    results: dict[str, Any] = {}
    for role in ("student", "teacher"):
        if not inputs.get(role):
            continue
        model, ckpt = load_checkpoint(inputs[role])
        test = open_labeled(
            cfg.data.test,
            what="test",
            classes=list(ckpt["classes"]),
            seed=cfg.seed,
            cache=cfg.data.cache_images,
        )
        model = _to_device(model, device, channels_last=True)
        results[role] = evaluate_model(
            model, test, device=device, batch_size=256, classes=list(ckpt["classes"])
        )
    if not results:
        raise ConfigError(
            "evaluate needs a model: run a training stage first or pass inputs['student'] / inputs['teacher']"
        )
    atomic_write_json(out / "metrics.json", results)
    return mark_done(
        out, {"metrics": str(out / "metrics.json"), **{f"{r}_top1": m["top1"] for r, m in results.items()}}
    )


def exported_formats(outputs: Outputs) -> list[str]:
    """The formats an export stage's outputs hold (outputs of every version of the stage)."""
    from .export import SUPPORTED_FORMATS

    if isinstance(outputs.get("formats"), list):
        return [str(f) for f in outputs["formats"]]
    return [f for f in SUPPORTED_FORMATS if isinstance(outputs.get(f), str)]


def export(
    cfg: TrainConfig, inputs: Outputs, out_dir: str | Path, reporter: Reporter | None = None
) -> Outputs:
    """safetensors (plain timm state dict), ONNX and TorchScript, each verified, plus model_card.json.

    A format that fails its check (``kt_train.export.measure_parity``) does not fail the stage: it
    is left out, the others are written, and ``failed_formats`` (outputs and card) says by how much
    it failed. Outputs: a path per written format and ``card``; ``formats``, ``failed_formats`` and
    ``parity`` (the measured numbers per verified format). Run again on a finished out_dir with a
    format it does not hold in ``export.formats``, the stage exports that format anew alongside the
    ones it holds (``kt train --stages export``).
    """
    from .export import SUPPORTED_FORMATS, export_model
    from .specs import ModelSpec

    cfg = resolve_sizes(cfg)
    formats: list[str] = list(cfg.export.formats)
    done = read_outputs(out_dir) if is_done(out_dir) else None
    if done is not None:
        held = exported_formats(done)
        missing = [f for f in formats if f not in held]
        if not missing:
            return done
        formats = [f for f in SUPPORTED_FORMATS if f in held or f in formats]
    if not inputs.get("student"):
        raise ConfigError("export needs a student checkpoint: run finetune_student (or distill) first")
    if done is not None:
        log.info("export: exporting %s again, with %s", ", ".join(missing), ", ".join(held) or "nothing")
        (Path(out_dir) / SUCCESS).unlink()
    out = _stage_begin(out_dir, cfg)
    assert out is not None
    model, ckpt = load_checkpoint(inputs["student"])
    recipe = model.recipe
    dc = model.data_config
    card = {
        "classes": ckpt["classes"],
        # what evaluate applied to reach metrics.test: the card's preprocessing is that very dict
        "preprocessing": preprocessing(model),
        "metrics": {**ckpt.get("metrics", {}), **_test_metrics(inputs)},
        "lineage": {
            **ckpt.get("lineage", {}),
            "student": recipe.spec,
            "config": cfg.model_dump(mode="json"),
            "git_commit": _git_commit(),
        },
    }
    files = export_model(
        model.net.eval(),
        timm_name=ModelSpec.parse(recipe.spec).name,
        model_kwargs=recipe.model_kwargs,
        num_classes=recipe.num_classes,
        input_size=dc.input_size,
        out_dir=out,
        formats=formats,
        card=card,
        opset=cfg.export.opset,
        mean=dc.mean,
        std=dc.std,
        strict=False,
    )
    written = json.loads(files["card"].read_text(encoding="utf-8"))
    failed = dict(written.get("failed_formats") or {})
    for fmt, reason in failed.items():
        log.warning(
            "export: %s left out: %s (the other formats are kept; after a fix, export it again with "
            "`kt train --stages export --set export.formats=[%s]`)",
            fmt,
            reason,
            fmt,
        )
    outputs: Outputs = {k: str(v) for k, v in files.items()}
    outputs.update(
        formats=[f for f in files if f != "card"],
        failed_formats=failed,
        parity=written.get("export", {}).get("parity", {}),
    )
    return mark_done(out, outputs)


def _test_metrics(inputs: Outputs) -> dict[str, Any]:
    """The student's test metrics for the model card, from the evaluate stage (if it ran first)."""
    path = inputs.get("test_metrics")
    if not path or not Path(path).is_file():
        return {}
    student = json.loads(Path(path).read_text(encoding="utf-8")).get("student")
    if not isinstance(student, dict):
        return {}
    # the confusion matrix (classes x classes) stays in evaluate/metrics.json
    return {"test": {k: student[k] for k in ("top1", "n", "per_class") if k in student}}


def curate(
    cfg: TrainConfig, inputs: Outputs, out_dir: str | Path, reporter: Reporter | None = None
) -> Outputs:
    """Curate the transfer set from ``curate.gallery`` with the labeled images as queries; writes
    manifest.{jsonl,csv,parquet}, report.html and summary.json. Skipped without a gallery."""
    cc = cfg.curate
    if cc.gallery is None:
        return {"skipped": "curate.gallery is not set; distill uses data.transfer"}
    cfg = resolve_sizes(cfg)
    out = _stage_begin(out_dir, cfg)
    if out is None:
        return read_outputs(out_dir)
    from .curate import curate_transfer_set, write_transfer_report
    from .embed import Encoder
    from .gallery import Gallery

    gallery = Gallery.open(cc.gallery)
    labeled = open_labeled(cfg.data.train, what="train", seed=cfg.seed, cache=cfg.data.cache_images)
    guard = []
    if cc.guard_eval_sets:
        for what, ref in (("val", cfg.data.val), ("test", cfg.data.test)):
            if ref is not None:
                guard.append(open_unlabeled(ref, what=what, seed=cfg.seed, cache=False))
    for path in inputs.get("guard") or []:
        guard.append(open_unlabeled(DatasetRef(path=str(path)), what="guard", cache=False))
    teacher, teacher_classes = None, None
    if cc.teacher_filter or cc.teacher_rerank > 0:
        if "teacher" not in inputs:
            raise ConfigError(
                "curate.teacher_filter / curate.teacher_rerank need the finetuned teacher: run "
                "finetune_teacher before curate"
            )
        teacher, ckpt = load_checkpoint(inputs["teacher"])
        teacher_classes = list(ckpt["classes"])
    encoder = Encoder.from_spec(cc.encoder) if cc.encoder else None
    ts = curate_transfer_set(
        gallery, labeled, cc, encoder=encoder, guard=guard, teacher=teacher, teacher_classes=teacher_classes
    )
    files = ts.write(out, cc.formats)
    if cc.report:
        title = f"Transfer set: {cc.size} items from {gallery.name}"
        files["report"] = str(write_transfer_report(ts, out / "report.html", gallery, labeled, title))
    manifest = files[f"manifest_{cc.formats[0]}"]
    return mark_done(out, {"manifest": manifest, "size": len(ts), **files, "summary": ts.summary})


def _transfer_ref(cfg: TrainConfig, inputs: Outputs) -> DatasetRef:
    """The transfer set: the curate stage's manifest when it ran, else data.transfer."""
    if inputs.get("transfer"):
        return DatasetRef(path=str(inputs["transfer"]))
    if cfg.data.transfer is None:
        raise ConfigError(
            "no transfer set: set data.transfer (unlabeled images) or curate.gallery (curate one from a gallery)"
        )
    return cfg.data.transfer


DATA_PARALLEL_STAGES = frozenset({"distill"})

STAGE_FUNCS = {
    "finetune_teacher": finetune_teacher,
    "curate": curate,
    "distill": distill,
    "finetune_student": finetune_student,
    "export": export,
    "evaluate": evaluate,
}


# --------------------------------------------------------------------------- shared pieces


def _probe_mode(teacher: ImageClassifier) -> None:
    teacher.eval()
    if teacher.head is not None:
        teacher.head.train()


def _classes(cfg: TrainConfig, inputs: Outputs) -> list[str]:
    if inputs.get("classes"):
        return list(inputs["classes"])
    return list(open_labeled(cfg.data.train, what="train", seed=cfg.seed, cache=False).classes or [])


def _labeled_stream(cfg: TrainConfig, classes: list[str], size: int, opt: OptimConfig):
    train = with_transform(
        open_labeled(
            cfg.data.train, what="train", classes=classes, seed=cfg.seed, cache=cfg.data.cache_images
        ),
        augment_for(opt, size),
    )
    loader = torch.utils.data.DataLoader(
        train, batch_size=min(opt.batch_size, len(train)), shuffle=True, drop_last=True
    )
    while True:
        for x, y, _ in loader:
            yield x, y


def _finish_student(
    cfg, out, student, classes, device, loops, *, lineage, bad, evaluate: bool = True, extra=None
) -> Outputs:
    student.eval()
    metrics = _val_metrics(cfg, student, classes, device) if evaluate else {}
    timings = _save_history(out, **loops)
    save_checkpoint(out / "student.pt", student.cpu(), classes=classes, metrics=metrics, lineage=lineage)
    return mark_done(
        out,
        {
            "checkpoint": str(out / "student.pt"),
            "classes": classes,
            "metrics": metrics,
            "timings": timings,
            "bad_images": bad,
            "lineage": lineage,
            **(extra or {}),
        },
    )


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def run_order(stages: list[str] | tuple[str, ...]) -> list[str]:
    """The order ``stages`` run in: as given, except that ``evaluate`` runs just before ``export``.

    evaluate needs only the student checkpoint; run first, its metrics survive an export that
    fails, and the model card can carry them."""
    order = list(stages)
    if "evaluate" in order and "export" in order and order.index("evaluate") > order.index("export"):
        order.remove("evaluate")
        order.insert(order.index("export"), "evaluate")
    return order


def wire_outputs(name: str, res: Outputs, inputs: Outputs) -> None:
    """Feed stage ``name``'s outputs ``res`` to the stages after it (``inputs``)."""
    if name == "finetune_teacher":
        inputs["teacher"], inputs["classes"] = res["checkpoint"], res["classes"]
    elif name == "curate" and res.get("manifest"):
        inputs["transfer"] = res["manifest"]
    elif name in ("distill", "finetune_student"):
        inputs["student"], inputs["classes"] = res["checkpoint"], res["classes"]
    elif name == "evaluate" and res.get("metrics"):
        inputs["test_metrics"] = res["metrics"]


def finished_inputs(root: str | Path, stages: list[str] | tuple[str, ...]) -> Outputs:
    """Inputs from the stages an earlier run finished under ``root`` that run before every one of
    ``stages`` (``run_order(STAGES)``): ``stages=[export]`` exports the student trained before."""
    order = run_order(STAGES)
    first = min((order.index(s) for s in stages if s in order), default=0)
    inputs: Outputs = {}
    for name in order[:first]:
        if is_done(Path(root) / name):
            wire_outputs(name, read_outputs(Path(root) / name), inputs)
    return inputs


def stage_funcs(cfg: TrainConfig) -> dict[str, Callable[..., Outputs]]:
    """The stage functions of ``cfg.task`` (``kt_train.tasks``): classification's are this module's."""
    if cfg.task == "segmentation":
        from .tasks import segmentation_stages

        return segmentation_stages.STAGE_FUNCS
    return STAGE_FUNCS


def seed_run(cfg: TrainConfig) -> None:
    """Seed the global RNG the models are initialized from (a new head, a random-init student) with
    ``cfg.seed``, before the first stage: the same config gives the same models whatever ran in
    the process before (a worker runs many jobs), so two jobs with the same data, teacher, recipe
    and seed finetune byte-identical teachers on CPU and share their teacher-output cache."""
    torch.manual_seed(cfg.seed)


def run_pipeline(cfg: TrainConfig, reporter: Reporter | None = None) -> dict[str, Outputs]:
    """Run ``cfg.stages`` (in ``run_order``) under ``cfg.out_dir``, each stage fed the outputs
    before it, and those of stages before them that an earlier run finished (``finished_inputs``)."""
    init_from_env(cfg.device)  # first: joining the group may draw from the global RNG
    seed_run(cfg)
    main = rank() == 0
    funcs = stage_funcs(cfg)
    if cfg.task == "classification":
        cfg = resolve_sizes(cfg)
    root = Path(cfg.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    if main:
        atomic_write_text(root / "config.yaml", dump_config(cfg))
    results: dict[str, Outputs] = {}
    inputs: Outputs = finished_inputs(root, cfg.stages)
    for name in run_order(cfg.stages):
        t0 = time.perf_counter()
        finished_before = is_done(root / name)
        if hasattr(reporter, "begin_stage"):  # a reporter that tracks stages (kt_train.progress)
            reporter.begin_stage(name)  # type: ignore[union-attr]
        parallel = name in DATA_PARALLEL_STAGES and cfg.distill.method == "task_oriented"
        if parallel or not is_distributed():
            res = funcs[name](cfg, dict(inputs), root / name, reporter)
        else:  # under torchrun, the other stages run on rank 0 while the rest wait
            res = funcs[name](cfg, dict(inputs), root / name, reporter) if main else {}
            barrier()
            if not main and is_done(root / name):
                res = read_outputs(root / name)
        res = {**res, "seconds": round(time.perf_counter() - t0, 2)}
        results[name] = res
        wire_outputs(name, res, inputs)
        if hasattr(reporter, "end_stage"):
            reporter.end_stage(name, done=finished_before)  # type: ignore[union-attr]
    if main:
        atomic_write_json(root / "summary.json", results)
    log.info("pipeline done: %s", json.dumps({k: v.get("metrics") for k, v in results.items()}, default=str))
    return results
