"""Teacher outputs computed once, replayed by every distillation run.

Distillation spends most of its time in the teacher's forward passes. The cache runs the teacher
once over the transfer set for ``views`` augmented views per image and stores, per view, the
augmentation parameters (crop box, flips, jitter factors) and the teacher's top-k logits in fp16.
A distillation run then renders exactly those views from the stored parameters
(``TrainAugment.apply`` is a pure function of image and parameters) and reads its targets, with no
teacher in the loop.

On disk (one directory per key)::

    cache.json     what the cache was built from, its shape, how long it took
    params.npy     float32 [N, views, 10]   top, left, h, w, hflip, vflip, brightness, contrast,
                                            saturation, jitter order (index into JITTER_ORDERS)
    logits.npy     float16 [N, views, k]    the teacher's k largest logits, descending
    indices.npy    int16/int32 [N, views, k] their class indices
    valid.npy      bool [N, views]          False for images that could not be decoded

The key hashes the teacher checkpoint's bytes, the transfer set's items, the augmentation, the view
size, ``views``, ``k`` and the seed, so a cache is reused by any student trained from the same
teacher on the same set and rebuilt when any of these change. A build writes into ``<key>.partial``
and records its progress, so a killed build resumes; the directory is renamed into place when
complete, and a file lock keeps two processes from building the same key at once.

The directory of caches is a ``kt_train.cache_store`` store: a run reading a cache holds a shared
lock on it (``TeacherCache.lease``), opening one marks it used, and with ``max_bytes`` the least
recently used caches not in use are deleted once the store passes the cap (the worker keeps one
store per tenant, shared by its jobs).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import cache_store
from .data import ImageDataset
from .errors import ConfigError, DatasetError
from .io import atomic_write_json
from .transforms import TrainAugment

__all__ = [
    "CachedViews",
    "TeacherCache",
    "build_teacher_cache",
    "cache_key",
    "file_sha256",
    "kd_loss_topk",
    "open_or_build",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PARAM_FIELDS = ("top", "left", "h", "w", "hflip", "vflip", "brightness", "contrast", "saturation", "jitter")
_OPS = ("brightness", "contrast", "saturation")
JITTER_ORDERS = [list(p) for p in itertools.permutations(_OPS)]


# --------------------------------------------------------------------------- view parameters


def pack_params(params: dict[str, Any]) -> np.ndarray:
    """A view's parameter dict -> float32 vector (exact for the integer fields)."""
    v = np.zeros(len(PARAM_FIELDS), dtype=np.float32)
    for k, name in enumerate(PARAM_FIELDS[:6]):
        v[k] = float(params[name])
    if "jitter_order" in params:
        for k, op in enumerate(_OPS, start=6):
            v[k] = float(params[op])
        v[9] = JITTER_ORDERS.index(list(params["jitter_order"]))
    else:
        v[9] = -1
    return v


def unpack_params(v: np.ndarray) -> dict[str, Any]:
    """Inverse of ``pack_params``: the dict ``TrainAugment.apply`` renders."""
    p: dict[str, Any] = {
        "top": int(v[0]),
        "left": int(v[1]),
        "h": int(v[2]),
        "w": int(v[3]),
        "hflip": bool(v[4]),
        "vflip": bool(v[5]),
    }
    if v[9] >= 0:
        p["jitter_order"] = JITTER_ORDERS[int(v[9])]
        for k, op in enumerate(_OPS, start=6):
            p[op] = float(v[k])
    return p


def _view_generator(seed: int, item: int, view: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + item) * 1_009 + view)


# --------------------------------------------------------------------------- keys


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _augment_dict(augment: TrainAugment) -> dict[str, Any]:
    return {
        "size": augment.size,
        "scale": list(augment.scale),
        "ratio": list(augment.ratio),
        "hflip": augment.hflip,
        "vflip": augment.vflip,
        "color_jitter": augment.color_jitter,
    }


def dataset_fingerprint(dataset: ImageDataset) -> str:
    """Hash of which images, in which order, with which crop boxes, from which stores."""
    h = hashlib.sha256()
    for store in dataset.stores:
        h.update(repr(store).encode())
    for it in dataset.items:
        h.update(f"{it.shard}\t{it.key}\t{it.box}\n".encode())
    return h.hexdigest()


def cache_key(
    teacher_sha256: str, dataset: ImageDataset, augment: TrainAugment, *, views: int, topk: int, seed: int
) -> str:
    desc = {
        "version": FORMAT_VERSION,
        "teacher": teacher_sha256,
        "transfer": dataset_fingerprint(dataset),
        "augment": _augment_dict(augment),
        "views": views,
        "topk": topk,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the cache


@dataclass
class TeacherCache:
    path: Path
    meta: dict[str, Any]
    params: np.ndarray
    logits: np.ndarray
    indices: np.ndarray
    valid: np.ndarray
    # held while the cache is read: eviction keeps it (``release`` when done)
    lease: cache_store.Lease | None = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()

    @property
    def num_items(self) -> int:
        return int(self.params.shape[0])

    @property
    def views(self) -> int:
        return int(self.params.shape[1])

    @property
    def topk(self) -> int:
        return int(self.logits.shape[2])

    @classmethod
    def open(cls, path: str | Path) -> TeacherCache:
        path = Path(path)
        meta_file = path / "cache.json"
        if not meta_file.exists():
            raise ConfigError(f"{path} is not a finished teacher-output cache (no cache.json); rebuild it")
        meta = json.loads(meta_file.read_text())
        if meta.get("version") != FORMAT_VERSION:
            raise ConfigError(
                f"teacher-output cache {path} has format {meta.get('version')}, this version reads "
                f"{FORMAT_VERSION}; delete the directory and it is rebuilt"
            )
        arrays = {
            n: np.load(path / f"{n}.npy", mmap_mode="r") for n in ("params", "logits", "indices", "valid")
        }
        return cls(path=path, meta=meta, **arrays)

    def view_params(self, item: int, view: int) -> dict[str, Any]:
        return unpack_params(self.params[item, view])

    def rows(self) -> np.ndarray:
        """Flat row ids (item * views + view) of every usable view."""
        return np.flatnonzero(np.asarray(self.valid).reshape(-1))


class _Render(Dataset):
    """Build pass: row r = (item r // views, view r % views) -> (pixels, packed params, ok, r)."""

    def __init__(self, dataset: ImageDataset, augment: TrainAugment, views: int, seed: int, start: int):
        self.dataset, self.augment, self.views, self.seed, self.start = dataset, augment, views, seed, start
        self.n = len(dataset) * views

    def __len__(self) -> int:
        return self.n - self.start

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, bool, int]:
        r = self.start + k
        item, view = divmod(r, self.views)
        size = self.augment.size
        try:
            img = self.dataset.load_image(item)
        except DatasetError as e:
            log.warning("teacher cache: %s", e)
            return torch.zeros(3, size, size, dtype=torch.uint8), torch.zeros(len(PARAM_FIELDS)), False, r
        params = self.augment.sample_params(img.width, img.height, _view_generator(self.seed, item, view))
        packed = pack_params(params)
        # Render from the float32-rounded parameters: exactly what a replay will render.
        pixels = self.augment.apply(img, unpack_params(packed))
        return pixels, torch.from_numpy(packed), True, r


