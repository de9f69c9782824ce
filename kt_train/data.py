"""Labeled and unlabeled image datasets from folders, zips, tar shards and manifests.

Every source is reduced to the same two pieces: one or more ``ImageStore`` objects that turn a key
into bytes, and a list of ``Item`` records (key, label, optional crop box, which store). Loaders
only decide *which* items exist; decoding, cropping and error handling live in ``ImageDataset`` so
they behave the same for every source.

Stores that keep an open file handle (zip, tar) reopen it when the process id changes, so a
dataset built in the main process can be handed to forked DataLoader workers without sharing one
file offset between processes (which silently returns wrong bytes).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import os
import re
import tarfile
import threading
import zipfile
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as F

from kt_train.errors import DatasetError
from kt_train.transforms import to_rgb

__all__ = [
    "IMAGE_EXTENSIONS",
    "FileStore",
    "FolderStore",
    "ImageDataset",
    "ImageStore",
    "Item",
    "TarStore",
    "ZipStore",
    "is_image_entry",
    "load_labeled",
    "load_unlabeled",
    "parse_brace_pattern",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")
_MAX_SKIP_ATTEMPTS = 64  # bound for "return the next readable item" so a broken dataset fails fast
_MAX_LISTED = 5
_EXIF_ORIENTATION = 0x0112

# Decoding errors PIL and the stores raise for bad or missing bytes. SyntaxError and struct errors
# come out of some PIL plugins on truncated headers; catching them keeps one bad file from killing a run.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    KeyError,
    SyntaxError,
    EOFError,
    IndexError,
    TypeError,
    Image.DecompressionBombError,
)


# --------------------------------------------------------------------------------------------
# entries


def _norm_entry(name: str) -> str:
    """Normalize a relative entry path: forward slashes, no leading './' or '/'."""
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _is_ignored_path(name: str) -> bool:
    """Hidden components ('.DS_Store', '.ipynb_checkpoints/'...) and macOS zip junk are never data."""
    parts = [p for p in _norm_entry(name).split("/") if p]
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def is_image_entry(name: str) -> bool:
    """True for a non-hidden file name with an image extension (case-insensitive)."""
    norm = _norm_entry(name)
    if not norm or norm.endswith("/") or _is_ignored_path(norm):
        return False
    return os.path.splitext(norm)[1].lower() in IMAGE_EXTENSIONS


def _listing(items: Sequence[str], total: int | None = None) -> str:
    total = len(items) if total is None else total
    shown = ", ".join(repr(x) for x in items[:_MAX_LISTED])
    more = f" (and {total - _MAX_LISTED} more)" if total > _MAX_LISTED else ""
    return shown + more


# --------------------------------------------------------------------------------------------
# stores


class ImageStore(ABC):
    """Maps an entry key to raw bytes; one per folder, archive, shard or manifest."""

    @abstractmethod
    def read(self, key: str) -> bytes:
        """The raw file bytes of ``key`` (raises OSError/KeyError if it cannot be read)."""

    @abstractmethod
    def describe(self, key: str) -> str:
        """A path a human can find, for error messages, e.g. 'data.zip:Forest/Forest_1.jpg'."""

    @abstractmethod
    def keys(self) -> list[str]:
        """All image entries, sorted, hidden and junk entries excluded."""


class FolderStore(ImageStore):
    """A directory tree; keys are '/'-separated paths relative to ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._keys: list[str] | None = None
        self._dirs: set[str] | None = None

    def __repr__(self) -> str:
        return f"FolderStore({str(self.root)!r})"

    def _scan(self) -> None:
        keys: list[str] = []
        dirs: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            rel_dir = "" if rel_dir == "." else rel_dir
            # prune in place so os.walk never descends into hidden/junk trees
            dirnames[:] = sorted(d for d in dirnames if not _is_ignored_path(d))
            for d in dirnames:
                dirs.add(f"{rel_dir}/{d}" if rel_dir else d)
            for f in filenames:
                rel = f"{rel_dir}/{f}" if rel_dir else f
                if is_image_entry(rel):
                    keys.append(rel)
        self._keys = sorted(keys)
        self._dirs = dirs

    def keys(self) -> list[str]:
        if self._keys is None:
            self._scan()
        assert self._keys is not None
        return list(self._keys)

    def dirs(self) -> set[str]:
        """Every non-hidden directory (relative), including ones without images."""
        if self._dirs is None:
            self._scan()
        assert self._dirs is not None
        return set(self._dirs)

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def describe(self, key: str) -> str:
        return str(self.root / key)


