"""The image encoder of retrieval: one code path embeds gallery images and query crops alike.

An ``Encoder`` wraps a frozen feature model (a timm backbone, an open_clip image tower, or the
trunk of a finetuned teacher checkpoint) and turns images into L2-normalized float32 rows.
Pixels take the same road as everywhere else in kt_train: PIL image -> ``EvalTransform`` (uint8,
not normalized) -> batch -> the model, which normalizes its own input (``models.Preprocess``).
Gallery and query embeddings are therefore comparable exactly when ``describe()`` matches, which
is what galleries store and check.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ConfigError
from .models import ImageClassifier, create_backbone, load_checkpoint
from .train import resolve_device
from .transforms import EvalTransform

__all__ = ["Encoder", "raw_forward_throughput", "resolve_device"]

# Retrieval compares whole images and whole crops: cutting a border off (timm's eval crop_pct
# 0.875) would shrink every query crop the curation chose. CLIP embeds with crop_pct 1.0 too.
DEFAULT_CROP_PCT = 1.0


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    choices = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in choices:
        raise ConfigError(f"unknown precision {precision!r}; use one of auto, fp32, fp16, bf16")
    return choices[precision]


class Encoder:
    """A frozen image model that maps images to L2-normalized embedding rows (float32 numpy)."""

    spec: str
    dim: int
    image_size: int

    def __init__(
        self,
        model: ImageClassifier,
        spec: str,
        *,
        checkpoint: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        crop_pct: float = DEFAULT_CROP_PCT,
        device: str | torch.device | None = None,
        precision: str = "auto",
        channels_last: bool = True,
        batch_size: int = 128,
    ) -> None:
        self.device = resolve_device(device)
        self.autocast_dtype = _autocast_dtype(precision, self.device)
        self.channels_last = bool(channels_last)
        self.model = model.eval().requires_grad_(False).to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.spec = str(spec)
        self.checkpoint = checkpoint
        self.model_kwargs = dict(model_kwargs or {})
        dc = model.data_config
        self.image_size = int(dc.input_size)
        self.mean = tuple(float(v) for v in dc.mean)
        self.std = tuple(float(v) for v in dc.std)
        self.interpolation = dc.interpolation
        self.crop_pct = float(crop_pct)
        self.transform = EvalTransform(self.image_size, crop_pct=self.crop_pct)
        self.batch_size = int(batch_size)
        # The feature width, measured rather than read from attributes: timm's pre-logits width
        # differs from num_features for models with a head MLP.
        probe = torch.zeros(1, 3, self.image_size, self.image_size, dtype=torch.uint8)
        self.dim = int(self.encode_tensor(probe).shape[-1])

    def __repr__(self) -> str:
        src = f", checkpoint={self.checkpoint!r}" if self.checkpoint else ""
        return (
            f"Encoder({self.spec!r}{src}, dim={self.dim}, image_size={self.image_size}, device={self.device})"
        )

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_spec(
        cls,
        spec: str,
        *,
        image_size: int | None = None,
        model_kwargs: dict | None = None,
        channels_last: bool = True,
        device: str | torch.device | None = None,
        precision: str = "auto",
        crop_pct: float = DEFAULT_CROP_PCT,
        batch_size: int = 128,
    ) -> Encoder:
        """A model spec's pooled features: timm pre-logits, or the open_clip image embedding."""
        # Seeded so that a spec without weights (tests, smoke runs) gives the same encoder in every
        # process: a gallery and its queries must be embedded by the same function.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = create_backbone(str(spec), image_size=image_size, model_kwargs=model_kwargs)
        return cls(
            model,
            str(spec),
            model_kwargs=model_kwargs,
            crop_pct=crop_pct,
            device=device,
            precision=precision,
            channels_last=channels_last,
            batch_size=batch_size,
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        channels_last: bool = True,
        device: str | torch.device | None = None,
        precision: str = "auto",
        crop_pct: float = DEFAULT_CROP_PCT,
        batch_size: int = 128,
    ) -> Encoder:
        """The features (before the task head) of a finetuned model checkpoint."""
        model, _ = load_checkpoint(path)
        return cls(
            model,
            model.recipe.spec,
            checkpoint=str(Path(path).absolute()),
            model_kwargs=model.recipe.model_kwargs,
            crop_pct=crop_pct,
            device=device,
            precision=precision,
            channels_last=channels_last,
            batch_size=batch_size,
        )

    @classmethod
    def from_description(
        cls,
        desc: dict[str, Any],
        *,
        device: str | torch.device | None = None,
        precision: str = "auto",
        batch_size: int = 128,
    ) -> Encoder:
        """Rebuild the encoder a gallery was embedded with, from its ``describe()`` dict."""
        if not desc.get("spec"):
            raise ConfigError(
                "this gallery records no encoder spec (its embeddings were imported); pass the encoder "
                "that produced them explicitly, e.g. Encoder.from_spec('open_clip:ViT-B-32@laion2b_s34b_b79k')"
            )
        crop_pct = float(desc.get("crop_pct", DEFAULT_CROP_PCT))
        if desc.get("checkpoint"):
            return cls.from_checkpoint(
                desc["checkpoint"],
                device=device,
                precision=precision,
                crop_pct=crop_pct,
                batch_size=batch_size,
            )
        return cls.from_spec(
            desc["spec"],
            image_size=desc.get("image_size"),
            model_kwargs=desc.get("model_kwargs") or None,
            device=device,
            precision=precision,
            crop_pct=crop_pct,
            batch_size=batch_size,
        )

    def describe(self) -> dict[str, Any]:
        """What a gallery stores to check (and rebuild) the encoder its embeddings came from."""
        return {
            "spec": self.spec,
            "checkpoint": self.checkpoint,
            "dim": self.dim,
            "image_size": self.image_size,
            "crop_pct": self.crop_pct,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "model_kwargs": self.model_kwargs,
            "normalized": True,
        }

    # -- encoding --------------------------------------------------------------------------

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def encode_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) [n, 3, h, w] -> float32 L2-normalized [n, dim], left on the device.

        Returning the device tensor lets a caller queue the next batch before waiting for this one.
        """
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a batch [n, 3, h, w], got shape {tuple(batch.shape)}")
        x = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            feats = self.model.features(x)
        return F.normalize(feats.float().flatten(1), dim=-1)

    def encode_batch(self, batch_uint8: torch.Tensor) -> np.ndarray:
        """uint8 [n, 3, h, w] (any size; the model resizes) -> float32 [n, dim], unit-norm rows."""
        if len(batch_uint8) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_tensor(batch_uint8).cpu().numpy()

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> float32 [n, dim], unit-norm rows, through the same eval transform as galleries."""
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            out.append(self.encode_batch(torch.stack([self.transform(im) for im in chunk])))
        return np.concatenate(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_forward_throughput(
    encoder: Encoder, n: int = 1024, batch_size: int = 128, *, warmup: int = 2
) -> float:
    """Images/s of the encoder's forward alone on random uint8 input already on the device at size.

    The ceiling an embedding pipeline (decode + transform + transfer + forward) is measured against.
    """
    size = encoder.image_size
    x = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=encoder.device)
    for _ in range(warmup):
        encoder.encode_tensor(x)
    _sync(encoder.device)
    steps = max(1, -(-n // batch_size))
    t0 = time.perf_counter()
    for _ in range(steps):
        encoder.encode_tensor(x)
    _sync(encoder.device)
    return steps * batch_size / (time.perf_counter() - t0)
