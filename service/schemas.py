"""API request/response models, one family per resource (``<Resource>Public``, ``<Resource>sPublic``)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


class Message(BaseModel):
    detail: str


class DatasetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
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

# A model spec without a weights path (the API never reads files the user names): the library
# prefix, a model name, and optionally "@<pretrained tag>".
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]*"
MODEL_SPEC_PATTERN = rf"^(timm|open_clip):{_NAME}(@{_NAME})?$"
STUDENT_SPEC_PATTERN = rf"^timm:{_NAME}(@{_NAME})?$"
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
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


def _teacher_spec(spec: str) -> str:
    if not re.fullmatch(MODEL_SPEC_PATTERN, spec):
        raise ValueError(
            f"model spec {spec!r} is not of the form 'timm:<name>[@tag]' or 'open_clip:<arch>[@tag]' "
            "(e.g. 'timm:vit_small_patch14_dinov2.lvd142m', 'open_clip:ViT-B-32@openai')"
        )
    return _no_weights_file(spec)


def _student_spec(spec: str) -> str:
    if not re.fullmatch(STUDENT_SPEC_PATTERN, spec):
        raise ValueError(
            f"student spec {spec!r} is not of the form 'timm:<name>[@tag]' (e.g. 'timm:resnet18')"
        )
    return _no_weights_file(spec)


def _no_weights_file(spec: str) -> str:
    if spec.lower().endswith(_WEIGHT_SUFFIXES):
        raise ValueError(f"model spec {spec!r} names a weights file; only pretrained tags are allowed")
    return spec


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageSteps(_Request):
    finetune_teacher: int = Field(100, ge=0, le=100_000, description="Teacher linear-probe steps.")
    distill: int = Field(200, ge=0, le=1_000_000, description="Distillation steps.")
    finetune_student: int = Field(100, ge=0, le=100_000, description="Student finetuning steps.")


class StageBatchSizes(_Request):
    finetune_teacher: int | None = Field(None, ge=1, le=4096)
    distill: int | None = Field(None, ge=1, le=4096)
    finetune_student: int | None = Field(None, ge=1, le=4096)


class StageLearningRates(_Request):
    finetune_teacher: float | None = Field(None, gt=0, le=1)
    distill: float | None = Field(None, gt=0, le=1)
    finetune_student: float | None = Field(None, gt=0, le=1)


class JobCreate(_Request):
    """Train a small model for a dataset: finetune the teacher, (curate a transfer set,) distill,
    finetune the student, export, and evaluate on the test dataset when one is given."""

    dataset_id: str = _ID
    test_dataset_id: str | None = Field(None, min_length=1, max_length=32)
    gallery_id: str | None = Field(
        None,
        min_length=1,
        max_length=32,
        description="Curate the transfer set from this gallery; "
        "without one the student distills on the labeled images themselves.",
    )
    transfer_set_size: int | None = Field(None, ge=1, le=1_000_000)
    teacher: Annotated[str, AfterValidator(_teacher_spec)] = Field(
        "timm:vit_small_patch14_dinov2.lvd142m",
        max_length=200,
        description="timm:<name>[@tag] or open_clip:<arch>[@tag]",
    )
    student: Annotated[str, AfterValidator(_student_spec)] = Field(
        "timm:resnet18", max_length=200, description="timm:<name>[@tag]"
    )
    image_size: int | None = Field(None, ge=32, le=1024, description="Input side of both models.")
    steps: StageSteps = Field(default_factory=StageSteps)
    batch_size: StageBatchSizes = Field(default_factory=StageBatchSizes)
    lr: StageLearningRates = Field(default_factory=StageLearningRates)
    export_formats: list[ExportFormat] = Field(
        default_factory=lambda: ["safetensors", "onnx", "torchscript"],  # type: ignore[arg-type]
        min_length=1,
        max_length=3,
    )
    device: str | None = _DEVICE


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


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class TransferSetCreate(_Request):
    dataset_id: str = _ID
    gallery_id: str = _ID
    size: int = Field(5000, ge=1, le=1_000_000, description="Items in the transfer set.")
    method: CurateMethod = "query_balanced"
    crops: int = Field(4, ge=0, le=64, description="Crops per labeled image besides the full image.")
    dedup_threshold: float | None = Field(0.95, gt=0, le=1)
    leakage_threshold: float | None = Field(0.95, gt=0, le=1)
    min_score: float | None = Field(None, ge=-1, le=1)
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
    """One source of gallery images: a path on the server, or one of the caller's uploaded datasets."""

    path: str | None = Field(
        None,
        min_length=2,
        max_length=4096,
        description="Absolute path on the server: an image folder, a .zip, a .tar (or a directory of .tar "
        "shards, or a brace pattern like `/data/shards/{00000..00009}.tar`), or a .csv/.jsonl manifest.",
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
