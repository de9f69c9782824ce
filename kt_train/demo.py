"""A tiny synthetic task that makes the whole pipeline run offline in a minute.

Each class is a pattern family (stripes at a class-specific angle in a class-specific hue, on a
noisy background), so the task is learnable but not trivial; the unlabeled transfer set is drawn
from the same families without labels, as a user's unlabeled domain data would be.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_CLASSES = ("diagonal", "horizontal", "rings", "vertical")


def demo_image(cls: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    freq = rng.uniform(3, 6)
    phase = rng.uniform(0, 2 * math.pi)
    if cls == 0:
        v = np.sin(2 * math.pi * freq * (xx + yy) / 1.4 + phase)
    elif cls == 1:
        v = np.sin(2 * math.pi * freq * yy + phase)
    elif cls == 2:
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        v = np.sin(2 * math.pi * freq * np.hypot(xx - cx, yy - cy) * 1.5 + phase)
    else:
        v = np.sin(2 * math.pi * freq * xx + phase)
    hue = np.array([[1.0, 0.3, 0.2], [0.2, 0.8, 0.3], [0.3, 0.4, 1.0], [0.9, 0.8, 0.2]][cls % 4])
    hue = np.clip(hue + rng.normal(0, 0.15, 3), 0, 1)
    img = 0.5 + 0.35 * v[..., None] * hue[None, None, :] + rng.normal(0, 0.08, (size, size, 3))
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def make_demo_data(
    root: str | Path,
    *,
    per_class: int = 10,
    test_per_class: int = 20,
    unlabeled: int = 400,
    size: int = 32,
    seed: int = 0,
) -> dict[str, Path]:
    """Write train/ and test/ ImageFolders and an unlabeled transfer/ folder under ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c, name in enumerate(DEMO_CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                demo_image(c, rng, size).save(d / f"{name}_{i:04d}.png")
    d = root / "transfer"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(unlabeled):
        demo_image(int(rng.integers(len(DEMO_CLASSES))), rng, size).save(d / f"img_{i:05d}.png")
    return {"train": root / "train", "test": root / "test", "transfer": root / "transfer"}
