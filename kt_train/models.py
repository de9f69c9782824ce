"""Teachers and students built from model specs, each carrying its own preprocessing.

Every model here takes pixels in [0, 1] at whatever size the data pipeline produced and resizes and
normalizes them itself (``Preprocess``). That is how a teacher and a student with different input
sizes and mean/std see the *same* augmented view: the loader makes one view, each model adapts it.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, ModelSpecError, WeightsNotFoundError
from .specs import ModelSpec
from .weights import classifier_prefixes

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """A model's own preprocessing: the input side it was built for and its normalization."""

    input_size: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 0.875

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        return cls(
            input_size=int(d["input_size"]),
            mean=tuple(d["mean"]),  # type: ignore[arg-type]
            std=tuple(d["std"]),  # type: ignore[arg-type]
            interpolation=d.get("interpolation", "bilinear"),
            crop_pct=float(d.get("crop_pct", 0.875)),
        )


class Preprocess(nn.Module):
    """[0, 1] pixels of any size -> this model's input size and normalization."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.size = int(cfg.input_size)
        self.mode = "bicubic" if cfg.interpolation == "bicubic" else "bilinear"
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode=self.mode, align_corners=False, antialias=True
            )
        return (x - self.mean) / self.std


# How evaluation (and so the model card, and ``kt predict``) feeds a model: the shorter side resized
# bilinearly to the input size and the centre square kept, nothing else cut off. Every model here
# learns from bilinear-resized views of whole images (``TrainAugment``); timm's pretrained
# ``crop_pct`` 0.875 / bicubic describe the ImageNet evaluation of pretrained weights, and applied
# to a task's small images they cost points (issue 13). ``DataConfig.interpolation`` still decides
# how a model resizes a view of another size inside ``Preprocess`` during training.
EVAL_INTERPOLATION = "bilinear"
EVAL_CROP_PCT = 1.0


def preprocessing(model: ImageClassifier | DataConfig) -> dict[str, Any]:
    """The preprocessing evaluation applies to ``model``'s inputs, as plain JSON fields.

    The one description of it: ``EvalTransform.from_preprocessing`` builds evaluation's transform
    from this dict, and the export writes it as the model card's ``preprocessing``, so the card
    says exactly what evaluation did. Steps, for an RGB image of width W and height H:

    1. resize (``resize: shorter_side``) the shorter side S to ``resize_size`` and the longer side L
       to floor(L * resize_size / S), with PIL's ``interpolation`` filter (antialiased: PIL's
       ``Image.resize``); no resize when the size is already that;
    2. crop (``crop: center``) ``input_size`` x ``input_size`` at left = round((W' - input_size) / 2),
       top = round((H' - input_size) / 2) of the resized W' x H' (Python's round: half to even);
    3. uint8 -> float32 / 255 (``value_range`` [0, 1]), then (x - mean) / std per channel, in
       ``channel_order`` RGB, ``layout`` NCHW.
    """
    dc = model.data_config if isinstance(model, ImageClassifier) else model
    size = int(dc.input_size)
    return {
        "input_size": size,
        "resize": "shorter_side",
        "resize_size": max(size, round(size / EVAL_CROP_PCT)),
        "interpolation": EVAL_INTERPOLATION,
        "crop": "center",
        "crop_pct": EVAL_CROP_PCT,
        "mean": [float(v) for v in dc.mean],
        "std": [float(v) for v in dc.std],
        "channel_order": "RGB",
        "value_range": [0.0, 1.0],
        "layout": "NCHW",
        "steps": (
            "RGB image; resize the shorter side to resize_size (the longer side floor(long * resize_size "
            "/ short)) with PIL's interpolation filter; center-crop input_size x input_size (offsets "
            "round((side - input_size) / 2), half to even); uint8 / 255; (x - mean) / std; NCHW float32"
        ),
    }


@dataclass
class ModelRecipe:
    """Everything needed to rebuild a model from a checkpoint without its original weights file."""

    spec: str
    num_classes: int
    role: str  # "teacher" (backbone + separate head) or "student" (one timm model with num_classes)
    head: str = "linear"  # teacher head: "linear" or "mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelRecipe:
        return cls(**d)


class ImageClassifier(nn.Module):
    """Pixels in [0, 1] -> class logits, with the model's own preprocessing inside.

    ``net`` is either a timm classifier (students: exportable as a plain timm state dict) or a
    feature backbone followed by ``head`` (teachers: a foundation-model trunk plus a task head).
    """

    def __init__(
        self, net: nn.Module, preprocess: Preprocess, recipe: ModelRecipe, head: nn.Module | None = None
    ):
        super().__init__()
        self.net = net
        self.preprocess = preprocess
        self.head = head
        self.recipe = recipe

    @property
    def data_config(self) -> DataConfig:
        return DataConfig.from_dict(self.recipe.data_config)

    @property
    def num_features(self) -> int:
        return int(getattr(self.net, "num_features", getattr(self.net, "output_dim", 0)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features before the classifier."""
        x = self.preprocess(x)
        if self.head is not None:
            return self.net(x)
        net: Any = self.net  # a timm model
        return net.forward_head(net.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            return self.head(self.net(self.preprocess(x)))
        return self.net(self.preprocess(x))


def set_norm_eval(module: nn.Module) -> None:
    """Put batch-norm layers in eval mode (running stats frozen; affine params still train).

    Needed for networks whose BN statistics are folded (the proxy teacher) and useful for
    finetuning large pretrained trunks on ~100 images, where batch statistics are noise.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# --------------------------------------------------------------------------- timm


def _check_timm_name(name: str) -> None:
    import timm

    base = name.split(".", 1)[0]
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ModelSpecError(f"timm has no model named {base!r}{hint}")


def _card_for(path: Path) -> dict[str, Any]:
    """A model card beside a weights file (``X.card.json`` for ``X.safetensors``), if any."""
    card = path.with_name(path.name[: -len(path.suffix)] + ".card.json")
    return json.loads(card.read_text()) if card.exists() else {}


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise WeightsNotFoundError(
            f"weights file {path} does not exist; check the path after '@' in the model spec"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    return obj


def _load_into(net: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, tolerating only a classifier that the task replaces."""
    own = net.state_dict()
    # the common classifier names, and the ones timm names for this model (what registration allows)
    candidates = ("classifier.", "head.", "fc.", "head.fc.", "last_linear.", *classifier_prefixes(net))
    head_prefixes = tuple(p for p in dict.fromkeys(candidates) if any(k.startswith(p) for k in sd))
    filtered = {}
    for k, v in sd.items():
        if k in own and own[k].shape == v.shape:
            filtered[k] = v
        elif k.startswith(head_prefixes):
            continue  # the task head replaces the pretrained classifier
        elif k in own:
            raise WeightsNotFoundError(
                f"weights in {source} do not fit the model: {k} has shape {tuple(v.shape)}, "
                f"model expects {tuple(own[k].shape)}; check the model name and model_kwargs"
            )
    missing = [k for k in own if k not in filtered and not k.startswith(head_prefixes or ("classifier.",))]
    if missing:
        raise WeightsNotFoundError(
            f"weights in {source} miss {len(missing)} tensors of the model (first: {missing[:3]}); "
            f"check that the spec's model name matches the file"
        )
    net.load_state_dict(filtered, strict=False)


def _timm_net(
    spec: ModelSpec, num_classes: int, model_kwargs: dict[str, Any], load_weights: bool
) -> tuple[nn.Module, dict]:
    import timm

    hub = spec.hf_hub_id is not None
    if not hub:  # a Hub id names its architecture in the repository's config
        _check_timm_name(spec.name)
    if "num_classes" in model_kwargs:
        raise ConfigError(
            "model_kwargs.num_classes is not allowed: the number of classes comes from the labeled data; "
            "remove it from model_kwargs"
        )
    kwargs = {k: v for k, v in model_kwargs.items() if v is not None}
    card: dict[str, Any] = {}
    wpath = spec.weights_path if load_weights else None
    if wpath is not None:
        card = _card_for(wpath)
        for k, v in card.get("create_model_kwargs", {}).items():
            if k != "num_classes":
                kwargs.setdefault(k, v)
    tag = spec.pretrained_tag
    if load_weights and tag is not None and tag.startswith("registered:"):
        # the service's spec for weights an operator registered; timm would take it for a Hub tag
        raise WeightsNotFoundError(
            f"{spec} names weights registered with the vfm-kt server (`kt admin register-model`); only "
            "the server's jobs and gallery builds resolve '@registered:NAME'. Outside it, pass the weights "
            f"file itself: timm:{spec.name}@/path/to/weights.safetensors (the server keeps a registered "
            f"model in <data dir>/registry/{tag[len('registered:') :]}/)"
        )
    name = spec.timm_name
    pretrained = load_weights and wpath is None and (hub or tag is not None or "." in spec.name)
    try:
        net = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        if hub:
            raise WeightsNotFoundError(
                f"{spec} could not be loaded from the Hugging Face Hub or its local cache "
                f"({type(e).__name__}: {e}). Offline, fetch it on a machine with network (python -c "
                f"\"import timm; timm.create_model('{name}', pretrained=True)\") and copy the Hugging Face "
                "cache (~/.cache/huggingface, or HF_HOME), or download its model.safetensors and pass "
                "timm:<arch>@/path/to/model.safetensors"
            ) from e
        if pretrained:
            raise WeightsNotFoundError(
                f"weights for {spec} are not available offline ({type(e).__name__}: {e}). Fetch them on a "
                f"machine with network (python -c \"import timm; timm.create_model('{name}', pretrained=True)\") "
                f"and copy the Hugging Face cache (~/.cache/huggingface), or pass a local file: "
                f"timm:{spec.name.split('.')[0]}@/path/to/weights.safetensors"
            ) from e
        raise ModelSpecError(f"cannot build {spec}: {e}") from e
    if wpath is not None:
        _load_into(net, load_state_dict_file(wpath), str(wpath))
    return net, card


def _timm_data_config(net: nn.Module, card: dict[str, Any]) -> DataConfig:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=net)
    size = card.get("input_size", cfg["input_size"])[-1]
    return DataConfig(
        input_size=int(size),
        mean=tuple(card.get("mean", cfg["mean"])),  # type: ignore[arg-type]
        std=tuple(card.get("std", cfg["std"])),  # type: ignore[arg-type]
        interpolation=card.get("interpolation", cfg.get("interpolation", "bilinear")),
        crop_pct=float(card.get("crop_pct", cfg.get("crop_pct", 0.875))),
    )


# --------------------------------------------------------------------------- open_clip


class OpenClipImageTower(nn.Module):
    """open_clip's image tower as a pooled-feature backbone (the image embedding)."""

    num_features: int

    def __init__(self, visual: nn.Module, output_dim: int):
        super().__init__()
        self.visual = visual
        self.num_features = output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual(x)
        return out[0] if isinstance(out, tuple) else out


def _open_clip_net(spec: ModelSpec, load_weights: bool) -> tuple[OpenClipImageTower, DataConfig]:
    import open_clip

    if spec.name not in open_clip.list_models():
        close = difflib.get_close_matches(spec.name, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
        raise ModelSpecError(f"open_clip has no architecture named {spec.name!r}{hint}")
    pretrained = spec.weights if load_weights else None
    wpath = spec.weights_path if load_weights else None
    if wpath is not None and not wpath.exists():
        raise WeightsNotFoundError(
            f"weights file {wpath} does not exist; check the path after '@' in the model spec"
        )
    try:
        model = open_clip.create_model(spec.name, pretrained=str(wpath) if wpath else pretrained)
    except (OSError, RuntimeError) as e:
        raise WeightsNotFoundError(
            f"weights for {spec} are not available offline ({type(e).__name__}: {e}). Fetch them on a machine "
            f"with network (python -c \"import open_clip; open_clip.create_model('{spec.name}', "
            f"pretrained='{spec.weights}')\") and copy the cache, or pass a local file: open_clip:{spec.name}@/path/to/open_clip_model.safetensors"
        ) from e
    visual = model.visual
    pcfg = getattr(visual, "preprocess_cfg", {}) or {}
    size = pcfg.get("size", getattr(visual, "image_size", 224))
    size = size[-1] if isinstance(size, (tuple, list)) else size
    out_dim = getattr(visual, "output_dim", None) or model.text_projection.shape[-1]
    dc = DataConfig(
        input_size=int(size),
        mean=tuple(pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),  # type: ignore[arg-type]
        std=tuple(pcfg.get("std", open_clip.OPENAI_DATASET_STD)),  # type: ignore[arg-type]
        interpolation=pcfg.get("interpolation", "bicubic"),
        crop_pct=1.0,
    )
    return OpenClipImageTower(visual, int(out_dim)), dc


# --------------------------------------------------------------------------- factories


def _make_head(kind: str, in_dim: int, num_classes: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, num_classes)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(in_dim, num_classes)
        )
    raise ModelSpecError(f"unknown head {kind!r}; use 'linear' or 'mlp'")


def build_model(
    recipe: ModelRecipe, *, load_weights: bool = True, image_size: int | None = None
) -> ImageClassifier:
    """Build the model a recipe describes; ``load_weights=False`` when a checkpoint will fill it."""
    spec = ModelSpec.parse(recipe.spec)
    head: nn.Module | None = None
    if spec.library == "open_clip":
        if recipe.role != "teacher":
            raise ModelSpecError(
                f"{spec}: open_clip models can be teachers only; use a timm model as the student"
            )
        tower, dc = _open_clip_net(spec, load_weights)
        net = tower
        head = _make_head(recipe.head, tower.num_features, recipe.num_classes)
    else:
        nc = 0 if recipe.role == "teacher" else recipe.num_classes
        net, card = _timm_net(spec, nc, recipe.model_kwargs, load_weights)  # type: ignore[assignment]
        dc = _timm_data_config(net, card)
        if recipe.role == "teacher":
            head = _make_head(recipe.head, int(net.num_features), recipe.num_classes)  # type: ignore[arg-type]
        if card.get("create_model_kwargs"):
            recipe.model_kwargs = {
                **{k: v for k, v in card["create_model_kwargs"].items() if k != "num_classes"},
                **recipe.model_kwargs,
            }
    if recipe.data_config:
        dc = DataConfig.from_dict(recipe.data_config)
    elif image_size:
        dc.input_size = int(image_size)
    recipe.data_config = dc.to_dict()
    return ImageClassifier(net, Preprocess(dc), recipe, head)


def create_teacher(
    spec: str,
    num_classes: int,
    *,
    head: str = "linear",
    image_size: int | None = None,
    model_kwargs: dict | None = None,
) -> ImageClassifier:
    recipe = ModelRecipe(
        spec=str(spec),
        num_classes=num_classes,
        role="teacher",
        head=head,
        model_kwargs=dict(model_kwargs or {}),
    )
    return build_model(recipe, image_size=image_size)


def create_student(
    spec: str, num_classes: int, *, image_size: int | None = None, model_kwargs: dict | None = None
) -> ImageClassifier:
    recipe = ModelRecipe(
        spec=str(spec), num_classes=num_classes, role="student", model_kwargs=dict(model_kwargs or {})
    )
    return build_model(recipe, image_size=image_size)


def create_backbone(
    spec: str, *, image_size: int | None = None, model_kwargs: dict | None = None
) -> ImageClassifier:
    """A frozen feature extractor (for task-agnostic distillation and gallery embedding)."""
    model = create_teacher(spec, 1, image_size=image_size, model_kwargs=model_kwargs)
    model.head = nn.Identity()
    return model


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, model: ImageClassifier, **extra: Any) -> None:
    """A checkpoint that rebuilds its own model: recipe + weights (+ anything else, e.g. metrics)."""
    from .io import atomic_torch_save

    atomic_torch_save({"recipe": model.recipe.to_dict(), "state_dict": model.state_dict(), **extra}, path)


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[ImageClassifier, dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise WeightsNotFoundError(f"checkpoint {path} does not exist; run the stage that writes it first")
    ckpt = torch.load(str(path), map_location=map_location, weights_only=False)
    recipe = ModelRecipe.from_dict(ckpt["recipe"])
    model = build_model(recipe, load_weights=False)
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt
