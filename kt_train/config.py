"""The training config: one YAML file, validated strictly, every key documented.

Unknown keys are errors (a typo that silently falls back to a default costs a GPU day).
``describe_keys()`` renders the reference that ``kt train --help`` prints.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .formats import refuse_unsupported

STAGES = ("finetune_teacher", "curate", "distill", "finetune_student", "export", "evaluate")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetRef(_Strict):
    path: str = Field(
        description="ImageFolder directory or .zip, or a CSV/JSONL manifest with path,label columns; "
        "unlabeled sets also take webdataset .tar shards (a directory, a list, or name-{000..009}.tar)"
    )
    split: str | None = Field(
        None, description="list file: keep only these entries (one relative path per line)"
    )
    root: str | None = Field(None, description="base directory for relative paths in a manifest")
    max_items: int | None = Field(None, ge=1, description="use a seeded random subset of this many items")


class AugmentConfig(_Strict):
    scale_min: float = Field(0.25, gt=0, le=1, description="smallest RandomResizedCrop area fraction")
    hflip: bool = Field(True, description="random horizontal flips")
    vflip: bool = Field(False, description="random vertical flips (aerial / microscopy images)")
    color_jitter: float = Field(0.0, ge=0, le=1, description="brightness/contrast/saturation jitter strength")


class OptimConfig(_Strict):
    steps: int = Field(100, ge=0, description="optimizer steps (0 skips this phase)")
    batch_size: int = Field(64, ge=1, description="images per step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW; cosine decay after linear warmup)")
    weight_decay: float = Field(
        0.05, ge=0, description="AdamW weight decay (not applied to norms and biases)"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy loss")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="training augmentation")
    ema_decay: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="keep an exponential moving average of the weights (each step: avg = decay x avg + "
        "(1 - decay) x weights) and end the phase with it; averages over the last ~1/(1 - decay) steps "
        "(null or 0: off, the phase ends with its last step's weights)",
    )
    ema_start: int = Field(
        0,
        ge=0,
        description="with ema_decay: the average starts from the weights after this many steps (0: the "
        "phase's starting weights, which keep a share of decay^(steps - ema_start) in the result)",
    )

    @model_validator(mode="after")
    def _ema_starts_before_the_end(self) -> OptimConfig:
        if self.ema_decay and self.steps > 0 and self.ema_start >= self.steps:
            raise ValueError(
                f"ema_start ({self.ema_start}) must be below steps ({self.steps}): the average would be "
                "the last step's weights; lower ema_start or drop ema_decay"
            )
        return self


def _image_size(value: Any) -> int | str | None:
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be a side in pixels (an integer >= 8) or 'auto'")
    if value < 8:
        raise ValueError("must be at least 8 pixels (or 'auto')")
    return value


# An input side in pixels, "auto" (follows the labeled images, kt_train.sizing) or None (the model's).
ImageSize = Annotated[int | str | None, BeforeValidator(_image_size)]


class TeacherConfig(_Strict):
    model: str = Field(
        "timm:test_vit", description="model spec timm:<name>[@tag|path] or open_clip:<arch>[@tag|path]"
    )
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra create_model kwargs")
    head: Literal["linear", "mlp"] = Field("linear", description="task head on the pooled features")
    image_size: ImageSize = Field(
        None,
        description="input side in pixels (default: the model's); auto: follows the labeled images "
        "(1.5x the student's auto size, see kt_train.sizing)",
    )
    norm_eval: bool = Field(False, description="keep batch-norm layers in eval mode while finetuning")


class StudentConfig(_Strict):
    model: str = Field("timm:resnet10t", description="timm model spec of the student")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model kwargs")
    image_size: ImageSize = Field(
        None,
        description="input side in pixels (default: the model's); auto: the labeled images' median "
        "shorter side, rounded to 32 and clamped to 64..224 (see kt_train.sizing)",
    )


class DataConfigSection(_Strict):
    train: DatasetRef | None = Field(None, description="the labeled images")
    val: DatasetRef | None = Field(None, description="labeled images for validation (never trained on)")
    test: DatasetRef | None = Field(None, description="labeled images the evaluate stage reports on")
    transfer: DatasetRef | None = Field(None, description="the unlabeled transfer set for distillation")
    view_size: int | None = Field(
        None, ge=8, description="side of the augmented view both models see (default: the larger input size)"
    )
    cache_images: bool = Field(
        True,
        description="decode every image once and keep it in memory (skipped, with a warning, when the decoded "
        "images would take more than half the memory available)",
    )
    num_workers: int | None = Field(
        None,
        ge=0,
        description="DataLoader worker processes (0 = in the training process; default: 0 on CPU, where "
        "the cores are busy training, min(8, cores - 1) on CUDA)",
    )


class FinetuneTeacherConfig(_Strict):
    linear_probe: OptimConfig = Field(
        default_factory=lambda: OptimConfig(steps=100, lr=1e-2, weight_decay=0.0),
        description="phase 1: train the head only on frozen features",
    )
    full_finetune: OptimConfig = Field(
        default_factory=lambda: OptimConfig(steps=0, lr=1e-4),
        description="phase 2: finetune all layers (steps 0 = linear probe only)",
    )
    layer_decay: float | None = Field(
        None, gt=0, le=1, description="layer-wise lr decay in the full finetune (ViTs: 0.65-0.75)"
    )


class TeacherCacheConfig(_Strict):
    mode: Literal["auto", "online", "cached"] = Field(
        "auto",
        description="online: run the teacher on every training view; cached: run it once on `views` "
        "stored views per image and replay them (no teacher in the loop); auto: cached when that takes "
        "fewer teacher passes (views x images < steps x batch_size)",
    )
    views: int = Field(
        8,
        ge=1,
        le=1024,
        description="augmented views stored per transfer image (with `replays`: at most this many)",
    )
    replays: int | None = Field(
        None,
        ge=1,
        description="size the views to the schedule: views per image = ceil(steps x batch_size / (images x "
        "replays)), between 1 and `views`, so each stored view is replayed about this many times and the "
        "cache costs about 1/replays of the teacher passes of online distillation (null: always `views`)",
    )
    topk: int = Field(10, ge=1, description="teacher logits stored per view (all classes when fewer)")
    dir: str | None = Field(
        None,
        description="where caches live, one directory per (teacher, transfer set, augmentation, views, "
        "topk, seed); share it between runs to reuse a cache (default: <out_dir>/teacher_cache)",
    )
    max_bytes: int | None = Field(
        None,
        ge=0,
        description="cap on the bytes of the caches in `dir`: past it, the least recently used caches that "
        "no run is building or reading are deleted after a cache is opened or built (null or 0: no cap)",
    )
    batch_size: int = Field(256, ge=1, description="teacher batch size while building the cache")


class DistillConfig(OptimConfig):
    method: Literal["task_oriented", "task_agnostic"] = Field(
        "task_oriented",
        description="task_oriented: match the finetuned teacher's class probabilities; "
        "task_agnostic: match frozen backbone features (baseline)",
    )
    temperature: float = Field(4.0, gt=0, description="softmax temperature of the KL term")
    ce_weight: float = Field(0.0, ge=0, description="weight of a cross-entropy term on labeled batches")
    feature_loss: Literal["cosine", "contrastive"] = Field(
        "cosine", description="task_agnostic only: how projected student features match teacher features"
    )
    feature_source: Literal["pretrained", "finetuned"] = Field(
        "pretrained",
        description="task_agnostic only: features of the pretrained or the finetuned teacher backbone",
    )
    cache: TeacherCacheConfig = Field(
        default_factory=TeacherCacheConfig, description="task_oriented only: teacher-output cache"
    )


class FinetuneStudentConfig(OptimConfig):
    after_distillation: bool | Literal["auto"] = Field(
        True,
        description="finetune a task-distilled student too; false keeps it as distilled (the labeled images "
        "then train only a student from scratch or after task-agnostic distillation, whose head is untrained); "
        "auto: finetune only if that scores higher on labeled images the finetune did not train on (data.val "
        "when set, else a held-out slice of data.train: check_fraction)",
    )
    check_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="after_distillation auto without data.val: share of each class's labeled images held out "
        "to compare the distilled and the finetuned student (classes with fewer than 3 images hold none out)",
    )
    norm_eval: bool = Field(
        False,
        description="keep the student's batch-norm statistics (from distillation) frozen while finetuning",
    )
    scratch_lr: float | None = Field(
        None,
        gt=0,
        description="learning rate when there is no distilled student (training from scratch); default: lr",
    )


class CurateConfig(_Strict):
    gallery: str | None = Field(
        None,
        description="gallery directory made by 'kt gallery build'; unset: the curate stage is skipped and "
        "distill uses data.transfer",
    )
    size: int = Field(5000, ge=1, description="items in the transfer set")
    method: Literal["query_balanced", "knn", "class_balanced", "random"] = Field(
        "query_balanced",
        description="query_balanced (equal quota per labeled image, round-robin); knn (global top-N); "
        "class_balanced (equal quota per class); random",
    )
    crops: int = Field(4, ge=0, le=64, description="crops per labeled image besides the full image")
    crop_scales: list[float] = Field(
        default_factory=lambda: [0.5, 0.75], min_length=1, description="crop side / image side, cycled"
    )
    k_per_crop: int | None = Field(
        None, ge=1, description="gallery hits per query view (default: max(50, 4 x per-query quota))"
    )
    dedup_threshold: float | None = Field(
        0.95, gt=0, le=1, description="drop items with cosine >= this to an item already selected (null: off)"
    )
    leakage_threshold: float | None = Field(
        0.95,
        gt=0,
        le=1,
        description="drop gallery items with cosine >= this to a labeled, val or test image (null: off)",
    )
    guard_eval_sets: bool = Field(
        True, description="also guard against near-duplicates of data.val and data.test images"
    )
    min_score: float | None = Field(
        None, ge=-1, le=1, description="drop items whose cosine to their query is below this"
    )
    gallery_crops: int = Field(
        0, ge=0, le=16, description="also consider this many crops of each top candidate gallery image"
    )
    teacher_filter: bool = Field(
        False,
        description="keep an item for a query only if the finetuned teacher predicts the query's class for it",
    )
    teacher_min_prob: float = Field(
        0.0, ge=0, le=1, description="with teacher_filter: minimum teacher probability"
    )
    top_up: bool = Field(
        True,
        description="when floors leave some queries' quotas unfilled, let the other queries fill the set "
        "up to size (false: those quotas stay unfilled and the set is smaller than asked)",
    )
    teacher_rerank: float = Field(
        0.0,
        ge=0,
        description="rank candidates by gallery-encoder cosine + this x cosine in the finetuned teacher's "
        "feature space (0: off); the teacher knows the task's domain, the gallery encoder finds candidates",
    )
    teacher_pool_factor: int = Field(
        6,
        ge=1,
        description="with teacher_filter/teacher_rerank: run the teacher on the top (factor x quota) "
        "candidates of each query",
    )
    nprobe: int | None = Field(None, ge=1, description="IVF lists visited per search (default: the index's)")
    ef_search: int | None = Field(None, ge=1, description="HNSW search depth (default: the index's)")
    cache_dir: str | None = Field(
        None,
        description="where the embeddings of the query views and of the gallery candidates' crops are kept, "
        "one entry per (encoder, gallery, images, crops); share it between runs to reuse them (null: "
        "embedded every run)",
    )
    cache_max_bytes: int | None = Field(
        None,
        ge=0,
        description="cap on the bytes in `cache_dir`: past it, the least recently used entries are deleted "
        "(null or 0: no cap)",
    )
    encoder: str | None = Field(
        None, description="query encoder spec (default: the one recorded in the gallery)"
    )
    formats: list[Literal["jsonl", "csv", "parquet"]] = Field(
        default_factory=lambda: ["jsonl", "csv", "parquet"],  # type: ignore[arg-type]
        description="manifest formats to write",
    )
    report: bool = Field(
        True, description="write report.html (per-class counts, score histograms, image grid)"
    )
    seed: int = Field(0, description="seed of crop positions and random selection")

    @field_validator("crop_scales")
    @classmethod
    def _scales_in_range(cls, v: list[float]) -> list[float]:
        bad = [s for s in v if not 0 < s <= 1]
        if bad:
            raise ValueError(f"crop scales must be in (0, 1], got {bad}")
        return v


class SegmentationConfig(_Strict):
    """``task: segmentation`` only (``kt_train.tasks.segmentation``)."""

    input_size: tuple[int, int] | None = Field(
        None,
        description="[H, W] fed to teacher and student; default: the first labeled frame scaled so that "
        "its longer side is at most 320 px",
    )
    classes: list[str] | None = Field(None, description="class names; default: the dataset's classes.json")
    void_index: int | None = Field(None, ge=0, le=255, description="mask value ignored by losses and metrics")
    teacher_decoder_channels: int = Field(128, ge=4, description="LR-ASPP width of the teacher's head")
    student_decoder_channels: int = Field(64, ge=4, description="LR-ASPP width of the student's decoder")
    backbone_lr_scale: float = Field(
        0.1, ge=0, le=1, description="the teacher backbone's lr as a share of full_finetune.lr (the head's)"
    )


class ExportConfig(_Strict):
    # TFLite, Core ML, OpenVINO, ...: a clear refusal naming the conversion (kt_train.formats)
    formats: Annotated[
        list[Literal["safetensors", "onnx", "torchscript"]], BeforeValidator(refuse_unsupported)
    ] = Field(
        default_factory=lambda: ["safetensors", "onnx", "torchscript"],  # type: ignore[arg-type]
        description="files to write",
    )
    opset: int = Field(17, ge=11, description="ONNX opset")


class TrainConfig(_Strict):
    seed: int = Field(0, description="seed of every random choice")
    task: Literal["classification", "segmentation"] = Field(
        "classification", description="classification (image labels) or segmentation (index masks)"
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    out_dir: str = Field("runs/kt", description="where each stage writes <out_dir>/<stage>/")
    stages: list[Literal[STAGES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(STAGES), description=f"stages to run, in order: {', '.join(STAGES)}"
    )
    checkpoint_every: int | None = Field(
        None, ge=1, description="save last.ckpt every N steps (default: every epoch of the data)"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast precision of forward passes; auto: bf16 on CUDA, fp32 on CPU"
    )
    channels_last: bool = Field(
        True,
        description="channels_last (NHWC) memory format for the models (faster convnets on CPU and CUDA)",
    )
    compile: bool = Field(False, description="torch.compile the student (CUDA; the first steps compile)")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfigSection = Field(default_factory=DataConfigSection)
    finetune_teacher: FinetuneTeacherConfig = Field(default_factory=FinetuneTeacherConfig)
    distill: DistillConfig = Field(default_factory=lambda: DistillConfig(steps=200, lr=2e-3))
    finetune_student: FinetuneStudentConfig = Field(
        default_factory=lambda: FinetuneStudentConfig(steps=100, lr=5e-4)
    )
    curate: CurateConfig = Field(default_factory=CurateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    segmentation: SegmentationConfig = Field(default_factory=SegmentationConfig)


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys at a config location, for did-you-mean hints."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        sub = _submodel(field)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _explain(e: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in e.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _field_names(TrainConfig, loc), n=1)
            hint = f" (did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?)" if close else ""
            lines.append(f"unknown key '{key}'{hint}; `kt train --help` lists every key")
        else:
            lines.append(f"'{key}': {err['msg']} (got {err.get('input')!r})")
    return ConfigError(f"invalid config {source}:\n  " + "\n  ".join(lines))


def parse_config(data: dict[str, Any] | None, source: str = "") -> TrainConfig:
    try:
        return TrainConfig.model_validate(data or {})
    except ValidationError as e:
        raise _explain(e, source) from None


def set_key(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply a ``a.b.c=value`` override to a nested dict."""
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    data: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys, not {type(data).__name__}")
        source = str(p)
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        k, v = ov.split("=", 1)
        set_key(data, k.strip(), yaml.safe_load(v))
    return parse_config(data, source)


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _submodel(field: Any) -> type[BaseModel] | None:
    ann = field.annotation
    for a in (ann, *getattr(ann, "__args__", ())):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _fmt(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def describe_keys(
    model: type[BaseModel] = TrainConfig, value: BaseModel | None = None, prefix: str = ""
) -> list[tuple[str, str, str]]:
    """(key, default, description) for every key, depth first: the reference `kt train --help` prints."""
    if value is None and model is TrainConfig:
        value = TrainConfig()
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        v = (
            getattr(value, name)
            if value is not None
            else (None if field.is_required() else field.get_default(call_default_factory=True))
        )
        sub = _submodel(field)
        if sub is not None:
            rows.append((key, "" if isinstance(v, BaseModel) else _fmt(v), field.description or ""))
            rows.extend(describe_keys(sub, v if isinstance(v, BaseModel) else None, f"{key}."))
        else:
            rows.append((key, "(required)" if field.is_required() else _fmt(v), field.description or ""))
    return rows
