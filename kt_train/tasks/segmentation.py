"""Semantic segmentation: what the task owns (``kt_train.tasks``).

- **Data.** Image + index-mask pairs from a folder or a zip: ``images/<rel>.jpg|png`` beside
  ``masks/<rel>.png`` with the same relative stem (``images/test/0001TP_008550.jpg`` ↔
  ``masks/test/0001TP_008550.png``; one top-level folder around both is fine), and the class list
  in ``classes.json`` (``{"classes": [...], "void_index": 11}``) or given by the caller. A mask is a
  single-channel PNG (mode ``L`` or a palette PNG, whose pixel values are the class indices); its
  size equals its image's and its values are class indices or the void index. Every violation is a
  ``DatasetError`` that names the file.
- **Augmentation** moves image and mask together: one crop box, one flip, applied to both, the
  image resized bilinearly and the mask by nearest neighbour (``JointAugment``).
- **Model.** Any timm backbone's multi-scale features (``forward_intermediates``: CNNs, and ViT
  patch tokens reshaped to their grid) and a light LR-ASPP decoder (Howard et al., "Searching for
  MobileNetV3", 2019): logits at the low-level feature's stride (8 for CNNs, the patch size for
  ViTs), upsampled to the input only where a full-resolution answer is needed.
- **Losses.** Cross-entropy with the void pixels ignored; task-oriented distillation is a
  per-pixel KL divergence between temperature-softened teacher and student class maps of the
  same view, at the student's output stride (teacher maps resized to it).
- **Metrics.** A confusion matrix over the labeled pixels (void ignored): mean IoU over the
  classes present in the ground truth or the predictions, pixel accuracy, per-class IoU.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import DatasetError, ModelSpecError
from ..models import set_norm_eval

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MASK_EXTS = (".png",)
CLASSES_FILE = "classes.json"
DECODED_CACHE_BYTES = 1 << 30  # decoded frames kept in memory during distillation


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SegmentationPair:
    key: str  # the relative stem shared by image and mask, e.g. "test/0001TP_008550"
    image: str  # path inside the source
    mask: str


class _Source:
    """Files of a folder or a zip, read by their path relative to the dataset's root (the one
    top-level folder of a zip that holds everything is stripped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise DatasetError(f"segmentation dataset {self.path} does not exist")
        self.is_zip = self.path.is_file()
        self._zf: zipfile.ZipFile | None = None
        self._pid = -1
        if self.is_zip:
            try:
                names = [n for n in self._zip().namelist() if not n.endswith("/")]
            except zipfile.BadZipFile as e:
                raise DatasetError(f"{self.path} is neither a folder nor a zip file ({e})") from e
        else:
            names = [p.relative_to(self.path).as_posix() for p in sorted(self.path.rglob("*")) if p.is_file()]
        names = [n for n in names if not any(part.startswith((".", "__MACOSX")) for part in n.split("/"))]
        tops = {n.split("/", 1)[0] for n in names}
        self.prefix = ""
        if len(tops) == 1 and all("/" in n for n in names) and not {"images", "masks"} & tops:
            self.prefix = next(iter(tops)) + "/"
        self.names = sorted(n[len(self.prefix) :] for n in names)

    def _zip(self) -> zipfile.ZipFile:
        if self._zf is None or self._pid != os.getpid():  # one handle per process (DataLoader workers)
            self._zf, self._pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zf

    def read(self, name: str) -> bytes:
        if self.is_zip:
            return self._zip().read(self.prefix + name)
        return (self.path / self.prefix / name).read_bytes()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zf": None, "_pid": -1}


def find_pairs(names: Sequence[str]) -> list[SegmentationPair]:
    """Pair ``images/<rel>.<ext>`` with ``masks/<rel>.png``; a ``DatasetError`` names an image
    without a mask, a mask without an image, and a stem with two images."""
    images: dict[str, str] = {}
    masks: dict[str, str] = {}
    for name in names:
        top, _, rel = name.partition("/")
        stem, ext = os.path.splitext(rel)
        ext = ext.lower()
        if top == "images" and ext in IMAGE_EXTS:
            if stem in images:
                raise DatasetError(f"two images for {stem!r}: {images[stem]} and {name}; keep one")
            images[stem] = name
        elif top == "masks" and ext in MASK_EXTS:
            masks[stem] = name
    if not images and not masks:
        raise DatasetError(
            "no segmentation pairs found: put the images under images/ and their index masks (PNG, same "
            "relative path and stem) under masks/, e.g. images/a.jpg + masks/a.png"
        )
    no_mask = sorted(set(images) - set(masks))
    if no_mask:
        raise DatasetError(
            f"{len(no_mask)} image(s) have no mask, e.g. {images[no_mask[0]]} (expected masks/{no_mask[0]}.png)"
        )
    no_image = sorted(set(masks) - set(images))
    if no_image:
        raise DatasetError(
            f"{len(no_image)} mask(s) have no image, e.g. {masks[no_image[0]]} (expected images/{no_image[0]}.jpg or .png)"
        )
    return [SegmentationPair(k, images[k], masks[k]) for k in sorted(images)]


