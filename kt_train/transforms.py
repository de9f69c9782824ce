"""Pixel pipelines that end in uint8 CHW tensors.

Outputs are deliberately *not* normalized: the teacher and the student normalize differently
(CLIP vs ImageNet statistics, different input sizes), and both must see the very same augmented
pixels. Normalization therefore happens per model, after batching, on ``to_float(batch)``.

A training view can be replayed exactly: ``TrainAugment.sample_params`` draws every random
choice into a plain, JSON-serializable dict, and ``TrainAugment.apply`` is a pure function of the
image and that dict. This lets teacher outputs be computed once for a stored view and reused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from kt_train.errors import ConfigError

__all__ = ["EvalTransform", "TrainAugment", "to_float", "to_rgb"]

_BILINEAR = InterpolationMode.BILINEAR
_INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}
_JITTER_OPS = ("brightness", "contrast", "saturation")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    ``Image.convert("RGB")`` alone is wrong for high-bit-depth images: it clips 16-bit values to
    255, so a typical 16-bit PNG turns almost entirely white. Those modes are rescaled instead.
    Palette images with transparency go through RGBA first, which is what PIL expects (and avoids
    its warning); the alpha channel is then dropped like every common training pipeline does.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if arr.ndim == 3:  # PIL does not produce this for these modes, but be defensive
            arr = arr[..., 0]
        arr = arr.astype(np.float64)
        if mode == "F" and arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        elif mode != "F" and arr.size and float(arr.max()) > 255.0:
            arr = arr / 257.0  # 16-bit range 0..65535 -> 0..255
        arr = np.nan_to_num(arr, nan=0.0)
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def to_float(batch_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]; already-floating tensors are returned unchanged."""
    if batch_uint8.is_floating_point():
        return batch_uint8
    if batch_uint8.dtype != torch.uint8:
        raise TypeError(f"to_float expects a uint8 tensor, got {batch_uint8.dtype}")
    return batch_uint8.to(torch.float32).div_(255.0)


def _check_size(size: int) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ConfigError(f"image size must be a positive integer, got {size!r}; set e.g. size: 224")
    return size


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _randint(lo: int, hi_inclusive: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(lo, hi_inclusive + 1, (), generator=generator))


