"""Synthetic data for the offline demo (``bash .ci/demo`` = ``kt demo`` = ``python -m service.demo``)
and for the tests.

**The demo's world.** Without downloadable weights there is no foundation model to adapt, so the
demo makes a small stand-in for one. Its "visual world" is 20 texture *families* (stripes in three
orientations, checkers, diamonds, dots, rings, spokes, zigzags, blobs; each fine and coarse), drawn
in two random colours with random phase, position, jitter and noise. The **pretext task** asks for
the family (20 classes); :func:`pretrain_teacher` trains a tiny random-init timm model on an endless
stream of it for some seconds and writes ``model.safetensors`` + ``model.card.json`` (what
``kt admin register-model`` takes): the "VFM" that already knows this world. The **user task** has
another label space: 4 classes, each a group of families (:data:`TASK_CLASSES`), with 10 labeled
images per class, a test set, and an unlabeled gallery of the same world (every family, plus some
off-world images). A teacher adapted from the pretrained model reads the task off features it
already has; a student trained from scratch on 40 labeled images has to learn the world from them.

**The fixtures' task** (:func:`make_demo_data`, used by the tests) is older and smaller: 4 stripe
families, one per class.

    python -m kt_train.demo world OUT [--per-class 10 --test-per-class 25 --gallery 800 --seed 0]
    python -m kt_train.demo pretrain OUT [--arch test_resnet --steps 300 --seed 0]
    python -m kt_train.demo prepare OUT [--teacher '{"steps": 300}']   (both, and the gallery)

Each prints one JSON line (what it wrote) last.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


# --------------------------------------------------------------------------- the demo's world

# Periods in pixels of a 32 px image. A training view crops down to 35 % of the area (a zoom of up
# to 1.7x), so the bands are kept more than 1.7x apart: a zoomed fine texture is still not coarse.
FINE = (3.4, 4.6)
COARSE = (10.0, 14.0)
Pattern = Callable[[np.ndarray, np.ndarray, np.random.Generator, tuple[float, float]], np.ndarray]


def _phase(rng: np.random.Generator) -> float:
    return float(rng.uniform(0, 2 * math.pi))


def _jitter(rng: np.random.Generator, degrees: float = 8.0) -> float:
    return math.radians(float(rng.uniform(-degrees, degrees)))


def _stripes(*angles: float) -> Pattern:
    """Stripes at one of ``angles`` (the diagonal family takes both diagonals: a flip swaps them)."""

    def pattern(xx, yy, rng, band):  # type: ignore[no-untyped-def]
        theta = float(rng.choice(angles)) + _jitter(rng)
        along = xx * math.cos(theta) + yy * math.sin(theta)
        return np.sin(2 * math.pi * along / rng.uniform(*band) + _phase(rng))

    return pattern


def _checker(rotation: float) -> Pattern:
    def pattern(xx, yy, rng, band):  # type: ignore[no-untyped-def]
        period, theta = rng.uniform(*band), rotation + _jitter(rng)
        u = xx * math.cos(theta) + yy * math.sin(theta)
        v = -xx * math.sin(theta) + yy * math.cos(theta)
        return np.sign(
            np.sin(2 * math.pi * u / period + _phase(rng)) * np.sin(2 * math.pi * v / period + _phase(rng))
        )

    return pattern


def _rings(xx, yy, rng, band):  # type: ignore[no-untyped-def]
    cx, cy = rng.uniform(0.2, 0.8, 2) * xx.shape[1]
    return np.sin(2 * math.pi * np.hypot(xx - cx, yy - cy) / rng.uniform(*band) + _phase(rng))


def _dots(xx, yy, rng, band):  # type: ignore[no-untyped-def]
    period = rng.uniform(*band) * 1.3
    ox, oy = rng.uniform(0, period, 2)
    dx, dy = (xx + ox) % period - period / 2, (yy + oy) % period - period / 2
    return np.where(np.hypot(dx, dy) < period * rng.uniform(0.22, 0.3), 1.0, -1.0)


def _spokes(xx, yy, rng, band):  # type: ignore[no-untyped-def]
    count = 6 if band == COARSE else 14
    cx, cy = rng.uniform(0.3, 0.7, 2) * xx.shape[1]
    return np.sign(np.sin(count * np.arctan2(yy - cy, xx - cx) + _phase(rng)))


def _zigzag(xx, yy, rng, band):  # type: ignore[no-untyped-def]
    period = rng.uniform(*band)
    tri = np.abs((xx / (period * 1.5) + rng.uniform(0, 1)) % 1.0 - 0.5) * 2 * period * rng.uniform(0.6, 1.0)
    return np.sign(np.sin(2 * math.pi * (yy + tri) / period + _phase(rng)))


def _smooth_noise(shape: tuple[int, int], rng: np.random.Generator, cell: int) -> np.ndarray:
    h, w = shape
    grid = rng.normal(0, 1, (h // cell + 3, w // cell + 3))
    ys, xs = np.arange(h) / cell, np.arange(w) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a, b = grid[y0][:, x0], grid[y0][:, x0 + 1]
    c, d = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _blobs(xx, yy, rng, band):  # type: ignore[no-untyped-def]
    return np.sign(_smooth_noise(xx.shape, rng, 8 if band == COARSE else 3))


_PATTERNS: dict[str, Pattern] = {
    "hstripes": _stripes(0.0),
    "vstripes": _stripes(math.pi / 2),
    "dstripes": _stripes(math.pi / 4, 3 * math.pi / 4),
    "checker": _checker(0.0),
    "diamonds": _checker(math.pi / 4),
    "rings": _rings,
    "dots": _dots,
    "spokes": _spokes,
    "zigzag": _zigzag,
    "blobs": _blobs,
}
# the pretext task's classes: every pattern, fine and coarse
WORLD_FAMILIES: tuple[str, ...] = tuple(f"{p}-{band}" for p in _PATTERNS for band in ("fine", "coarse"))
# the user task: another label space over the same world (every family belongs to one class)
TASK_CLASSES: dict[str, tuple[str, ...]] = {
    "checks": ("checker",),
    "rings": ("rings",),
    "spokes": ("spokes",),
    "zigzags": ("zigzag",),
}


def task_families(cls: str) -> list[int]:
    """The world families (indices into ``WORLD_FAMILIES``) that make up user class ``cls``."""
    return [i for i, f in enumerate(WORLD_FAMILIES) if f.split("-")[0] in TASK_CLASSES[cls]]


def world_image(family: int | None, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One ``size`` px RGB image (uint8 HxWx3) of ``WORLD_FAMILIES[family]``; ``None``: an
    off-world image (a smooth colour gradient), as a gallery holds things unlike the task."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if family is None:
        theta = _phase(rng)
        t = (xx * math.cos(theta) + yy * math.sin(theta)) / (size * 1.5) + 0.5
    else:
        name = WORLD_FAMILIES[family]
        pattern, band = name.rsplit("-", 1)
        t = (np.clip(_PATTERNS[pattern](xx, yy, rng, FINE if band == "fine" else COARSE), -1, 1) + 1) / 2
    c1 = rng.uniform(0, 1, 3)
    c2 = rng.uniform(0, 1, 3)
    while np.abs(c1 - c2).sum() < 0.6:  # two colours far enough apart to show the pattern
        c2 = rng.uniform(0, 1, 3)
    t = np.clip(t, 0, 1)[..., None]
    img = c1 * (1 - t) + c2 * t + rng.normal(0, rng.uniform(0.02, 0.1), (size, size, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _task_image(cls: str, rng: np.random.Generator, size: int) -> np.ndarray:
    return world_image(int(rng.choice(task_families(cls))), rng, size)


def write_world(
    root: str | Path,
    *,
    per_class: int = 10,
    test_per_class: int = 25,
    gallery: int = 800,
    off_world: float = 0.15,
    size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """The user task under ``root``: ``train/`` and ``test/`` ImageFolders (``TASK_CLASSES``) and
    an unlabeled ``gallery/`` folder (every family equally, plus ``off_world`` of gradients).
    Separate random streams per split, so a size change in one leaves the others as they were."""
    root = Path(root)
    out: dict[str, Any] = {"classes": list(TASK_CLASSES), "size": size, "seed": seed}
    for k, (split, n) in enumerate((("train", per_class), ("test", test_per_class))):
        rng = np.random.default_rng([seed, k])
        for cls in TASK_CLASSES:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(_task_image(cls, rng, size)).save(d / f"{cls}_{i:04d}.png")
        out[split] = str(root / split)
        out[f"{split}_images"] = n * len(TASK_CLASSES)
    rng = np.random.default_rng([seed, 2])
    d = root / "gallery"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(gallery):
        family = None if rng.uniform() < off_world else int(rng.integers(len(WORLD_FAMILIES)))
        Image.fromarray(world_image(family, rng, size)).save(d / f"g{i:05d}.png")
    out["gallery"] = str(d)
    out["gallery_images"] = gallery
    return out


# --------------------------------------------------------------------------- the stand-in VFM


def pretrain_teacher(
    out_dir: str | Path,
    *,
    arch: str = "test_resnet",
    model_kwargs: dict[str, Any] | None = None,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    size: int = 32,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train random-init timm ``arch`` on the pretext task (the world's 20 families, a fresh
    batch every step, seen through the training views the pipeline uses) and write
    ``out_dir/model.safetensors`` (the trunk: timm's own keys) with ``model.card.json`` beside it
    (arch, mean/std, input size), ready for ``kt admin register-model``. Returns what it wrote and
    the pretext accuracy on held-out images. A no-op when ``out_dir`` holds the result of the same
    arguments already."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from .models import create_teacher
    from .threads import configure_threads
    from .transforms import TrainAugment

    out = Path(out_dir)
    kwargs = dict(model_kwargs or {})
    params = {
        "arch": arch,
        "model_kwargs": kwargs,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "size": size,
        "seed": seed,
    }
    card_path = out / "model.card.json"
    if card_path.is_file() and (out / "model.safetensors").is_file():
        card = json.loads(card_path.read_text())
        if card.get("pretraining", {}).get("params") == params:
            return {"weights": str(out / "model.safetensors"), "card": str(card_path), **card["pretraining"]}
    configure_threads()
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 9])
    model = create_teacher(f"timm:{arch}", len(WORLD_FAMILIES), image_size=size, model_kwargs=kwargs)
    augment = TrainAugment(size, scale=(0.3, 1.0), hflip=True, vflip=True)
    gen = torch.Generator().manual_seed(seed)

    def batch(n: int, views: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ys = rng.integers(len(WORLD_FAMILIES), size=n)
        xs = []
        for y in ys:
            img = Image.fromarray(world_image(int(y), rng, size))
            xs.append(
                augment.apply(img, augment.sample_params(size, size, gen))
                if views
                else torch.from_numpy(np.array(img)).permute(2, 0, 1)
            )
        return torch.stack(xs), torch.from_numpy(ys)

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))),
    )
    t0 = time.monotonic()
    model.train()
    for step in range(steps):
        x, y = batch(batch_size, views=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step + 1) % max(1, steps // 5) == 0:
            acc = float((logits.detach().argmax(-1) == y).float().mean())
            log(
                f"pretrain {arch}: step {step + 1}/{steps} loss {float(loss.detach()):.3f} batch acc {acc:.2f}"
            )
    seconds = time.monotonic() - t0
    model.eval()
    with torch.no_grad():
        x, y = batch(400, views=False)
        acc = float((model(x).argmax(-1) == y).float().mean())
    out.mkdir(parents=True, exist_ok=True)
    trunk = {k: v.detach().contiguous() for k, v in model.net.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(trunk, str(tmp))
    tmp.replace(out / "model.safetensors")
    dc = model.data_config
    pretraining = {
        "params": params,
        "task": f"{len(WORLD_FAMILIES)} texture families of kt_train.demo's world",
        "pretext_accuracy": round(acc, 4),
        "parameters": sum(p.numel() for p in model.net.parameters()),
        "seconds": round(seconds, 1),
    }
    card = {
        "arch": arch,
        "create_model_kwargs": kwargs,
        "mean": list(dc.mean),
        "std": list(dc.std),
        "input_size": [3, size, size],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "norm_eval": False,
        "pretraining": pretraining,
    }
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    return {"weights": str(out / "model.safetensors"), "card": str(card_path), **pretraining}


def prepare(
    out_dir: str | Path,
    *,
    per_class: int = 10,
    test_per_class: int = 25,
    gallery: int = 800,
    size: int = 32,
    seed: int = 0,
    teacher: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Everything the demo's operator side needs, in one process (torch and timm load once):
    the world (:func:`write_world`, into ``out_dir/world``, written afresh), and with ``teacher``
    (:func:`pretrain_teacher` arguments) the stand-in VFM in ``out_dir/teacher``, the shape check
    that registering it runs (``kt_train.weights.check_weights``), and, when ``gallery`` > 0, the
    gallery embedded by it in ``out_dir/gallery`` (what ``kt gallery build`` writes, flat index)."""
    import shutil

    out = Path(out_dir)
    shutil.rmtree(out / "world", ignore_errors=True)  # no images left over from a bigger run
    t0 = time.monotonic()
    res: dict[str, Any] = {
        "world": write_world(
            out / "world",
            per_class=per_class,
            test_per_class=test_per_class,
            gallery=gallery,
            size=size,
            seed=seed,
        )
    }
    res["world"]["seconds"] = round(time.monotonic() - t0, 1)
    if teacher is None:
        return res
    from .weights import check_weights

    kwargs = {"size": size, "seed": seed, **teacher}
    t = pretrain_teacher(out / "teacher", log=log, **kwargs)
    t["weights_problems"] = check_weights(t["params"]["arch"], t["params"]["model_kwargs"], t["weights"])
    res["teacher"] = t
    if gallery > 0:
        from .gallery import build_gallery

        t0 = time.monotonic()
        encoder = f"timm:{t['params']['arch']}@{t['weights']}"  # its card beside it gives the kwargs
        if log is not None:
            log(f"gallery: embedding {gallery} images with {encoder}")
        built = build_gallery(
            res["world"]["gallery"], out / "gallery", encoder=encoder, image_size=size, index_kind="flat",
            overwrite=True, device="cpu",
        )  # fmt: skip
        res["gallery"] = {"path": str(out / "gallery"), "count": len(built), "encoder": encoder}
        res["gallery"]["seconds"] = round(time.monotonic() - t0, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kt_train.demo", description="The demo's data and teacher.")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("world", help="the user task: train/, test/ and an unlabeled gallery/")
    w.add_argument("out", type=Path)
    w.add_argument("--per-class", type=int, default=10)
    w.add_argument("--test-per-class", type=int, default=25)
    w.add_argument("--gallery", type=int, default=800)
    w.add_argument("--size", type=int, default=32)
    w.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("pretrain", help="the stand-in foundation model: pretrain a tiny teacher")
    t.add_argument("out", type=Path)
    t.add_argument("--arch", default="test_resnet")
    t.add_argument("--model-kwargs", type=json.loads, default={}, help="timm create_model kwargs (JSON)")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--size", type=int, default=32)
    t.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("prepare", help="world + pretrained teacher + its gallery, in one process")
    r.add_argument("out", type=Path)
    r.add_argument("--per-class", type=int, default=10)
    r.add_argument("--test-per-class", type=int, default=25)
    r.add_argument("--gallery", type=int, default=800)
    r.add_argument("--size", type=int, default=32)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--teacher", type=json.loads, default=None, help="pretrain_teacher arguments (JSON)")
    args = p.parse_args(argv)
    log = lambda m: print(f"[demo] {m}", file=sys.stderr, flush=True)  # noqa: E731
    if args.command == "prepare":
        res = prepare(
            args.out, per_class=args.per_class, test_per_class=args.test_per_class, gallery=args.gallery,
            size=args.size, seed=args.seed, teacher=args.teacher, log=log,
        )  # fmt: skip
    elif args.command == "world":
        res = write_world(
            args.out, per_class=args.per_class, test_per_class=args.test_per_class, gallery=args.gallery,
            size=args.size, seed=args.seed,
        )  # fmt: skip
    else:
        res = pretrain_teacher(
            args.out, arch=args.arch, model_kwargs=args.model_kwargs, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            size=args.size, seed=args.seed, log=log,
        )  # fmt: skip
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
