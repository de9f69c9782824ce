"""API request/response models, one family per resource (``<Resource>Public``, ``<Resource>sPublic``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from kt_train.formats import refuse_unsupported
from service.model_specs import check_model_spec


class Message(BaseModel):
    detail: str


class DatasetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    task: Literal["classification", "segmentation"] = Field(
        "classification",
        description="classification: class folders of images; segmentation: image + index-mask pairs "
        "(`classes`: the mask values' names, `class_counts`: frames each class appears in, "
        "`num_images`: image + mask pairs)",
    )
    status: str
    num_images: int
    classes: list[str]
    class_counts: dict[str, int]
    bytes: int
    created_at: datetime


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


# --- jobs, transfer sets, galleries, models

_ID = Field(min_length=1, max_length=32, description="A resource id (32 hex characters).")

ExportFormat = Literal["safetensors", "onnx", "torchscript"]
IndexKind = Literal["auto", "flat", "hnsw", "ivf_flat", "ivf_pq"]
# Largest `offset` a listing accepts: past it there is nothing to list, and a bigger number would
# overflow the database's integer (a 500 instead of an empty page).
MAX_OFFSET = 2**31 - 1
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]{1,2})?)$"
_DEVICE = Field(
    None,
    pattern=DEVICE_PATTERN,
    description="`cuda` (or `cuda:N`) runs the job on a GPU worker (queue `gpu`), `cpu` on a CPU worker "
    "(queue `cpu`); unset or `auto`: the server's default queue (KT_DEFAULT_QUEUE), on its best device.",
)
ManifestFormat = Literal["jsonl", "csv", "parquet"]
CurateMethod = Literal["query_balanced", "knn", "class_balanced", "random"]


# Model specs name a timm / open_clip architecture and a pretrained tag those libraries list, or a
# registered model (`timm:<arch>@registered:<name>`, resolved per tenant at submit); never a path
# (the API never opens files a request names). `service.model_specs` says why a spec is refused.
def _teacher_spec(spec: str) -> str:
    return check_model_spec(spec, "teacher")


def _student_spec(spec: str) -> str:
    return check_model_spec(spec, "student")


NUL_IN_STRING = "contains a NUL character (\\u0000), which no id, name, path or spec has; remove it"


def _has_nul(value: Any) -> bool:
    """A string with a NUL, or a list holding one (raw input: a dict is a nested request model's
    body, which that model's own fields check, so the error names the exact field)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list | tuple):
        return any(isinstance(v, str) and "\x00" in v for v in value)
    return False


class _Request(BaseModel):
    """A request body: unknown fields refused, and no string anywhere in it may hold a NUL
    (PostgreSQL text cannot store one; refused here as 422 before any work)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        if _has_nul(value):  # before the field's own checks, whose messages would echo the NUL
            raise ValueError(NUL_IN_STRING)
        return value


class StageSteps(_Request):
    """Steps per stage (kept for older clients; `recipe.*` is the preferred way to set them)."""

    finetune_teacher: int | None = Field(
        None,
        ge=0,
        le=100_000,
        description="Teacher linear-probe steps (= `recipe.teacher.linear_probe_steps`).",
    )
    distill: int | None = Field(
        None, ge=0, le=1_000_000, description="Distillation steps (= `recipe.distill.steps`)."
    )
    finetune_student: int | None = Field(
        None,
        ge=0,
        le=100_000,
        description="Student finetuning steps (= `recipe.finetune_student.steps`; more than 0 also finetunes "
        "a task-distilled student unless `recipe.finetune_student.after_distillation` says otherwise).",
    )


class StageBatchSizes(_Request):
    """Batch size per stage (unset: the budget's); `recipe.distill.batch_size` is the preferred way
    for distillation."""

    finetune_teacher: int | None = Field(None, ge=1, le=4096, description="Teacher linear-probe batch size.")
    distill: int | None = Field(None, ge=1, le=4096, description="= `recipe.distill.batch_size`.")
    finetune_student: int | None = Field(None, ge=1, le=4096, description="Student finetuning batch size.")


class StageLearningRates(_Request):
    """Peak learning rate per stage (kept for older clients; `recipe.*` is the preferred way)."""

    finetune_teacher: float | None = Field(
        None, gt=0, le=1, description="= `recipe.teacher.linear_probe_lr`."
    )
    distill: float | None = Field(None, gt=0, le=1, description="= `recipe.distill.lr`.")
    finetune_student: float | None = Field(None, gt=0, le=1, description="= `recipe.finetune_student.lr`.")


Budget = Literal["fast", "balanced", "best"]  # kt_train.recipe.BUDGETS
CacheMode = Literal["auto", "online", "cached"]
_FROM_BUDGET = " Unset: the budget's."


class TeacherRecipe(_Request):
    """How the teacher is finetuned on the labeled images: a linear probe, then a full finetune."""

    linear_probe_steps: int | None = Field(
        None, ge=0, le=100_000, description="Steps training the head on frozen features." + _FROM_BUDGET
    )
    linear_probe_lr: float | None = Field(
        None, gt=0, le=1, description="Peak learning rate of the linear probe." + _FROM_BUDGET
    )
    full_finetune_steps: int | None = Field(
        None,
        ge=0,
        le=100_000,
        description="Steps finetuning all layers after the probe (0: linear probe only)." + _FROM_BUDGET,
    )
    full_finetune_lr: float | None = Field(
        None, gt=0, le=1, description="Peak learning rate of the full finetune." + _FROM_BUDGET
    )
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Layer-wise learning-rate decay in the full finetune (ViTs: 0.65-0.75)." + _FROM_BUDGET,
    )
    norm_eval: bool | None = Field(
        None, description="Keep the teacher's batch-norm layers in eval mode while finetuning." + _FROM_BUDGET
    )


class DistillRecipe(_Request):
    """How the student learns from the teacher on the transfer set."""

    steps: int | None = Field(
        None,
        ge=0,
        le=1_000_000,
        description="Distillation steps: the knob the budgets turn (where the accuracy comes from)."
        + _FROM_BUDGET,
    )
    lr: float | None = Field(None, gt=0, le=1, description="Peak learning rate." + _FROM_BUDGET)
    batch_size: int | None = Field(None, ge=1, le=4096, description="Images per step." + _FROM_BUDGET)
    temperature: float | None = Field(
        None,
        gt=0,
        le=100,
        description="Softmax temperature of the student-teacher KL term." + _FROM_BUDGET,
    )
    ce_weight: float | None = Field(
        None,
        ge=0,
        le=100,
        description="Weight of a cross-entropy term on labeled batches (0: distillation only)."
        + _FROM_BUDGET,
    )
    cache_views: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Augmented views per transfer image whose teacher outputs are cached." + _FROM_BUDGET,
    )
    cache_mode: CacheMode | None = Field(
        None,
        description="`cached`: run the teacher once over `cache_views` views per image and replay them; "
        "`online`: run it on every training view; `auto`: cached when that takes fewer teacher passes."
        + _FROM_BUDGET,
    )


class CurateRecipe(_Request):
    """How the transfer set is curated from the gallery (needs `gallery_id`)."""

    size: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Items in the transfer set (= `transfer_set_size`)." + _FROM_BUDGET,
    )
    crops: int | None = Field(
        None, ge=0, le=64, description="Crops per labeled image used as extra queries." + _FROM_BUDGET
    )
    min_score: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="Drop items whose cosine to their query is below this." + _FROM_BUDGET,
    )
    teacher_filter: bool | None = Field(
        None,
        description="Keep an item for a query only if the finetuned teacher predicts the query's class."
        + _FROM_BUDGET,
    )
    teacher_min_prob: float | None = Field(
        None,
        ge=0,
        le=1,
        description="With `teacher_filter`: the teacher's minimum probability." + _FROM_BUDGET,
    )
    top_up: bool | None = Field(
        None,
        description="When the floors (`min_score`, `teacher_min_prob`) leave some classes' quotas unfilled, "
        "let the other queries fill the set up to `size`; `false` keeps every query to its quota and the "
        "set is smaller than asked." + _FROM_BUDGET,
    )
    teacher_rerank: float | None = Field(
        None,
        ge=0,
        le=100,
        description="Rank candidates by gallery cosine + this x cosine in the teacher's feature space "
        "(0: off)." + _FROM_BUDGET,
    )
    dedup_threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Drop items with cosine >= this to an item already selected." + _FROM_BUDGET,
    )


class FinetuneStudentRecipe(_Request):
    """The last training stage: finetune the distilled student on the labeled images."""

    enabled: bool = Field(
        True, description="`false` drops the stage: the exported model is the distilled student."
    )
    steps: int | None = Field(
        None,
        ge=0,
        le=100_000,
        description="Finetuning steps; more than 0 also finetunes a task-distilled student unless "
        "`after_distillation` is given." + _FROM_BUDGET,
    )
    lr: float | None = Field(None, gt=0, le=1, description="Peak learning rate." + _FROM_BUDGET)
    after_distillation: bool | Literal["auto"] | None = Field(
        None,
        description="Finetune a task-distilled student too; `false` keeps it as distilled (the stage then "
        "trains only a student without task distillation); `auto` finetunes only if that scores higher on "
        "a held-out slice of the labeled images (the model's lineage records both scores). Unset: true when the "
        "request gives finetune steps (`steps` or `steps.finetune_student`), else the budget's.",
    )


class RecipeOverrides(_Request):
    """Per-job changes to the budget's recipe; every field unset (null) keeps the budget's value."""

    teacher: TeacherRecipe = Field(
        default_factory=TeacherRecipe, description="Finetuning the teacher on the labeled images."
    )
    distill: DistillRecipe = Field(
        default_factory=DistillRecipe, description="Distilling the teacher into the student."
    )
    curate: CurateRecipe = Field(
        default_factory=CurateRecipe, description="Curating the transfer set (only with `gallery_id`)."
    )
    finetune_student: FinetuneStudentRecipe = Field(
        default_factory=FinetuneStudentRecipe, description="Finetuning the distilled student."
    )


# (legacy field, its value) -> the `recipe` field that sets the same knob
_SAME_KNOB: tuple[tuple[str, str], ...] = (
    ("steps.finetune_teacher", "recipe.teacher.linear_probe_steps"),
    ("steps.distill", "recipe.distill.steps"),
    ("steps.finetune_student", "recipe.finetune_student.steps"),
    ("batch_size.distill", "recipe.distill.batch_size"),
    ("lr.finetune_teacher", "recipe.teacher.linear_probe_lr"),
    ("lr.distill", "recipe.distill.lr"),
    ("lr.finetune_student", "recipe.finetune_student.lr"),
    ("transfer_set_size", "recipe.curate.size"),
)


def _get(model: BaseModel, dotted: str) -> Any:
    value: Any = model
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


class JobCreate(_Request):
    """Train a small model for a dataset: finetune the teacher, (curate a transfer set,) distill,
    finetune the student, export, and evaluate on the test dataset when one is given.

    A job that names only the data and the two models runs the recipe of its `budget` (the one the
    quality benchmark chose); `recipe.*` changes single knobs of it, `seed` makes it repeatable."""

    dataset_id: str = _ID
    test_dataset_id: str | None = Field(None, min_length=1, max_length=32)
    gallery_id: str | None = Field(
        None,
        min_length=1,
        max_length=32,
        description="Curate the transfer set from this gallery; "
        "without one the student distills on the labeled images themselves.",
    )
    transfer_set_size: int | None = Field(
        None, ge=1, le=1_000_000, description="Items to curate (with `gallery_id`; = `recipe.curate.size`)."
    )
    transfer_set_id: str | None = Field(
        None,
        min_length=1,
        max_length=32,
        description="Distill on this ready transfer set of yours (`kt transfer-sets list`) instead of "
        "curating one: the job has no curate stage. Not with `gallery_id`.",
    )
    teacher: Annotated[str, AfterValidator(_teacher_spec)] = Field(
        "timm:vit_small_patch14_dinov2.lvd142m",
        max_length=200,
        description="timm:<name>[@tag] or open_clip:<arch>[@tag]",
    )
    student: Annotated[str, AfterValidator(_student_spec)] = Field(
        "timm:resnet18", max_length=200, description="timm:<name>[@tag]"
    )
    image_size: int | None = Field(
        None,
        ge=32,
        le=1024,
        description="Input side of both models (unset: the budget's recipe). "
        "Not with `teacher_image_size` / `student_image_size`.",
    )
    teacher_image_size: int | None = Field(
        None, ge=32, le=1024, description="Input side of the teacher (unset: the budget's recipe)."
    )
    student_image_size: int | None = Field(
        None, ge=32, le=1024, description="Input side of the student (unset: the budget's recipe)."
    )
    budget: Budget = Field(
        "balanced",
        description="The recipe to run: `fast`, `balanced` or `best` differ in how long the student "
        "learns from the teacher (distillation steps, cached views per image); `recipe.*` overrides "
        "single knobs of it.",
    )
    recipe: RecipeOverrides = Field(
        default_factory=RecipeOverrides,
        description="Per-job changes to the budget's recipe (every field optional).",
    )
    seed: int = Field(
        0, ge=0, le=2**31 - 1, description="Seed of every random choice (data order, views, crops)."
    )
    steps: StageSteps = Field(
        default_factory=StageSteps,
        description="Older form of `recipe.*.steps` (unset: the budget's); prefer `recipe`.",
    )
    batch_size: StageBatchSizes = Field(
        default_factory=StageBatchSizes, description="Batch size per stage (unset: the budget's)."
    )
    lr: StageLearningRates = Field(
        default_factory=StageLearningRates,
        description="Older form of `recipe.*.lr` (unset: the budget's); prefer `recipe`.",
    )
    # TFLite, Core ML, OpenVINO, ...: a 422 naming the conversion from ONNX (kt_train.formats)
    export_formats: Annotated[list[ExportFormat], BeforeValidator(refuse_unsupported)] = Field(
        default_factory=lambda: ["safetensors", "onnx", "torchscript"],  # type: ignore[arg-type]
        min_length=1,
        max_length=3,
    )
    device: str | None = _DEVICE
    webhook_url: str | None = Field(
        None,
        min_length=8,
        max_length=2000,
        description="POST a signed JSON notification here when the job ends (succeeded, failed or "
        "canceled): `https://` (plain `http://` only to hosts the server allows), never to a private or "
        "loopback address unless the server allows its network. The 202 answer carries the "
        "`webhook_secret` that signs it (header `X-KT-Signature: sha256=<HMAC-SHA256 of the body>`); "
        "the job's `webhook` field records each delivery attempt.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> JobCreate:
        if self.image_size is not None and (
            self.teacher_image_size is not None or self.student_image_size is not None
        ):
            raise ValueError(
                "`image_size` sets both models' input side; give either it or "
                "`teacher_image_size` / `student_image_size`, not both"
            )
        for legacy, preferred in _SAME_KNOB:
            old, new = _get(self, legacy), _get(self, preferred)
            if old is not None and new is not None and old != new:
                raise ValueError(
                    f"`{legacy}` ({old}) and `{preferred}` ({new}) set the same knob; give only `{preferred}`"
                )
        if self.transfer_set_id is not None and self.gallery_id is not None:
            raise ValueError(
                "give either `transfer_set_id` (reuse a curated transfer set) or `gallery_id` "
                "(curate a new one), not both"
            )
        student = self.recipe.finetune_student
        if not student.enabled:
            given = [
                name
                for name, value in (
                    ("recipe.finetune_student.steps", student.steps),
                    ("recipe.finetune_student.lr", student.lr),
                    ("recipe.finetune_student.after_distillation", student.after_distillation),
                    ("steps.finetune_student", self.steps.finetune_student),
                    ("batch_size.finetune_student", self.batch_size.finetune_student),
                    ("lr.finetune_student", self.lr.finetune_student),
                )
                if value is not None
            ]
            if given:
                raise ValueError(
                    f"`recipe.finetune_student.enabled` is false, so {', '.join(f'`{g}`' for g in given)} "
                    "would be ignored; remove them or enable the stage"
                )
        return self


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: str
    status: str
    stage: str | None
    progress: float
    eta_s: float | None
    stage_timings: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None
    cancel_requested: bool
    attempts: int
    queue: str = Field(description="The worker queue the job was sent to: `cpu` or `gpu`.")
    request: dict[str, Any] = Field(default_factory=dict, description="The request that created the job.")
    model_id: str | None = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    webhook: dict[str, Any] | None = Field(
        None,
        description="The job-finished notification, when the request gave a `webhook_url`: `url`, "
        "`state` (`waiting` for the job to end, `sending`, `retrying`, `delivered`, `failed`), "
        "`attempts` (each with `at`, `response_status` or `error`), `delivered_at`, `next_attempt_at`.",
    )
    webhook_secret: str | None = Field(
        None,
        description="Only in the answer of `POST /v1/jobs`: the key of the webhook's HMAC-SHA256 "
        "signature (`X-KT-Signature`). Keep it; it is not shown again.",
    )


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class TransferSetCreate(_Request):
    """Curate a transfer set with the default recipe's curation settings (``kt_train/recipe.py``);
    each field left unset takes the recipe's value. With a ``teacher``, the curation job first
    finetunes it on the dataset (the recipe's teacher schedule) and lets it filter and re-rank the
    candidates, as a training job's own curate stage does; a job given this set's id then trains on
    exactly these items."""

    dataset_id: str = _ID
    gallery_id: str = _ID
    size: int = Field(
        5000,
        ge=1,
        le=1_000_000,
        description="Items in the transfer set (at most; floors may leave quotas unfilled).",
    )
    method: CurateMethod = "query_balanced"
    crops: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Crops per labeled image besides the full image (default: the recipe's).",
    )
    dedup_threshold: float | None = Field(
        None, gt=0, le=1, description="Near-duplicate cosine (default: the recipe's)."
    )
    leakage_threshold: float | None = Field(
        None, gt=0, le=1, description="Leakage-guard cosine (default: the recipe's)."
    )
    min_score: float | None = Field(
        None, ge=-1, le=1, description="Floor on the cosine to the query; below it a quota stays unfilled."
    )
    teacher: Annotated[str | None, AfterValidator(lambda v: v if v is None else _teacher_spec(v))] = Field(
        None,
        max_length=200,
        description="Finetune this teacher on the dataset and keep an item only if it predicts the query's "
        "class (with at least `teacher_min_prob`), ranking by gallery + teacher-feature similarity.",
    )
    teacher_min_prob: float | None = Field(
        None, ge=0, le=1, description="With `teacher`: the confidence floor (default: the recipe's)."
    )
    top_up: bool | None = Field(
        None,
        description="When the floors leave some quotas unfilled, let the other queries fill the set up to "
        "`size`; `false` keeps every query to its quota (default: the recipe's).",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: str | None = _DEVICE


class TransferSetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    dataset_id: str
    gallery_id: str
    status: str
    size: int
    params: dict[str, Any]
    summary: dict[str, Any]
    job_id: str | None
    created_at: datetime


class TransferSetsPublic(BaseModel):
    data: list[TransferSetPublic]
    count: int


class GallerySource(_Request):
    """One source of gallery images: a path under the server's KT_GALLERY_ROOTS, or one of the
    caller's uploaded datasets."""

    path: str | None = Field(
        None,
        min_length=2,
        max_length=4096,
        description="Absolute path on the server: an image folder, a .zip, a .tar (or a directory of .tar "
        "shards, or a brace pattern like `/data/shards/{00000..00009}.tar`), or a .csv/.jsonl manifest. "
        "It must lie inside one of the server's KT_GALLERY_ROOTS (symlinks resolved) and outside its data "
        "directory; with no roots configured, server paths are refused (use `dataset_id`).",
    )
    dataset_id: str | None = Field(
        None, min_length=1, max_length=32, description="An uploaded dataset of the caller's tenant."
    )

    @model_validator(mode="after")
    def _one_of(self) -> GallerySource:
        if (self.path is None) == (self.dataset_id is None):
            raise ValueError("give exactly one of `path` (on the server) or `dataset_id` (an upload)")
        return self


# what kt_train.gallery.DEFAULT_ENCODER is (the service does not import kt_train)
DEFAULT_GALLERY_ENCODER = "open_clip:ViT-B-32@laion2b_s34b_b79k"
GALLERY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"


class GalleryBuildCreate(_Request):
    """Embed images into a new shared gallery (admin only); a `build_gallery` job does the work."""

    name: str = Field(
        pattern=GALLERY_NAME_PATTERN,
        description="Unique gallery name: letters, digits, `_`, `.`, `-` (at most 100).",
    )
    sources: list[GallerySource] = Field(min_length=1, max_length=100)
    encoder: Annotated[str, AfterValidator(_teacher_spec)] = Field(
        DEFAULT_GALLERY_ENCODER,
        max_length=200,
        description="The encoder embedding the images: timm:<name>[@tag] or open_clip:<arch>[@tag]. "
        "Curation embeds the queries with the same one.",
    )
    image_size: int | None = Field(None, ge=32, le=1024, description="Encoder input side (default: its own).")
    index_kind: IndexKind = Field("auto", description="FAISS index; `auto` picks by size and memory.")
    batch_size: int = Field(128, ge=1, le=4096)
    shard_size: int = Field(50_000, ge=1, le=10_000_000, description="Images per shard (the unit of resume).")
    device: str | None = _DEVICE
    distributed: bool = Field(
        False,
        description="Build as a Celery canvas: the quantizer trained once, one task per shard taken by any "
        "worker of the queue, the shards merged into one on-disk IVF index. Needs two or more worker slots.",
    )


class GalleryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    size: int
    encoder: str
    index_kind: str
    dim: int
    created_at: datetime


class GalleriesPublic(BaseModel):
    data: list[GalleryPublic]
    count: int


class ModelPublic(BaseModel):
    id: str
    job_id: str | None
    card: dict[str, Any]
    formats: list[str] = Field(description="Formats that can be downloaded.")
    created_at: datetime


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int