class TrainAugment:
    """RandomResizedCrop + flips + optional color jitter, producing uint8 [3, size, size].

    The random draws are separated from the pixel work (``sample_params`` / ``apply``) so a view
    can be stored as a small dict and reproduced bit-exactly later.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.25, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        vflip: bool = False,
        color_jitter: float = 0.0,
    ) -> None:
        self.size = _check_size(size)
        lo, hi = float(scale[0]), float(scale[1])
        if not (0.0 < lo <= hi <= 1.0):
            raise ConfigError(
                f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}; use e.g. scale: [0.25, 1.0]"
            )
        rlo, rhi = float(ratio[0]), float(ratio[1])
        if not (0.0 < rlo <= rhi):
            raise ConfigError(
                f"crop aspect ratio must satisfy 0 < min <= max, got {tuple(ratio)}; use e.g. ratio: [0.75, 1.333]"
            )
        if color_jitter < 0:
            raise ConfigError(f"color_jitter must be >= 0, got {color_jitter}; use 0 to disable it")
        self.scale = (lo, hi)
        self.ratio = (rlo, rhi)
        self.hflip = bool(hflip)
        self.vflip = bool(vflip)
        self.color_jitter = float(color_jitter)

    def __repr__(self) -> str:
        return (
            f"TrainAugment(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, "
            f"vflip={self.vflip}, color_jitter={self.color_jitter})"
        )

    def sample_params(
        self, width: int, height: int, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """Draw one view for an image of ``width`` x ``height``.

        Mirrors torchvision's RandomResizedCrop.get_params (10 tries, then a center crop clamped to
        the aspect-ratio range), but with an explicit generator so views are reproducible per seed.
        Returns only plain Python values so the dict can be stored as JSON.
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        top, left, h, w = self._sample_crop(width, height, generator)
        params: dict[str, Any] = {
            "top": top,
            "left": left,
            "h": h,
            "w": w,
            "hflip": bool(self.hflip and float(torch.rand((), generator=generator)) < 0.5),
            "vflip": bool(self.vflip and float(torch.rand((), generator=generator)) < 0.5),
        }
        if self.color_jitter > 0:
            lo, hi = max(0.0, 1.0 - self.color_jitter), 1.0 + self.color_jitter
            order = torch.randperm(len(_JITTER_OPS), generator=generator).tolist()
            params["jitter_order"] = [_JITTER_OPS[k] for k in order]
            for op in _JITTER_OPS:
                params[op] = _uniform(lo, hi, generator)
        return params

    def _sample_crop(
        self, width: int, height: int, generator: torch.Generator | None
    ) -> tuple[int, int, int, int]:
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * _uniform(self.scale[0], self.scale[1], generator)
            aspect = math.exp(_uniform(log_lo, log_hi, generator))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = _randint(0, height - h, generator)
                left = _randint(0, width - w, generator)
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, max(1, round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, max(1, round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def apply(self, img: Image.Image, params: dict[str, Any]) -> torch.Tensor:
        """Render the view described by ``params``; deterministic for a given image and dict."""
        img = to_rgb(img)
        img = F.resized_crop(
            img,
            int(params["top"]),
            int(params["left"]),
            int(params["h"]),
            int(params["w"]),
            [self.size, self.size],
            interpolation=_BILINEAR,
            antialias=True,
        )
        out = F.pil_to_tensor(img)
        if params.get("hflip"):
            out = out.flip(-1)
        if params.get("vflip"):
            out = out.flip(-2)
        for op in params.get("jitter_order", ()):
            factor = float(params[op])
            if op == "brightness":
                out = F.adjust_brightness(out, factor)
            elif op == "contrast":
                out = F.adjust_contrast(out, factor)
            elif op == "saturation":
                out = F.adjust_saturation(out, factor)
            else:
                raise ValueError(f"unknown color jitter op {op!r} in stored view params")
        return out.contiguous()

    def __call__(self, img: Image.Image) -> torch.Tensor:
        params = self.sample_params(img.width, img.height, None)
        return self.apply(img, params)


class EvalTransform:
    """Resize the shorter side to round(size / crop_pct), then center-crop to [3, size, size] uint8.

    Evaluation builds it from ``kt_train.models.preprocessing(model)`` (``from_preprocessing``), the
    dict the model card carries, so a deployment that follows the card sees the same pixels.
    """

    def __init__(self, size: int, crop_pct: float = 1.0, interpolation: str = "bilinear") -> None:
        self.size = _check_size(size)
        if not (0.0 < crop_pct <= 1.0):
            raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct}; use 1.0 for no border crop")
        if interpolation not in _INTERPOLATIONS:
            raise ConfigError(
                f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}"
            )
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation
        self.resize_to = max(self.size, round(self.size / self.crop_pct))

    @classmethod
    def from_preprocessing(cls, pre: Mapping[str, Any]) -> EvalTransform:
        """The transform a ``preprocessing`` dict (``kt_train.models.preprocessing``, a model card's
        section) describes; a ConfigError for one that asks for something else."""
        try:
            size = int(pre["input_size"])
            resize_size = int(pre.get("resize_size", size))
            crop_pct = float(pre.get("crop_pct", 1.0))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"the preprocessing needs input_size, resize_size and crop_pct numbers: {e}"
            ) from e
        for key, want in (("resize", "shorter_side"), ("crop", "center"), ("channel_order", "RGB")):
            if pre.get(key, want) != want:
                raise ConfigError(f"preprocessing {key}={pre.get(key)!r} is not supported; only {want!r}")
        tf = cls(size, crop_pct=crop_pct, interpolation=str(pre.get("interpolation", "bilinear")))
        if tf.resize_to != resize_size:
            raise ConfigError(
                f"preprocessing resize_size {resize_size} does not match input_size {size} / crop_pct "
                f"{crop_pct} = {tf.resize_to}"
            )
        return tf

    def __repr__(self) -> str:
        return (
            f"EvalTransform(size={self.size}, crop_pct={self.crop_pct}, interpolation={self.interpolation!r})"
        )

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = to_rgb(img)
        img = F.resize(
            img, [self.resize_to], interpolation=_INTERPOLATIONS[self.interpolation], antialias=True
        )
        img = F.center_crop(img, [self.size, self.size])
        return F.pil_to_tensor(img).contiguous()