class _PerProcessHandle:
    """Mixin: a lazily opened handle that is reopened after fork and dropped when pickled."""

    _handle: Any
    _pid: int | None
    _lock: threading.Lock

    def _init_handle(self) -> None:
        self._handle = None
        self._pid = None
        self._lock = threading.Lock()

    def _open(self) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def _get_handle(self) -> Any:
        pid = os.getpid()
        if self._handle is None or self._pid != pid:
            # After fork the inherited handle shares its file offset with the parent; never close
            # it here (that would also be the parent's), just stop using it.
            self._handle = self._open()
            self._pid = pid
        return self._handle

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None
        self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_pid"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class ZipStore(_PerProcessHandle, ImageStore):
    """A zip archive; keys are normalized member names."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._init_handle()
        self._names: dict[str, str] | None = None  # normalized name -> name as stored in the zip
        self._dirs: set[str] | None = None

    def __repr__(self) -> str:
        return f"ZipStore({str(self.path)!r})"

    def _open(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as e:
            raise DatasetError(
                f"{self.path} is not a valid zip file ({e}); re-create the archive or extract it and pass the folder"
            ) from e

    def _scan(self) -> None:
        with self._lock:
            infos = self._get_handle().infolist()
        names: dict[str, str] = {}
        dirs: set[str] = set()
        for info in infos:
            norm = _norm_entry(info.filename)
            if not norm or _is_ignored_path(norm):
                continue
            parts = norm.rstrip("/").split("/")
            # zips often omit explicit directory entries: derive parents from file paths too
            for k in range(1, len(parts)):
                dirs.add("/".join(parts[:k]))
            if info.is_dir() or norm.endswith("/"):
                dirs.add(norm.rstrip("/"))
            elif is_image_entry(norm):
                names[norm] = info.filename
        self._names = dict(sorted(names.items()))
        self._dirs = dirs

    def keys(self) -> list[str]:
        if self._names is None:
            self._scan()
        assert self._names is not None
        return list(self._names)

    def dirs(self) -> set[str]:
        if self._dirs is None:
            self._scan()
        assert self._dirs is not None
        return set(self._dirs)

    def read(self, key: str) -> bytes:
        if self._names is None:
            self._scan()
        assert self._names is not None
        member = self._names.get(key, key)
        with self._lock:
            return self._get_handle().read(member)

    def describe(self, key: str) -> str:
        return f"{self.path}:{key}"


class TarStore(_PerProcessHandle, ImageStore):
    """An uncompressed tar (e.g. a webdataset shard); members are indexed once, then read by offset.

    Reading by offset from a plain file handle avoids tarfile's sequential-access costs and
    makes random access (shuffled epochs) cheap.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._init_handle()
        self._index: dict[str, tuple[int, int]] = self._build_index()

    def __repr__(self) -> str:
        return f"TarStore({str(self.path)!r})"

    def _build_index(self) -> dict[str, tuple[int, int]]:
        index: dict[str, tuple[int, int]] = {}
        try:
            with tarfile.open(self.path, mode="r:") as tf:
                for m in tf:
                    if m.isfile() and is_image_entry(m.name):
                        index[_norm_entry(m.name)] = (m.offset_data, m.size)
        except tarfile.ReadError as e:
            raise DatasetError(
                f"{self.path} is not an uncompressed tar file ({e}); shards must be plain .tar "
                f"(decompress .tar.gz shards first, e.g. with 'gunzip')"
            ) from e
        except OSError as e:
            raise DatasetError(f"cannot read tar shard {self.path} ({e}); check that the file exists") from e
        return dict(sorted(index.items()))

    def _open(self) -> IO[bytes]:
        return open(self.path, "rb")  # long-lived handle, closed in close()

    def keys(self) -> list[str]:
        return list(self._index)

    def read(self, key: str) -> bytes:
        offset, size = self._index[key]
        with self._lock:
            fh = self._get_handle()
            fh.seek(offset)
            data = fh.read(size)
        if len(data) != size:
            raise OSError(f"truncated tar member: expected {size} bytes, got {len(data)}")
        return data

    def describe(self, key: str) -> str:
        return f"{self.path}:{key}"


class FileStore(ImageStore):
    """Individual files named by a manifest: absolute paths, or relative to ``base_dir``."""

    def __init__(self, base_dir: str | Path, keys: Iterable[str] = ()) -> None:
        self.base_dir = Path(base_dir)
        self._keys = list(keys)

    def __repr__(self) -> str:
        return f"FileStore({str(self.base_dir)!r}, {len(self._keys)} keys)"

    def resolve(self, key: str) -> Path:
        p = Path(key).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def keys(self) -> list[str]:
        return list(self._keys)

    def read(self, key: str) -> bytes:
        return self.resolve(key).read_bytes()

    def describe(self, key: str) -> str:
        return str(self.resolve(key))


# --------------------------------------------------------------------------------------------
# dataset


