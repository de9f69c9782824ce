"""Tiny synthetic images and dataset layouts for the data/transform tests."""

from __future__ import annotations

import io
import random
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def random_image(width: int = 24, height: int = 20, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A noisy image (noise so that crops and flips change the pixels)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img if mode == "RGB" else img.convert(mode)


def image_bytes(width: int = 24, height: int = 20, seed: int = 0, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    random_image(width, height, seed).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, width: int = 24, height: int = 20, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    path.write_bytes(image_bytes(width, height, seed, fmt))
    return path


def make_imagefolder(
    root: Path, classes: dict[str, int], ext_cycle: tuple[str, ...] = (".png", ".jpg")
) -> list[str]:
    """``root/<class>/<class>_<k><ext>``; returns the relative entry names, sorted."""
    names: list[str] = []
    seed = random.Random(0)
    for c, n in classes.items():
        for k in range(n):
            rel = f"{c}/{c}_{k}{ext_cycle[k % len(ext_cycle)]}"
            write_image(root / rel, 16 + k, 18, seed=seed.randrange(10_000))
            names.append(rel)
    return sorted(names)


def zip_folder(src: Path, dest: Path, prefix: str = "") -> Path:
    """Zip ``src`` into ``dest``, placing entries under ``prefix`` (e.g. 'dataset/')."""
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(src.rglob("*")):
            rel = p.relative_to(src).as_posix()
            if p.is_dir():
                zf.writestr(prefix + rel + "/", b"")
            else:
                zf.write(p, prefix + rel)
    return dest


def write_shard(path: Path, keys: list[str], seed: int = 0) -> Path:
    """A webdataset shard as img2dataset writes it: <key>.jpg, <key>.txt, <key>.json per sample."""
    with tarfile.open(path, "w") as tf:
        for i, key in enumerate(keys):
            for suffix, data in (
                (".jpg", image_bytes(20, 16, seed + i, "JPEG")),
                (".txt", f"caption {key}".encode()),
                (".json", b'{"key": "%s"}' % key.encode()),
            ):
                info = tarfile.TarInfo(key + suffix)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path