class CachedViews(Dataset):
    """Distillation data from a cache: index j -> (pixels of stored view, top-k logits, indices, j).

    ``render_size`` renders the stored views (same crop box, flips and jitter) straight at the
    student's input size instead of the size the teacher saw, sparing a larger render and the
    student's own resize; default: the cache's size, pixel-exact with what the teacher saw.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        augment: TrainAugment,
        cache: TeacherCache,
        render_size: int | None = None,
    ):
        if len(dataset) != cache.num_items:
            raise ConfigError(
                f"teacher-output cache {cache.path} holds {cache.num_items} images, the transfer set "
                f"{len(dataset)}; they were built from different sets"
            )
        if augment.size != cache.meta["augment"]["size"]:
            raise ConfigError(
                f"teacher-output cache {cache.path} was rendered at {cache.meta['augment']['size']} px, "
                f"the distillation views are {augment.size} px"
            )
        self.dataset, self.augment, self.cache = dataset, augment, cache
        self.render = augment
        if render_size is not None and render_size != augment.size:
            self.render = copy.copy(augment)
            self.render.size = render_size
        self.row_ids = cache.rows()
        self.bad = dataset.bad

    def __len__(self) -> int:
        return len(self.row_ids)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        item, view = divmod(int(self.row_ids[j]), self.cache.views)
        img = self.dataset.load_image(item)
        pixels = self.render.apply(img, self.cache.view_params(item, view))
        logits = torch.from_numpy(np.array(self.cache.logits[item, view]))
        idx = torch.from_numpy(np.array(self.cache.indices[item, view]).astype(np.int64))
        return pixels, logits, idx, j


def kd_loss_topk(
    student_logits: torch.Tensor, topk_logits: torch.Tensor, topk_indices: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) with the teacher known only on its top-k classes.

    The teacher's distribution is the softmax of its k logits (the mass outside the top k, small
    at a useful k, is dropped); the student's log-probabilities are over all classes. With k equal
    to the number of classes this is exactly ``losses.kd_loss``.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, topk_indices.long())
    log_p_t = F.log_softmax(topk_logits.float() / t, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * (t * t)


# --------------------------------------------------------------------------- building


def _open_arrays(
    tmp: Path, n: int, views: int, k: int, num_classes: int, fresh: bool
) -> dict[str, np.ndarray]:
    specs = {
        "params": (np.float32, (n, views, len(PARAM_FIELDS))),
        "logits": (np.float16, (n, views, k)),
        "indices": (np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32, (n, views, k)),
        "valid": (np.bool_, (n, views)),
    }
    out: dict[str, np.ndarray] = {}
    for name, (dtype, shape) in specs.items():
        f = tmp / f"{name}.npy"
        if fresh or not f.exists():
            out[name] = np.lib.format.open_memmap(f, mode="w+", dtype=dtype, shape=shape)
        else:
            out[name] = np.load(f, mmap_mode="r+")
    return out


@torch.no_grad()
def build_teacher_cache(
    teacher: nn.Module,
    dataset: ImageDataset,
    augment: TrainAugment,
    out_dir: str | Path,
    *,
    views: int,
    topk: int,
    seed: int,
    num_classes: int,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | None = None,
    channels_last: bool = True,
    autocast_dtype: torch.dtype | None = None,
    meta: dict[str, Any] | None = None,
    flush_every_s: float = 30.0,
    reporter: Any = None,
) -> TeacherCache:
    """Run ``teacher`` over ``views`` seeded views of every image of ``dataset`` and store the
    view parameters and top-k logits under ``out_dir`` (resuming a partial build there)."""
    out = Path(out_dir)
    if views < 1 or topk < 1:
        raise ConfigError(f"teacher cache needs views >= 1 and topk >= 1, got views={views}, topk={topk}")
    if len(dataset) == 0:
        raise DatasetError("the transfer set is empty; nothing to run the teacher on")
    device = device or torch.device("cpu")
    k = min(topk, num_classes)
    n = len(dataset)
    total = n * views
    tmp = out.with_name(out.name + ".partial")
    progress_file = tmp / "progress.json"
    start = 0
    if progress_file.exists():
        prog = json.loads(progress_file.read_text())
        if prog.get("shape") == [n, views, k]:
            start = int(prog["rows_done"])
            log.info("teacher cache: resuming a partial build at %d/%d views (%s)", start, total, tmp)
    if start == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    arrays = _open_arrays(tmp, n, views, k, num_classes, fresh=start == 0)
    teacher.eval()
    loader = DataLoader(
        _Render(dataset, augment, views, seed, start),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    if reporter is not None:
        reporter.start("teacher cache", total)
        if start:  # a partial build resumed: progress picks up there
            reporter.update("teacher cache", start, {})

    def flush(rows_done: int) -> None:
        for a in arrays.values():
            a.flush()  # type: ignore[attr-defined]
        atomic_write_json(progress_file, {"rows_done": rows_done, "shape": [n, views, k]})

    t0 = last = time.perf_counter()
    done = start
    for pixels, params, ok, rows in loader:
        x = pixels.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = teacher(x)
        vals, idx = logits.float().topk(k, dim=-1)
        r = rows.numpy()
        items, vs = r // views, r % views
        arrays["params"][items, vs] = params.numpy()
        arrays["logits"][items, vs] = vals.cpu().numpy().astype(np.float16)
        arrays["indices"][items, vs] = idx.cpu().numpy()
        arrays["valid"][items, vs] = ok.numpy()
        done = int(r[-1]) + 1
        if reporter is not None:
            reporter.update("teacher cache", done, {})
        if time.perf_counter() - last >= flush_every_s:
            flush(done)
            last = time.perf_counter()
    seconds = time.perf_counter() - t0
    flush(done)
    valid = np.asarray(arrays["valid"])
    if not valid.any():
        raise DatasetError(f"none of the {n} transfer images could be decoded for the teacher cache")
    info = {
        "version": FORMAT_VERSION,
        "num_items": n,
        "views": views,
        "topk": k,
        "num_classes": num_classes,
        "seed": seed,
        "augment": _augment_dict(augment),
        "invalid_views": int((~valid).sum()),
        "build_seconds": round(seconds, 2),
        "build_views_per_s": round((total - start) / max(seconds, 1e-9), 1),
        "resumed_from": start,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(meta or {}),
    }
    arrays.clear()  # drop the memmaps before the directory moves
    atomic_write_json(tmp / "cache.json", info)
    progress_file.unlink(missing_ok=True)
    if reporter is not None:
        reporter.finish("teacher cache")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info(
        "teacher cache: %d views of %d images in %.1f s (%.0f views/s) -> %s",
        total,
        n,
        seconds,
        info["build_views_per_s"],
        out,
    )
    return TeacherCache.open(out)


def module_sha256(module: nn.Module) -> str:
    """A digest of a module's parameters and buffers (names, shapes, dtypes and bytes): the cache
    key of a teacher that has no checkpoint file (a pretrained backbone built from its spec)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def open_or_build(
    root: str | Path,
    teacher_checkpoint: str | Path | None,
    teacher_loader: Any,
    dataset: ImageDataset,
    augment: TrainAugment,
    *,
    views: int,
    topk: int,
    seed: int,
    num_classes: int,
    teacher_sha256: str | None = None,
    max_bytes: int | None = None,
    **build: Any,
) -> tuple[TeacherCache, bool]:
    """The cache for this (teacher, transfer set, augmentation, views, k, seed) under ``root``:
    opened if it exists, else built. ``teacher_loader()`` returns the teacher, called only to build.
    The teacher is identified by its checkpoint's bytes, or by ``teacher_sha256`` when it has no
    checkpoint file. Returns (cache, built_now); the cache holds a lease on its entry (eviction
    keeps it) until ``cache.release()``. ``max_bytes``: the store's cap; past it, the least
    recently used caches not in use are deleted (``cache_store.evict``) once this one is ready."""
    if teacher_sha256 is None:
        if teacher_checkpoint is None:
            raise ValueError("open_or_build needs the teacher's checkpoint or its teacher_sha256")
        teacher_sha256 = file_sha256(teacher_checkpoint)
    key = cache_key(teacher_sha256, dataset, augment, views=views, topk=topk, seed=seed)
    path = Path(root) / key
    with cache_store.exclusive(root, key):
        built = not (path / "cache.json").exists()
        if built:
            _build(
                path,
                key,
                teacher_checkpoint,
                teacher_sha256,
                teacher_loader,
                dataset,
                augment,
                views=views,
                topk=topk,
                seed=seed,
                num_classes=num_classes,
                **build,
            )
        cache = TeacherCache.open(path)
        cache.lease = cache_store.Lease.take(root, key)
        cache_store.touch(path)
    if not built:
        log.info("teacher cache: reusing %s (%d images x %d views)", path, cache.num_items, cache.views)
    cache_store.evict(root, max_bytes)
    return cache, built


def _build(
    path: Path,
    key: str,
    teacher_checkpoint: str | Path | None,
    teacher_sha256: str,
    teacher_loader: Any,
    dataset: ImageDataset,
    augment: TrainAugment,
    **build: Any,
) -> None:
    meta = {
        "key": key,
        "teacher_checkpoint": str(teacher_checkpoint or teacher_sha256),
        "transfer": dataset.name,
    }
    build_teacher_cache(teacher_loader(), dataset, augment, path, meta=meta, **build)