@dataclass(frozen=True)
class Item:
    """One image entry. ``key`` is what the store needs; ``shard`` selects the store."""

    key: str
    label: int = -1
    box: tuple[float, float, float, float] | None = None
    shard: int = 0


class _BadImage(Exception):
    """Internal: the image at an index could not be read/decoded (reason in args[0])."""


class ImageDataset(torch.utils.data.Dataset):
    """Decodes items to RGB, applies the optional crop box, then the transform.

    Returns ``(pixels, label, index)``: the index is the item actually returned (it differs from
    the requested one when an unreadable image was skipped), so per-item caches such as stored
    teacher outputs stay aligned with the pixels.
    """

    def __init__(
        self,
        stores: list[ImageStore],
        items: list[Item],
        classes: list[str] | None,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        name: str = "",
    ) -> None:
        self.stores = list(stores)
        self.items = list(items)
        self.classes = list(classes) if classes is not None else None
        self.transform = transform
        self.name = name
        # (described path, reason). Filled by cache_in_memory and by __getitem__; note that with
        # DataLoader workers the latter happens inside each worker's copy of the dataset.
        self.bad: list[tuple[str, str]] = []
        self._bad_index: set[int] = set()
        self._warned: set[str] = set()
        self._cache: list[Image.Image] | None = None
        for it in self.items:
            if not 0 <= it.shard < len(self.stores):
                raise ValueError(
                    f"item {it.key!r} refers to store {it.shard}, but there are {len(self.stores)}"
                )

    def __repr__(self) -> str:
        ncls = len(self.classes) if self.classes is not None else "unlabeled"
        return f"ImageDataset(name={self.name!r}, items={len(self.items)}, classes={ncls})"

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, i: int) -> str:
        it = self.items[i]
        return self.stores[it.shard].describe(it.key)

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        """A view of items ``indices`` (in that order), sharing the stores and decoded images."""
        view = copy.copy(self)
        view.items = [self.items[i] for i in indices]
        view._cache = [self._cache[i] for i in indices] if self._cache is not None else None
        view.bad, view._bad_index, view._warned = [], set(), set()
        return view

    # -- decoding ------------------------------------------------------------------------------

    def _decode(self, i: int) -> Image.Image:
        it = self.items[i]
        try:
            data = self.stores[it.shard].read(it.key)
        except _DECODE_ERRORS as e:
            raise _BadImage(f"cannot read file: {type(e).__name__}: {e}") from e
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                img: Image.Image = im
                # Photos carry their orientation in EXIF; users (and box annotation tools) see the
                # rotated image, so train on that too. Checked first: exif_transpose always copies.
                if im.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1):
                    img = ImageOps.exif_transpose(im)
                img = to_rgb(img)
        except _DECODE_ERRORS as e:
            raise _BadImage(f"cannot decode image: {type(e).__name__}: {e}") from e
        if it.box is not None:
            img = _crop_box(img, it.box)
        return img

    def load_image(self, i: int) -> Image.Image:
        """The decoded RGB image of item ``i`` with its crop box applied; DatasetError if unreadable."""
        if self._cache is not None:
            return self._cache[i]
        try:
            return self._decode(i)
        except _BadImage as e:
            raise DatasetError(
                f"unreadable image {self.describe(i)}: {e.args[0]}; replace or remove the file"
            ) from e

    def _to_tensor(self, img: Image.Image) -> torch.Tensor:
        if self.transform is not None:
            return self.transform(img)
        return F.pil_to_tensor(img)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        n = len(self.items)
        if n == 0:
            raise IndexError("dataset is empty")
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for dataset of {n} items")
        if self._cache is not None:
            return self._to_tensor(self._cache[i]), self.items[i].label, i
        j = i
        for _ in range(min(n, _MAX_SKIP_ATTEMPTS)):
            if j not in self._bad_index:
                try:
                    img = self._decode(j)
                except _BadImage as e:
                    self._record_bad(j, e.args[0])
                else:
                    return self._to_tensor(img), self.items[j].label, j
            j = (j + 1) % n
        raise DatasetError(
            f"no readable image among {min(n, _MAX_SKIP_ATTEMPTS)} consecutive items starting at "
            f"{self.describe(i)} in {self.name or 'the dataset'}; first problems: "
            f"{_listing([f'{p} ({r})' for p, r in self.bad])}; check that the files are valid images"
        )

    def _record_bad(self, i: int, reason: str) -> None:
        path = self.describe(i)
        self._bad_index.add(i)
        if path not in self._warned:
            self._warned.add(path)
            self.bad.append((path, reason))
            log.warning("skipping unreadable image %s: %s", path, reason)

    # -- caching -------------------------------------------------------------------------------

    def cache_in_memory(self, progress: bool = False, max_bytes: int | None = None) -> bool:
        """Decode every image once and keep it; unreadable images are recorded in ``bad`` and dropped.

        Decoding is the bottleneck of small-image training; PIL releases the GIL while decoding,
        so a thread pool gives real parallelism without pickling images between processes.
        Images are decoded in chunks; when the decoded pixels would pass ``max_bytes`` the cache is
        given up (images are then decoded on every use) and False is returned.
        """
        n = len(self.items)
        if self._cache is not None:
            return True
        workers = max(1, min(8, os.cpu_count() or 1))
        step = max(1, n // 10)
        chunk = 2048

        def decode(i: int) -> Image.Image | str:
            try:
                return self._decode(i)
            except _BadImage as e:
                return e.args[0]

        results: list[Image.Image | str] = []
        used = 0
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kt-decode") as pool:
            for lo in range(0, n, chunk):
                for res in pool.map(decode, range(lo, min(n, lo + chunk))):
                    results.append(res)
                    if not isinstance(res, str):
                        used += res.width * res.height * len(res.getbands())
                    k = len(results)
                    if progress and (k % step == 0 or k == n):
                        log.info("caching %s: %d/%d images decoded", self.name or "dataset", k, n)
                if max_bytes is not None and used > max_bytes:
                    log.warning(
                        "not caching %s in memory: its decoded images pass %.1f GB after %d of %d "
                        "(data.cache_max_gb); they are decoded on every use instead",
                        self.name or "the dataset",
                        max_bytes / 1e9,
                        len(results),
                        n,
                    )
                    return False

        keep_items: list[Item] = []
        cache: list[Image.Image] = []
        new_bad: list[tuple[str, str]] = []
        for i, res in enumerate(results):
            if isinstance(res, str):
                entry = (self.describe(i), res)
                new_bad.append(entry)
                if entry[0] not in self._warned:
                    self._warned.add(entry[0])
                    self.bad.append(entry)
            else:
                keep_items.append(self.items[i])
                cache.append(res)
        if new_bad:
            log.warning(
                "skipped %d unreadable images in %s: %s",
                len(new_bad),
                self.name or "dataset",
                _listing([f"{p} ({r})" for p, r in new_bad]),
            )
        if not keep_items:
            raise DatasetError(
                f"none of the {n} images in {self.name or 'the dataset'} could be decoded "
                f"(e.g. {_listing([p for p, _ in new_bad])}); check that the files are valid images"
            )
        self.items = keep_items
        self._cache = cache
        self._bad_index = set()
        return True

    @property
    def cached(self) -> bool:
        return self._cache is not None

    def class_counts(self) -> dict[str, int]:
        """Images per class name, in class order (classes without images included as 0)."""
        if self.classes is None:
            return {}
        counts = Counter(it.label for it in self.items)
        return {c: counts.get(k, 0) for k, c in enumerate(self.classes)}


def _crop_box(img: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    x0, y0, x1, y1 = box
    left = max(0, math.floor(x0))
    top = max(0, math.floor(y0))
    right = min(img.width, math.ceil(x1))
    bottom = min(img.height, math.ceil(y1))
    if right <= left or bottom <= top:
        raise _BadImage(f"crop box {tuple(box)} lies outside the {img.width}x{img.height} image")
    return img.crop((left, top, right, bottom))


# --------------------------------------------------------------------------------------------
# brace patterns, splits, manifests

_BRACE = re.compile(r"\{([^{}]*)\}")


def parse_brace_pattern(s: str) -> list[str]:
    """Expand webdataset-style shard patterns: 'a-{000..002}.tar' -> a-000.tar, a-001.tar, a-002.tar.

    Ranges keep zero padding (width of the padded bound); comma lists '{a,b}' and several groups
    (expanded left to right) are supported. A string without braces expands to itself.
    """
    m = _BRACE.search(s)
    if m is None:
        return [s]
    body = m.group(1)
    head, tail = s[: m.start()], s[m.end() :]
    rng = re.fullmatch(r"\s*(\d+)\s*\.\.\s*(\d+)\s*", body)
    if rng:
        lo_s, hi_s = rng.group(1), rng.group(2)
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise DatasetError(f"brace range {{{body}}} in {s!r} is reversed; write it as {{{hi_s}..{lo_s}}}")
        padded = (len(lo_s) > 1 and lo_s.startswith("0")) or (len(hi_s) > 1 and hi_s.startswith("0"))
        width = max(len(lo_s), len(hi_s)) if padded else 0
        choices = [str(v).zfill(width) for v in range(lo, hi + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise DatasetError(
            f"cannot expand brace group {{{body}}} in {s!r}; use a numeric range like {{00000..00009}} "
            f"or a list like {{a,b}}"
        )
    return [head + c + rest for c in choices for rest in parse_brace_pattern(tail)]


def _read_split(split: str | Path) -> list[str]:
    p = Path(split)
    if not p.is_file():
        raise DatasetError(
            f"split file {p} does not exist; pass the path of a text file with one entry per line"
        )
    entries: list[str] = []
    with p.open(encoding="utf-8-sig") as fh:
        for k, raw in enumerate(fh):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if k == 0 and line.lower() in ("path", "path,label"):
                continue  # tolerate a CSV header
            entries.append(line)
    return entries


def _apply_split(
    items: list[Item],
    names: list[str],
    split: str | Path,
    source: Path | str,
    alt_names: list[str] | None = None,
) -> list[Item]:
    """Keep the items listed in ``split``, in the split's order.

    ``names[i]`` is the entry name of ``items[i]`` as a user would write it (relative path);
    ``alt_names`` are accepted too when they do not clash (e.g. the full path inside a zip that
    wraps its classes in one directory). A line may be 'path' or 'path,label'; the label part is
    ignored because the source decides.
    """
    by_name: dict[str, list[int]] = {}
    for i, nm in enumerate(names):
        by_name.setdefault(_norm_entry(nm), []).append(i)
    for i, nm in enumerate(alt_names or ()):
        by_name.setdefault(_norm_entry(nm), [i])
    out: list[Item] = []
    missing: list[str] = []
    for line in _read_split(split):
        entry = _norm_entry(line)
        if entry not in by_name and "," in entry:
            entry = _norm_entry(entry.rsplit(",", 1)[0])
        idx = by_name.get(entry)
        if idx is None:
            missing.append(line)
            continue
        out.extend(items[i] for i in idx)
    if missing:
        raise DatasetError(
            f"{len(missing)} entries of split file {split} are not in {source}: {_listing(missing)}; "
            f"fix the split file or the dataset (entries are paths relative to the dataset root, e.g. 'cat/001.jpg')"
        )
    if not out:
        raise DatasetError(f"split file {split} lists no entries; add one relative image path per line")
    return out


@dataclass
class _Row:
    path: str
    label: str | None
    box: tuple[float, float, float, float] | None
    where: str  # "file:line" for error messages


def _parse_box(values: Sequence[Any], where: str) -> tuple[float, float, float, float] | None:
    if all(v is None or (isinstance(v, str) and not v.strip()) for v in values):
        return None
    try:
        if len(values) != 4:
            raise ValueError("expected 4 numbers")
        x0, y0, x1, y1 = (float(v) for v in values)
    except (TypeError, ValueError) as e:
        raise DatasetError(
            f"{where}: invalid box {list(values)!r} ({e}); give four pixel coordinates x0,y0,x1,y1"
        ) from e
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise DatasetError(
            f"{where}: invalid box {[x0, y0, x1, y1]}; boxes are x0,y0,x1,y1 in pixels with x1 > x0 and y1 > y0"
        )
    return (x0, y0, x1, y1)


def _read_manifest(path: Path, need_label: bool) -> list[_Row]:
    rows: list[_Row] = []
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            required = ["path", "label"] if need_label else ["path"]
            lacking = [c for c in required if c not in header]
            if lacking:
                raise DatasetError(
                    f"manifest {path} has no {', '.join(repr(c) for c in lacking)} column (header: {header}); "
                    f"the first line must be a header like 'path,label' (optional box columns x0,y0,x1,y1)"
                )
            box_cols = [c for c in ("x0", "y0", "x1", "y1") if c in header]
            if box_cols and len(box_cols) != 4:
                raise DatasetError(
                    f"manifest {path} has box columns {box_cols} but needs all of x0,y0,x1,y1; add the missing ones"
                )
            assert reader.fieldnames is not None
            reader.fieldnames = header
            for line_no, rec in enumerate(reader, start=2):
                where = f"{path}:{line_no}"
                p = (rec.get("path") or "").strip()
                if not p:
                    if not any((v or "").strip() for v in rec.values() if isinstance(v, str)):
                        continue  # blank line
                    raise DatasetError(f"{where}: empty 'path'; every row needs an image path")
                label = (rec.get("label") or "").strip() if "label" in header else None
                if need_label and not label:
                    raise DatasetError(
                        f"{where}: empty 'label' for {p!r}; every row of a labeled manifest needs a label"
                    )
                box = _parse_box([rec.get(c) for c in ("x0", "y0", "x1", "y1")], where) if box_cols else None
                rows.append(_Row(p, label, box, where))
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8-sig") as fh:
            for line_no, raw in enumerate(fh, start=1):
                line = raw.strip()
                if not line:
                    continue
                where = f"{path}:{line_no}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(
                        f"{where}: not valid JSON ({e}); write one JSON object per line"
                    ) from e
                if (
                    not isinstance(obj, dict)
                    or not isinstance(obj.get("path"), str)
                    or not obj["path"].strip()
                ):
                    raise DatasetError(
                        f'{where}: each line must be an object with a "path" string, e.g. {{"path": "a.jpg"}}'
                    )
                raw_label = obj.get("label")
                label = None if raw_label is None else str(raw_label).strip()
                if need_label and not label:
                    raise DatasetError(
                        f'{where}: missing "label" for {obj["path"]!r}; every line of a labeled manifest needs one'
                    )
                raw_box = obj.get("box")
                if raw_box is not None and not isinstance(raw_box, list):
                    raise DatasetError(
                        f'{where}: "box" must be a list [x0, y0, x1, y1] or null, got {raw_box!r}'
                    )
                box = _parse_box(raw_box, where) if raw_box is not None else None
                rows.append(_Row(obj["path"].strip(), label, box, where))
    else:  # pragma: no cover - callers check the suffix
        raise DatasetError(f"{path}: unsupported manifest type; use .csv or .jsonl")
    if not rows:
        raise DatasetError(f"manifest {path} lists no images; add rows with an image 'path'")
    return rows


def _manifest_source(
    path: Path, root: str | Path | None, need_label: bool
) -> tuple[FileStore, list[_Row], list[str]]:
    rows = _read_manifest(path, need_label)
    base = Path(root) if root is not None else path.parent
    if root is not None and not base.is_dir():
        raise DatasetError(
            f"root {base} does not exist; pass the directory that manifest paths are relative to"
        )
    store = FileStore(base, [r.path for r in rows])
    missing = [f"{store.resolve(r.path)} ({r.where})" for r in rows if not store.resolve(r.path).is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} images listed in manifest {path} do not exist: {_listing(missing)}; "
            f"fix the paths (relative paths are resolved against {base}; pass root= to change that)"
        )
    return store, rows, [r.path for r in rows]


def _source_rows(path: Path) -> list[tuple[str, str, tuple[float, float, float, float] | None]] | None:
    """(source, key, box) rows of a transfer-set manifest (columns source + key, as ``kt curate``
    writes them: items inside zips, folders or tar shards); None when the manifest has no such columns."""
    suffix = path.suffix.lower()
    records: list[dict[str, Any]]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if not {"source", "key"} <= set(table.column_names):
            raise DatasetError(
                f"manifest {path} has no 'source' and 'key' columns (has {table.column_names}); "
                f"parquet manifests are transfer sets written by 'kt curate'"
            )
        records = table.to_pylist()
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8-sig") as fh:
            first = next((ln for ln in fh if ln.strip()), "")
        try:
            head = json.loads(first) if first else {}
        except json.JSONDecodeError:
            return None
        if not (isinstance(head, dict) and "source" in head and "key" in head):
            return None
        records = [json.loads(ln) for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    elif suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            if not {"source", "key"} <= {h.strip().lower() for h in (reader.fieldnames or [])}:
                return None
            records = []
            from .curate import csv_unescape  # the quote write_manifest puts before formula-like cells

            for rec in reader:
                corners = [rec.get(c) for c in ("x0", "y0", "x1", "y1")]
                rec = {k: csv_unescape(v) if isinstance(v, str) else v for k, v in rec.items()}
                records.append({**rec, "box": corners if all(corners) else None})
    else:
        return None
    out = []
    for i, rec in enumerate(records, start=1):
        where = f"{path}:{i}"
        src, key = rec.get("source"), rec.get("key")
        if not src or not key:
            raise DatasetError(f"{where}: every row needs a 'source' and a 'key' (got {src!r}, {key!r})")
        raw_box = rec.get("box")
        out.append((str(src), str(key), _parse_box(raw_box, where) if raw_box is not None else None))
    if not out:
        raise DatasetError(f"manifest {path} lists no images; curate a non-empty transfer set")
    return out


def _store_for_source(src: Path, where: Path) -> ImageStore:
    if src.is_dir():
        return FolderStore(src)
    if src.suffix.lower() == ".zip" and src.is_file():
        return ZipStore(src)
    if src.suffix.lower() == ".tar" and src.is_file():
        return TarStore(src)
    raise DatasetError(
        f"manifest {where} refers to source {src}, which is not an existing folder, .zip or .tar; "
        f"move the gallery images back or re-curate against the gallery's new location"
    )


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise DatasetError(
            f"dataset path {path} does not exist; check the path (relative paths start at {Path.cwd()})"
        )


# --------------------------------------------------------------------------------------------
# labeled


def _class_root(store: FolderStore | ZipStore) -> str:
    """The prefix under which class directories live ('' or one wrapping directory + '/').

    Zips made by right-clicking a folder wrap everything in one top-level directory; descend into
    it when it holds only directories (the classes) rather than images.
    """
    dirs = store.dirs()
    keys = store.keys()
    top_dirs = {d.split("/", 1)[0] for d in dirs}
    top_files = [k for k in keys if "/" not in k]
    if len(top_dirs) == 1 and not top_files:
        (top,) = top_dirs
        has_subdirs = any(d.startswith(top + "/") for d in dirs)
        direct_images = [k for k in keys if k.startswith(top + "/") and "/" not in k[len(top) + 1 :]]
        if has_subdirs and not direct_images:
            return top + "/"
    return ""


def _imagefolder_source(
    path: Path, store: FolderStore | ZipStore, classes: list[str] | None
) -> tuple[list[Item], list[str], list[str]]:
    prefix = _class_root(store)
    class_dirs = sorted(
        d[len(prefix) :]
        for d in store.dirs()
        if d.startswith(prefix) and "/" not in d[len(prefix) :] and d != prefix
    )
    per_class: dict[str, list[str]] = {c: [] for c in class_dirs}
    loose: list[str] = []
    all_keys = store.keys()
    for key in all_keys:
        if not key.startswith(prefix):
            continue
        rel = key[len(prefix) :]
        if "/" not in rel:
            loose.append(rel)
            continue
        per_class.setdefault(rel.split("/", 1)[0], []).append(key)
    sep = "/" if isinstance(store, FolderStore) else ":"
    where = f"{path}{sep}{prefix.rstrip('/')}" if prefix else str(path)
    if not per_class:
        if loose:
            raise DatasetError(
                f"{where} has images but no class folders; put each class's images in <root>/<class name>/ "
                f"(or load it with load_unlabeled)"
            )
        raise DatasetError(
            f"no images found in {where}; expected <class name>/<image> entries ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    if loose:
        log.warning("ignoring %d images outside class folders in %s: %s", len(loose), where, _listing(loose))
    for c, keys in per_class.items():
        if not keys:
            raise DatasetError(f"class {c!r} has no images in {where}; add images or remove the folder")
    names = sorted(per_class)
    order = _class_order(names, classes, str(where))
    items: list[Item] = []
    entry_names: list[str] = []
    for c in names:
        for key in per_class[c]:
            items.append(Item(key=key, label=order[c]))
            entry_names.append(key[len(prefix) :])
    return items, entry_names, list(classes) if classes is not None else names


def _class_order(found: Iterable[str], classes: list[str] | None, where: str) -> dict[str, int]:
    if classes is None:
        return {c: k for k, c in enumerate(sorted(set(found)))}
    if len(set(classes)) != len(classes):
        dup = sorted(c for c, n in Counter(classes).items() if n > 1)
        raise DatasetError(f"the given class list repeats {_listing(dup)}; each class name must appear once")
    index = {c: k for k, c in enumerate(classes)}
    unknown = sorted(set(found) - set(index))
    if unknown:
        raise DatasetError(
            f"{where} has labels that are not in the given classes: {_listing(unknown)}; "
            f"known classes are {_listing(list(classes), len(classes))}. Rename them or drop those images"
        )
    return index


def load_labeled(
    path: str | Path,
    *,
    split: str | Path | None = None,
    root: str | Path | None = None,
    classes: list[str] | None = None,
) -> ImageDataset:
    """Load a labeled dataset: ImageFolder directory or .zip, or a .csv/.jsonl manifest.

    ``classes`` fixes the label order (e.g. the teacher's); without it classes are sorted by name.
    ``split`` keeps only the listed entries, in the file's order. ``root`` is where relative
    manifest paths start (default: the manifest's directory).
    """
    path = Path(path).expanduser()
    _check_exists(path)
    stores: list[ImageStore]
    if path.is_dir() or path.suffix.lower() == ".zip":
        store: FolderStore | ZipStore = FolderStore(path) if path.is_dir() else ZipStore(path)
        items, names, class_list = _imagefolder_source(path, store, classes)
        alt_names = [it.key for it in items]
        stores = [store]
    elif path.suffix.lower() in _MANIFEST_SUFFIXES:
        fstore, rows, names = _manifest_source(path, root, need_label=True)
        order = _class_order((r.label for r in rows if r.label is not None), classes, f"manifest {path}")
        class_list = list(classes) if classes is not None else sorted(order, key=order.__getitem__)
        items = [Item(key=r.path, label=order[r.label or ""], box=r.box) for r in rows]
        alt_names = None
        stores = [fstore]
    else:
        raise DatasetError(
            f"cannot load labeled data from {path}: expected a directory of class folders, a .zip, "
            f"or a .csv/.jsonl manifest"
        )
    if split is not None:
        items = _apply_split(items, names, split, path, alt_names)
    return ImageDataset(stores, items, class_list, name=str(path))


# --------------------------------------------------------------------------------------------
# unlabeled


def _expand_sources(path: str | Path | Sequence[str | Path]) -> list[Path]:
    raw = [path] if isinstance(path, (str, Path)) else list(path)
    if not raw:
        raise DatasetError("no dataset paths given; pass a directory, .zip, .tar shard(s) or a manifest")
    out: list[Path] = []
    for p in raw:
        s = str(p)
        if _BRACE.search(s):
            expanded = [Path(x).expanduser() for x in parse_brace_pattern(s)]
            missing = [str(x) for x in expanded if not x.exists()]
            if missing:
                raise DatasetError(
                    f"{len(missing)} of {len(expanded)} shards of {s} do not exist: {_listing(missing)}; "
                    f"fix the pattern's range"
                )
            out.extend(expanded)
        else:
            out.append(Path(s).expanduser())
    return out


def _plain_entries(store: ImageStore) -> list[tuple[str, str, None]]:
    """(key, split name, no box) for every image of a store whose keys are already user-facing names."""
    return [(k, k, None) for k in store.keys()]  # noqa: SIM118 - ImageStore.keys() is not a dict


def _tar_shards_in(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and p.suffix.lower() == ".tar" and not p.name.startswith(".")
    )


def load_unlabeled(
    path: str | Path | Sequence[str | Path],
    *,
    split: str | Path | None = None,
    root: str | Path | None = None,
) -> ImageDataset:
    """Load unlabeled images (label -1) from folders, zips, tar shards or manifests.

    ``path`` may be a directory (recursive; or a directory holding only .tar shards), a .zip, a
    .tar, a brace pattern like 'shards-{00000..00009}.tar', a .csv/.jsonl manifest, a single image,
    or a list of any of these (concatenated). Split entries are relative paths, or member names
    for tar shards.
    """
    sources = _expand_sources(path)
    stores: list[ImageStore] = []
    items: list[Item] = []
    names: list[str] = []

    def add(
        store: ImageStore, entries: Sequence[tuple[str, str, tuple[float, float, float, float] | None]]
    ) -> None:
        shard = len(stores)
        stores.append(store)
        for key, name, box in entries:
            items.append(Item(key=key, label=-1, box=box, shard=shard))
            names.append(name)

    for src in sources:
        _check_exists(src)
        suffix = src.suffix.lower()
        if src.is_dir():
            folder = FolderStore(src)
            keys = folder.keys()
            shards = _tar_shards_in(src)
            if keys:
                if shards:
                    log.warning(
                        "%s: using its %d images and ignoring %d .tar files in it",
                        src,
                        len(keys),
                        len(shards),
                    )
                add(folder, _plain_entries(folder))
            elif shards:
                for shard in shards:
                    tar = TarStore(shard)
                    add(tar, _plain_entries(tar))
            else:
                raise DatasetError(
                    f"no images found in {src}; expected image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) or .tar shards"
                )
        elif suffix == ".zip":
            zstore = ZipStore(src)
            add(zstore, _plain_entries(zstore))
        elif suffix == ".tar":
            tar = TarStore(src)
            add(tar, _plain_entries(tar))
        elif suffix in _MANIFEST_SUFFIXES and (source_rows := _source_rows(src)) is not None:
            by_source: dict[str, list[tuple[str, str, tuple[float, float, float, float] | None]]] = {}
            for source, key, box in source_rows:
                by_source.setdefault(source, []).append((key, f"{source}::{key}", box))
            for source, entries in by_source.items():
                sp = Path(source)
                if not sp.is_absolute():
                    sp = (Path(root) if root is not None else src.parent) / sp
                add(_store_for_source(sp, src), entries)
        elif suffix in _MANIFEST_SUFFIXES:
            fstore, rows, _ = _manifest_source(src, root, need_label=False)
            add(fstore, [(r.path, r.path, r.box) for r in rows])
        elif is_image_entry(src.name):
            add(FileStore(src.parent, [src.name]), [(src.name, src.name, None)])
        else:
            raise DatasetError(
                f"cannot load images from {src}: expected a directory, .zip, .tar, .csv/.jsonl manifest or an image"
            )
    where = ", ".join(str(s) for s in sources[:3]) + (" ..." if len(sources) > 3 else "")
    if not items:
        raise DatasetError(
            f"no images found in {where}; add image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    if split is not None:
        items = _apply_split(items, names, split, where)
    return ImageDataset(stores, items, None, name=where)