def decode_mask(data: bytes, name: str) -> np.ndarray:
    """An index mask (H, W) uint8 from PNG bytes: mode ``L``, ``P`` (the palette indices are the
    classes) or ``I;16``/``I`` with values < 256. A colour mask is refused: it needs a colour to
    class map, which a mask of indices makes explicit."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises many types for a broken file
        raise DatasetError(f"mask {name} is not a readable PNG ({e})") from e
    if img.mode in ("L", "P"):
        return np.asarray(img, dtype=np.uint8)
    if img.mode in ("I;16", "I", "I;16B"):
        arr = np.asarray(img)
        if arr.max(initial=0) > 255:
            raise DatasetError(f"mask {name} has values up to {int(arr.max())}; class indices must be < 256")
        return arr.astype(np.uint8)
    raise DatasetError(
        f"mask {name} is a {img.mode} image; masks must be single-channel PNGs of class indices "
        f"(mode L or a palette PNG), not colour pictures; convert colours to indices first"
    )


def decode_image(data: bytes, name: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        raise DatasetError(f"image {name} is not a readable image ({e})") from e
    return img.convert("RGB")


def read_classes(source: _Source) -> tuple[list[str], int | None]:
    if CLASSES_FILE not in source.names:
        raise DatasetError(
            f'{source.path} has no {CLASSES_FILE}; add one ({{"classes": ["sky", ...], "void_index": 255}}) '
            "or pass the classes"
        )
    try:
        meta = json.loads(source.read(CLASSES_FILE))
        classes = [str(c) for c in meta["classes"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{CLASSES_FILE} of {source.path} needs a 'classes' list ({e})") from e
    void = meta.get("void_index")
    return classes, None if void is None else int(void)


class SegmentationDataset(torch.utils.data.Dataset):
    """Image + index-mask pairs (module docstring). ``split``: keep the pairs whose relative stem
    starts with ``<split>/`` (``images/test/...``); ``stems``: keep only these file stems (a split
    file's lines). ``validate``: check every mask against its image when opened (size, values)."""

    def __init__(
        self,
        path: str | Path,
        *,
        classes: Sequence[str] | None = None,
        void_index: int | None = None,
        split: str | None = None,
        stems: Sequence[str] | None = None,
        validate: bool = True,
    ):
        self.source = _Source(path)
        if classes is None:
            found, found_void = read_classes(self.source)
            self.classes = found
            self.void_index = found_void if void_index is None else void_index
        else:
            self.classes = [str(c) for c in classes]
            self.void_index = void_index
        if len(self.classes) < 2:
            raise DatasetError(f"{self.source.path}: a segmentation task needs at least two classes")
        if self.void_index is not None and 0 <= self.void_index < len(self.classes):
            raise DatasetError(
                f"void_index {self.void_index} is the index of class {self.classes[self.void_index]!r}; "
                f"the void index must lie outside 0..{len(self.classes) - 1}"
            )
        pairs = find_pairs(self.source.names)
        if split is not None:
            pairs = [p for p in pairs if p.key.startswith(f"{split}/")]
        if stems is not None:
            wanted = {s.strip() for s in stems if s.strip()}
            pairs = [p for p in pairs if p.key.rsplit("/", 1)[-1] in wanted]
            missing = wanted - {p.key.rsplit("/", 1)[-1] for p in pairs}
            if missing:
                raise DatasetError(
                    f"{len(missing)} listed stems have no pair in {self.source.path}, e.g. {sorted(missing)[0]}"
                )
        if not pairs:
            raise DatasetError(
                f"no segmentation pairs in {self.source.path}" + (f" under split {split!r}" if split else "")
            )
        self.pairs = pairs
        if validate:
            for i in range(len(pairs)):
                self.check(i)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def ignore_index(self) -> int:
        """The label the losses and metrics skip (the void index, or 255 when there is none)."""
        return 255 if self.void_index is None else int(self.void_index)

    def __len__(self) -> int:
        return len(self.pairs)

    def check(self, i: int) -> None:
        """``DatasetError`` naming the file when pair ``i``'s mask does not fit its image."""
        pair = self.pairs[i]
        try:
            size = Image.open(io.BytesIO(self.source.read(pair.image))).size
        except Exception as e:
            raise DatasetError(f"image {pair.image} is not a readable image ({e})") from e
        mask = decode_mask(self.source.read(pair.mask), pair.mask)
        if (mask.shape[1], mask.shape[0]) != size:
            raise DatasetError(
                f"mask {pair.mask} is {mask.shape[1]}x{mask.shape[0]} but its image {pair.image} is "
                f"{size[0]}x{size[1]}; a mask must have its image's size"
            )
        values = np.unique(mask)
        bad = [int(v) for v in values if v >= self.num_classes and v != self.void_index]
        if bad:
            void = "" if self.void_index is None else f" or the void index {self.void_index}"
            raise DatasetError(
                f"mask {pair.mask} has values {bad[:5]} outside the {self.num_classes} classes "
                f"(0..{self.num_classes - 1}{void})"
            )

    def load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        pair = self.pairs[i]
        return decode_image(self.source.read(pair.image), pair.image), decode_mask(
            self.source.read(pair.mask), pair.mask
        )

    def load_image(self, i: int) -> Image.Image:
        pair = self.pairs[i]
        return decode_image(self.source.read(pair.image), pair.image)

    def __getitem__(self, i: int) -> tuple[Image.Image, np.ndarray]:
        return self.load(i)


# --------------------------------------------------------------------------- augmentation


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


@dataclass
class JointAugment:
    """One random crop box (side ``scale_min``..1 of the frame, the output's aspect, anywhere in
    the frame) and one horizontal flip, applied to image and mask alike; the crop resized to
    ``size`` (H, W): bilinear for the image, nearest neighbour for the mask."""

    size: tuple[int, int]
    scale_min: float = 0.5
    hflip: bool = True

    def params(self, width: int, height: int, rng: random.Random) -> tuple[tuple[int, int, int, int], bool]:
        h, w = self.size
        s = rng.uniform(self.scale_min, 1.0)
        aspect = w / h
        cw = min(width, max(1, round(min(width, height * aspect) * s)))
        ch = min(height, max(1, round(cw / aspect)))
        x0 = rng.randint(0, width - cw)
        y0 = rng.randint(0, height - ch)
        return (x0, y0, x0 + cw, y0 + ch), bool(self.hflip and rng.random() < 0.5)

    def apply(
        self, img: Image.Image, mask: np.ndarray | None, box: tuple[int, int, int, int], flip: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, w = self.size
        out = img.crop(box).resize((w, h), Image.Resampling.BILINEAR)
        m = None
        if mask is not None:
            m_img = Image.fromarray(mask).crop(box).resize((w, h), Image.Resampling.NEAREST)
            m = torch.from_numpy(np.asarray(m_img, dtype=np.int64).copy())
        x = _to_tensor(out)
        if flip:
            x = x.flip(-1)
            m = m.flip(-1) if m is not None else None
        return x, m

    def __call__(
        self, img: Image.Image, mask: np.ndarray | None, rng: random.Random
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        box, flip = self.params(img.width, img.height, rng)
        return self.apply(img, mask, box, flip)


def eval_inputs(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """The whole frame resized to ``size`` (H, W), bilinear: what evaluation and ``predict`` feed."""
    return _to_tensor(img.resize((size[1], size[0]), Image.Resampling.BILINEAR))


# --------------------------------------------------------------------------- model


def _feature_indices(reductions: Sequence[int]) -> tuple[int, int]:
    """(low, high): the first feature at stride >= 8 and the deepest; for a backbone whose features
    all share one stride (a ViT), the middle block and the last."""
    last = len(reductions) - 1
    if len(set(reductions)) == 1:
        return last // 2, last
    low = next((i for i, r in enumerate(reductions) if r >= 8), last)
    return min(low, last), last


class LRASPPHead(nn.Module):
    """LR-ASPP: the deep feature, gated by its own global context, upsampled to the low-level
    feature and added to a linear map of it; one logit map per class."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, inter: int = 128):
        super().__init__()
        self.cbr = nn.Sequential(
            nn.Conv2d(high_channels, inter, 1, bias=False), nn.BatchNorm2d(inter), nn.ReLU(inplace=True)
        )
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(high_channels, inter, 1), nn.Sigmoid())
        self.high_classifier = nn.Conv2d(inter, num_classes, 1)
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = self.cbr(high) * self.scale(high)
        if x.shape[-2:] != low.shape[-2:]:
            x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


@dataclass
class SegmentationRecipe:
    """What rebuilds a segmentation model (saved in its checkpoint)."""

    spec: str
    num_classes: int
    role: str = "student"
    decoder_channels: int = 128
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] | None = None  # None: the weights' card's, else timm's default
    std: tuple[float, float, float] | None = None
    input_size: tuple[int, int] = (240, 320)  # H, W fed to the network
    classes: list[str] = field(default_factory=list)
    void_index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentationRecipe:
        d = dict(d)
        for k in ("mean", "std", "input_size"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


class SegmentationModel(nn.Module):
    """[0, 1] pixels (B, 3, H, W) -> class logits at the output stride (B, C, H/s, W/s)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, backbone: nn.Module, recipe: SegmentationRecipe):
        super().__init__()
        self.backbone = backbone
        self.recipe = recipe
        info: list[dict[str, Any]] = list(getattr(backbone, "feature_info"))  # noqa: B009 - timm sets it
        reductions = [int(f["reduction"]) for f in info]
        channels = [int(f["num_chs"]) for f in info]
        self.indices = _feature_indices(reductions)
        low, high = self.indices
        self.output_stride = reductions[low]
        self.head = LRASPPHead(channels[low], channels[high], recipe.num_classes, recipe.decoder_channels)
        mean, std = recipe.mean or (0.485, 0.456, 0.406), recipe.std or (0.229, 0.224, 0.225)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        x = (x - self.mean) / self.std
        low, high = self.backbone.forward_intermediates(  # type: ignore[operator]
            x, indices=list(self.indices), intermediates_only=True
        )
        return low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(*self.features(x))


def build_segmentation_model(recipe: SegmentationRecipe, *, load_weights: bool = True) -> SegmentationModel:
    """The backbone of ``recipe.spec`` (timm; the weights after '@' when ``load_weights``, with the
    create-model kwargs and normalization of the card beside them) and an LR-ASPP decoder."""
    import timm

    from ..models import _card_for, _check_timm_name, _load_into, load_state_dict_file
    from ..specs import ModelSpec

    spec = ModelSpec.parse(recipe.spec)
    if spec.library != "timm":
        raise ModelSpecError(
            f"{spec}: segmentation models are built on timm backbones; use 'timm:<name>[@weights]'"
        )
    _check_timm_name(spec.name)
    wpath = spec.weights_path
    if wpath is not None and wpath.exists():
        card = _card_for(wpath)
        for k, v in card.get("create_model_kwargs", {}).items():
            if k != "num_classes":
                recipe.model_kwargs.setdefault(k, v)
        if recipe.mean is None and card.get("mean"):
            recipe.mean, recipe.std = tuple(card["mean"]), tuple(card["std"])  # type: ignore[assignment]
    kwargs = dict(recipe.model_kwargs)
    pcfg = timm.models.get_pretrained_cfg(spec.name.split(".")[0])
    if pcfg is not None and getattr(pcfg, "fixed_input_size", False):
        # a ViT: its position embeddings at the frames' grid (resampling them on every forward is
        # slower and does not export to ONNX)
        kwargs.setdefault("img_size", tuple(recipe.input_size))
    net = timm.create_model(spec.name, pretrained=False, num_classes=0, **kwargs)
    if not hasattr(net, "forward_intermediates"):
        raise ModelSpecError(
            f"timm model {spec.name!r} gives no intermediate features; choose another backbone"
        )
    if recipe.mean is None:
        cfg = timm.data.resolve_data_config({}, model=net)
        recipe.mean, recipe.std = tuple(cfg["mean"]), tuple(cfg["std"])
    if load_weights and wpath is not None:
        sd = load_state_dict_file(wpath)
        own = net.state_dict()
        if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
            from timm.layers import resample_abs_pos_embed

            grid: Any = net.patch_embed.grid_size  # type: ignore[union-attr]
            prefix = 0 if getattr(net, "no_embed_class", False) else getattr(net, "num_prefix_tokens", 1)
            sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], list(grid), num_prefix_tokens=prefix)
        _load_into(net, sd, str(wpath))
    elif load_weights and spec.weights:
        raise ModelSpecError(
            f"{spec}: segmentation backbones take local weights files only ('@/path/to/file')"
        )
    return SegmentationModel(net, recipe)


def upsample(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- losses


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy of the logits (upsampled to the mask) over the labeled pixels."""
    return F.cross_entropy(upsample(logits, mask.shape[-2:]), mask, ignore_index=ignore_index)


def pixel_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pixel KL(teacher || student) of temperature-softened class maps, at the student's output
    stride (the teacher's maps resized to it), averaged over the (``valid``) pixels, times T^2."""
    t = upsample(teacher_logits.float(), student_logits.shape[-2:])
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1)  # (B, h, w)
    if valid is not None:
        v = valid.float()
        if v.shape[-2:] != kl.shape[-2:]:
            v = F.interpolate(v.unsqueeze(1), size=kl.shape[-2:], mode="nearest").squeeze(1)
        kl = (kl * v).sum() / v.sum().clamp_min(1.0)
    else:
        kl = kl.mean()
    return kl * temperature**2


# --------------------------------------------------------------------------- metrics


class ConfusionMatrix:
    """Counts of (ground truth, prediction) over the labeled pixels; the void pixels are skipped."""

    def __init__(self, num_classes: int, ignore_index: int | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
        keep = (target >= 0) & (target < self.num_classes)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        idx = target[keep] * self.num_classes + pred[keep].clamp(0, self.num_classes - 1)
        self.matrix += torch.bincount(idx, minlength=self.num_classes**2).view(
            self.num_classes, self.num_classes
        )

    def per_class_iou(self) -> list[float]:
        """IoU per class in percent; NaN for a class absent from both ground truth and predictions."""
        m = self.matrix.double()
        tp = m.diag()
        denom = m.sum(0) + m.sum(1) - tp
        return [
            float(100.0 * t / d) if d > 0 else math.nan
            for t, d in zip(tp.tolist(), denom.tolist(), strict=True)
        ]

    def mean_iou(self) -> float:
        ious = [v for v in self.per_class_iou() if not math.isnan(v)]
        return sum(ious) / len(ious) if ious else math.nan

    def pixel_accuracy(self) -> float:
        total = int(self.matrix.sum())
        return 100.0 * int(self.matrix.diag().sum()) / total if total else math.nan

    def summary(self, classes: Sequence[str]) -> dict[str, Any]:
        return {
            "miou": round(self.mean_iou(), 2),
            "pixel_acc": round(self.pixel_accuracy(), 2),
            "per_class_iou": {
                c: (None if math.isnan(v) else round(v, 2))
                for c, v in zip(classes, self.per_class_iou(), strict=True)
            },
            "confusion": self.matrix.tolist(),
        }


@torch.no_grad()
def evaluate_segmentation(
    model: SegmentationModel,
    data: SegmentationDataset,
    *,
    size: tuple[int, int] | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """mIoU, pixel accuracy, per-class IoU and the confusion matrix of ``model`` on ``data``: each
    frame resized to ``size`` (default the model's input size), the logits upsampled to the mask's
    full resolution."""
    size = size or model.recipe.input_size
    model.eval()
    cm = ConfusionMatrix(data.num_classes, data.ignore_index)
    for i in range(len(data)):
        img, mask = data.load(i)
        logits = model(eval_inputs(img, size).unsqueeze(0))
        pred = upsample(logits, mask.shape).argmax(1)[0]
        cm.update(pred, torch.from_numpy(mask.astype(np.int64)))
    return cm.summary(data.classes)


# --------------------------------------------------------------------------- training


class Frames(Protocol):
    """Images to learn from without their masks: a ``SegmentationDataset`` or a
    ``kt_train.data.ImageDataset`` (a generic set, a curated manifest with crop boxes)."""

    def __len__(self) -> int: ...

    def load_image(self, i: int) -> Image.Image: ...


def _param_groups(model: SegmentationModel, lr: float, backbone_lr_scale: float) -> list[dict[str, Any]]:
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    groups = [{"params": rest, "lr": lr}]
    if backbone and backbone_lr_scale > 0:
        groups.append({"params": backbone, "lr": lr * backbone_lr_scale})
    elif backbone_lr_scale <= 0:
        for p in backbone:
            p.requires_grad_(False)
    return groups


def _train_mode(model: SegmentationModel, norm_eval: bool) -> None:
    model.train()
    if norm_eval:
        set_norm_eval(model.backbone)


def _cosine(opt: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit_segmentation(
    model: SegmentationModel,
    data: SegmentationDataset,
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup_steps: int = 0,
    augment: JointAugment | None = None,
    teacher: SegmentationModel | None = None,
    temperature: float = 4.0,
    ce_weight: float = 1.0,
    norm_eval: bool = False,
    backbone_lr_scale: float = 1.0,
    seed: int = 0,
    reporter: Any = None,
    task: str = "finetune",
) -> list[dict[str, float]]:
    """Train ``model`` for ``steps`` AdamW steps (warmup, then cosine) on augmented crops of
    ``data``: cross-entropy on the masks (weight ``ce_weight``) and, with a ``teacher``, the
    per-pixel distillation loss on the same views (online). ``norm_eval`` keeps the backbone's
    batch norms in eval mode (the proxy teacher's are folded); ``backbone_lr_scale`` scales the
    backbone's learning rate (0 freezes it: a linear probe of the decoder). Returns the losses."""
    augment = augment or JointAugment(model.recipe.input_size)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(_param_groups(model, lr, backbone_lr_scale), weight_decay=weight_decay)
    sched = _cosine(opt, steps, warmup_steps)
    if teacher is not None:
        teacher.eval()
    history = []
    if reporter is not None:
        reporter.start(task, steps)
    for step in range(steps):
        _train_mode(model, norm_eval)
        x, m = _batch(data, augment, rng, batch_size)
        logits = model(x)
        loss = (
            ce_weight * segmentation_loss(logits, m, data.ignore_index) if ce_weight else logits.new_zeros(())
        )
        kd = None
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(x)
            kd = pixel_distillation_loss(logits, t_logits, temperature)
            loss = loss + kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(
            {"step": step + 1, "loss": loss.item(), **({"kd": kd.item()} if kd is not None else {})}
        )
    model.eval()
    return history


def _batch(
    data: SegmentationDataset, augment: JointAugment, rng: random.Random, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ms = [], []
    for _ in range(batch_size):
        img, mask = data.load(rng.randrange(len(data)))
        x, m = augment(img, mask, rng)
        assert m is not None
        xs.append(x)
        ms.append(m)
    return torch.stack(xs), torch.stack(ms)


# --------------------------------------------------------------------------- teacher-output cache


@dataclass
class TeacherMaps:
    """The teacher's outputs on ``views`` fixed augmented views of every transfer image: each
    view's crop box and flip, and the teacher's class logits (or, for the task-agnostic baseline,
    its deep features) at the student's output grid, float16. The student later renders exactly
    these views again, so it matches the teacher on the view the teacher saw (consistent
    function matching), at the cost of one teacher pass per stored view instead of per step."""

    boxes: torch.Tensor  # (N, V, 4) int32, pixels of the source frame
    flips: torch.Tensor  # (N, V) bool
    targets: torch.Tensor  # (N, V, C, h, w) float16
    kind: str = "logits"  # or "features"

    @property
    def bytes(self) -> int:
        return int(
            self.targets.numel() * self.targets.element_size() + self.boxes.numel() * 4 + self.flips.numel()
        )

    def save(self, path: str | Path) -> None:
        tmp = Path(str(path) + ".tmp")
        torch.save(
            {"boxes": self.boxes, "flips": self.flips, "targets": self.targets, "kind": self.kind}, tmp
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> TeacherMaps:
        d = torch.load(str(path), map_location="cpu", weights_only=True)
        return cls(d["boxes"], d["flips"], d["targets"], d["kind"])


def output_grid(model: SegmentationModel, size: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of ``model``'s logits for an input of ``size``."""
    with torch.no_grad():
        return tuple(model.eval()(torch.zeros(1, 3, *size)).shape[-2:])  # type: ignore[return-value]


@torch.no_grad()
def build_teacher_maps(
    teacher: SegmentationModel,
    frames: Frames,
    augment: JointAugment,
    *,
    views: int,
    grid: tuple[int, int],
    seed: int = 0,
    batch_size: int = 16,
    kind: str = "logits",
    reporter: Any = None,
) -> TeacherMaps:
    """``TeacherMaps`` of ``views`` seeded views per frame, the logits resized to the student's
    ``grid``; ``kind="features"``: the teacher backbone's deepest features, at their own stride."""
    rng = random.Random(seed)
    teacher.eval()
    n = len(frames)
    boxes = torch.zeros(n, views, 4, dtype=torch.int32)
    flips = torch.zeros(n, views, dtype=torch.bool)
    todo: list[tuple[int, int, torch.Tensor]] = []
    targets: torch.Tensor | None = None
    done = [0]
    if reporter is not None:
        reporter.start("teacher cache", n * views)

    def run() -> None:
        nonlocal targets
        x = torch.stack([t for _, _, t in todo])
        if kind == "features":  # at their own (deepest) stride: the student's map is resized to them
            out = teacher.features(x)[1].float().half()
        else:
            out = teacher(x)
            out = F.interpolate(out.float(), size=grid, mode="bilinear", align_corners=False).half()
        if targets is None:
            targets = torch.zeros(n, views, *out.shape[1:], dtype=torch.float16)
        for (i, v, _), o in zip(todo, out, strict=True):
            targets[i, v] = o
        done[0] += len(todo)
        if reporter is not None:
            reporter.update("teacher cache", done[0], {})
        todo.clear()

    for i in range(n):
        img = frames.load_image(i)
        for v in range(views):
            box, flip = augment.params(img.width, img.height, rng)
            boxes[i, v] = torch.tensor(box, dtype=torch.int32)
            flips[i, v] = flip
            todo.append((i, v, augment.apply(img, None, box, flip)[0]))
            if len(todo) == batch_size:
                run()
    if todo:
        run()
    if reporter is not None:
        reporter.finish("teacher cache")
    assert targets is not None
    return TeacherMaps(boxes, flips, targets, kind)


class FeatureProjector(nn.Module):
    """Task-agnostic baseline: the student's deep feature mapped (1x1 conv) to the teacher's."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(student_channels, teacher_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def distill_segmentation(
    student: SegmentationModel,
    frames: Frames,
    maps: TeacherMaps,
    augment: JointAugment,
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup_steps: int = 0,
    temperature: float = 4.0,
    seed: int = 0,
    reporter: Any = None,
    task: str = "distill",
) -> list[dict[str, float]]:
    """Distil into ``student`` from cached ``maps`` on the views they were made of: per-pixel KL
    (``maps.kind == "logits"``, task-oriented), or 1 - cosine between the projected student
    features and the teacher's (``"features"``, task-agnostic). Returns the per-step losses."""
    rng = random.Random(seed + 1)
    torch.manual_seed(seed)
    n, views = maps.flips.shape
    projector: FeatureProjector | None = None
    params = list(student.parameters())
    if maps.kind == "features":
        with torch.no_grad():
            s_ch = student.eval().features(torch.zeros(1, 3, *augment.size))[1].shape[1]
        projector = FeatureProjector(int(s_ch), int(maps.targets.shape[2]))
        params += list(projector.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = _cosine(opt, steps, warmup_steps)
    cache: dict[int, Image.Image] = {}
    cached_bytes = 0
    history = []
    if reporter is not None:
        reporter.start(task, steps)
    for step in range(steps):
        student.train()
        xs, ts = [], []
        for _ in range(batch_size):
            i, v = rng.randrange(n), rng.randrange(views)
            img = cache.get(i)
            if img is None:
                img = frames.load_image(i)
                if cached_bytes < DECODED_CACHE_BYTES:  # decode each frame once while memory allows
                    cache[i] = img
                    cached_bytes += img.width * img.height * 3
            box = tuple(int(c) for c in maps.boxes[i, v].tolist())
            xs.append(augment.apply(img, None, box, bool(maps.flips[i, v]))[0])  # type: ignore[arg-type]
            ts.append(maps.targets[i, v])
        x, t = torch.stack(xs), torch.stack(ts).float()
        if projector is None:
            loss = pixel_distillation_loss(student(x), t, temperature)
        else:
            f = projector(student.features(x)[1])
            f = F.interpolate(f, size=t.shape[-2:], mode="bilinear", align_corners=False)
            loss = (1 - F.cosine_similarity(f, t, dim=1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append({"step": step + 1, "loss": loss.item()})
        if reporter is not None:
            reporter.update(task, step + 1, {"loss": history[-1]["loss"]})
    if reporter is not None:
        reporter.finish(task)
    student.eval()
    return history


# --------------------------------------------------------------------------- checkpoints and export


def save_segmentation(path: str | Path, model: SegmentationModel, **extra: Any) -> None:
    """A checkpoint that rebuilds its own model: the recipe + the weights (+ e.g. metrics)."""
    tmp = Path(str(path) + ".tmp")
    torch.save(
        {"task": "segmentation", "recipe": model.recipe.to_dict(), "state_dict": model.state_dict(), **extra},
        tmp,
    )
    os.replace(tmp, path)


def load_segmentation(path: str | Path) -> tuple[SegmentationModel, dict[str, Any]]:
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if ckpt.get("task") != "segmentation":
        raise DatasetError(f"{path} is not a segmentation checkpoint")
    model = build_segmentation_model(SegmentationRecipe.from_dict(ckpt["recipe"]), load_weights=False)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


class FullResolution(nn.Module):
    """What an exported segmentation model computes: [0, 1] pixels (B, 3, H, W) -> class logits at
    the input's resolution (B, C, H, W)."""

    def __init__(self, model: SegmentationModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.model(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def _per_pixel(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def export_segmentation(
    model: SegmentationModel,
    out_dir: str | Path,
    *,
    formats: Sequence[str] = ("safetensors", "onnx"),
    metrics: dict[str, Any] | None = None,
    opset: int = 17,
) -> dict[str, Any]:
    """Write ``formats`` of ``model`` and a model card (classes, void index, palette, input size,
    normalization, metrics) into ``out_dir``. ONNX is checked in onnxruntime the way deployment
    judges it (``kt_train.export``'s rule, pixel by pixel: the argmax agrees and the probabilities
    are close); a format that fails is reported in the card's ``failed_formats`` and the others
    are kept."""
    from safetensors.torch import save_file

    from ..export import ExportError, _onnx_export_legacy, _run_onnx, measure_parity, parity_failure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    h, w = model.recipe.input_size
    gen = torch.Generator().manual_seed(0)
    xs = [torch.rand(2, 3, h, w, generator=gen)]
    ref = FullResolution(model).eval()
    with torch.no_grad():
        expected = [ref(x) for x in xs]
    files: dict[str, str] = {}
    failed: dict[str, str] = {}
    parity: dict[str, Any] = {}
    for fmt in formats:
        try:
            if fmt == "safetensors":
                save_file(
                    {k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors")
                )
                files[fmt] = "model.safetensors"
            elif fmt == "onnx":
                path = out / "model.onnx"
                _onnx_export_legacy(ref, xs[0], path, opset)
                got, _ = _run_onnx(path, xs)
                p = measure_parity([_per_pixel(g) for g in got], [_per_pixel(e) for e in expected])
                reason = parity_failure(p)
                if reason:
                    path.unlink(missing_ok=True)
                    raise ExportError(f"onnxruntime differs from torch: {reason}")
                parity["onnx"] = p
                files[fmt] = "model.onnx"
            else:
                raise ExportError(
                    f"format {fmt!r} is not exported for segmentation models; use safetensors or onnx"
                )
        except Exception as e:  # one format failing never loses the others
            failed[fmt] = f"{type(e).__name__}: {e}"
    save_segmentation(out / "model.ckpt", model, metrics=metrics or {})
    r = model.recipe
    card = {
        "task": "segmentation",
        "model": r.spec.split("@")[0],
        "classes": r.classes,
        "void_index": r.void_index,
        "palette": [[int(c) for c in _palette_colour(i)] for i in range(r.num_classes)],
        "preprocessing": {
            "input_size": list(r.input_size),
            "resize": "the whole frame to input_size (H, W), bilinear",
            "mean": list(r.mean or ()),
            "std": list(r.std or ()),
            "input": "RGB float in [0, 1], NCHW; the model normalizes",
        },
        "output": "class logits at the input's resolution (N, C, H, W); argmax over C is the mask",
        "output_stride": model.output_stride,
        "parameters": sum(p.numel() for p in model.parameters()),
        "files": {**files, "checkpoint": "model.ckpt"},
        "file_bytes": {k: (out / v).stat().st_size for k, v in {**files, "checkpoint": "model.ckpt"}.items()},
        "failed_formats": failed,
        "parity": parity,
        "metrics": metrics or {},
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def _palette_colour(i: int) -> tuple[int, int, int]:
    """A stable, distinct colour per class index (for overlays)."""
    rng = random.Random(i * 7919 + 17)
    return (rng.randrange(40, 256), rng.randrange(40, 256), rng.randrange(40, 256))
