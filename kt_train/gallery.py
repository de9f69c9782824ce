"""Galleries: images + float16 L2-normalized embeddings + parquet metadata + per-shard FAISS indexes.

A gallery is a directory::

    gallery.json                       format, name, encoder, dim, count, sources, shards, index
    shards/shard-00000/embeddings.npy  float16 [n, d], unit-norm rows
    shards/shard-00000/meta.parquet    id, source, key, width, height, url, caption, box
    shards/shard-00000/shard.json      count, id_offset, skipped images
    shards/shard-00000/_SUCCESS
    index/shard-00000.faiss            one index per shard (kt_train.index)
    index/merged.faiss + merged.ivfdata   or one IVF index over all shards, its lists on disk
    listing/shard-00000.parquet        a distributed build's planned listing (gallery_shards)
    _SUCCESS                           the whole gallery is complete

Ids are global and contiguous: ``0 .. count-1``, shard by shard (``id = id_offset + row``).

Building is resumable: the listing is deterministic and cut into shards of ``shard_size`` items,
each shard is embedded and written on its own (``_SUCCESS`` last), and a re-run skips finished
shards. Nothing of a shard is visible as finished before all its files are in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import torch
from PIL import Image

from .data import (
    FileStore,
    FolderStore,
    ImageDataset,
    ImageStore,
    Item,
    TarStore,
    ZipStore,
    load_unlabeled,
)
from .embed import Encoder
from .errors import ConfigError, DatasetError
from .io import SUCCESS, atomic_write, atomic_write_json, atomic_write_text

__all__ = ["DEFAULT_ENCODER", "FORMAT", "Gallery", "build_gallery", "import_embeddings"]

log = logging.getLogger(__name__)

FORMAT = "kt-gallery/1"
DEFAULT_ENCODER = "open_clip:ViT-B-32@laion2b_s34b_b79k"
GALLERY_JSON = "gallery.json"
SHARD_JSON = "shard.json"
EMBEDDINGS = "embeddings.npy"
META = "meta.parquet"
TRAINED_INDEX = "trained.faiss"  # index/: the empty trained IVF index an on-disk index is built from
MERGED_INDEX = "merged.faiss"  # index/: the on-disk index (+ merged.ivfdata)
MAX_SKIPPED_LISTED = 20
_MAX_WARNINGS = 20

SourceArg = str | Path | tuple[str | Path, str | Path | None]
ProgressFn = Callable[[int, int, float], None]


def _meta_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.int64()),
            ("source", pa.string()),
            ("key", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("url", pa.string()),
            ("caption", pa.string()),
            ("box", pa.list_(pa.float32())),
        ]
    )


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read {path} ({e}); the gallery is damaged, rebuild it") from e


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(f: IO[bytes]) -> None:
        np.save(f, arr, allow_pickle=False)

    atomic_write(path, write)


def _save_parquet(path: Path, table: Any) -> None:
    import pyarrow.parquet as pq

    atomic_write(path, lambda f: pq.write_table(table, f))


def _abs(p: str | Path) -> str:
    return os.path.abspath(os.path.expanduser(str(p)))


# --------------------------------------------------------------------------------------------
# listing sources


@dataclass(frozen=True)
class _Source:
    path: str  # absolute (a brace pattern stays a pattern)
    split: str | None


def _normalize_sources(sources: str | Path | Sequence[SourceArg]) -> list[_Source]:
    if isinstance(sources, (str, Path)):
        sources = [sources]
    out: list[_Source] = []
    for s in sources:
        path: str | Path
        split: str | Path | None = None
        if isinstance(s, (tuple, list)):
            if len(s) != 2 or s[0] is None:
                raise ConfigError(f"a gallery source is a path or a (path, split file) pair, got {s!r}")
            path, split = str(s[0]), s[1]
        else:
            path = s
        out.append(_Source(_abs(path), _abs(split) if split is not None else None))
    if not out:
        raise DatasetError("no gallery sources given; pass image folders, .zip files or .tar shards")
    return out


def _store_path(store: ImageStore) -> str:
    if isinstance(store, FolderStore):
        return _abs(store.root)
    if isinstance(store, (ZipStore, TarStore)):
        return _abs(store.path)
    if isinstance(store, FileStore):
        return _abs(store.base_dir)
    raise TypeError(f"unsupported store {store!r}")  # pragma: no cover


def _source_kind(path: str, ds: ImageDataset) -> str:
    if all(isinstance(s, TarStore) for s in ds.stores):
        return "tar"
    if all(isinstance(s, ZipStore) for s in ds.stores):
        return "zip"
    if path.lower().endswith((".csv", ".jsonl")):
        return "manifest"
    if all(isinstance(s, FolderStore) for s in ds.stores):
        return "folder"
    return "image"


def _member_name(name: str) -> str:
    """A tar member name as ``TarStore`` keys it: '/'-separated, no leading './' or '/'."""
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _tar_sidecars(path: Path) -> dict[str, dict[str, str]]:
    """url/caption of each sample of an img2dataset shard, from its <key>.json / <key>.txt members."""
    out: dict[str, dict[str, str]] = {}
    try:
        with tarfile.open(path, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                stem, ext = os.path.splitext(_member_name(m.name))
                ext = ext.lower()
                if ext not in (".json", ".txt") or m.size > 1 << 20:
                    continue
                fh = tf.extractfile(m)
                if fh is None:
                    continue
                text = fh.read().decode("utf-8", errors="replace")
                rec = out.setdefault(stem, {})
                if ext == ".txt":
                    rec.setdefault("caption", text.strip())
                    continue
                try:
                    obj = json.loads(text)
                except ValueError:
                    log.warning("ignoring unparsable sidecar %s:%s", path, m.name)
                    continue
                if isinstance(obj, dict):
                    for field in ("url", "caption"):
                        if isinstance(obj.get(field), str):
                            rec[field] = obj[field]  # the json wins over the .txt caption
    except (tarfile.TarError, OSError) as e:
        raise DatasetError(f"cannot read tar shard {path} ({e}); check that it is a plain .tar file") from e
    return out


class _Listing:
    """Every gallery item in build order, with where it comes from."""

    def __init__(self, sources: list[_Source]) -> None:
        self.sources = sources
        self.datasets: list[ImageDataset] = []
        self.records: list[dict[str, Any]] = []
        ds_index: list[np.ndarray] = []
        item_index: list[np.ndarray] = []
        self.source: list[str] = []
        self.key: list[str] = []
        self.box: list[list[float] | None] = []
        self.url: list[str | None] = []
        self.caption: list[str | None] = []
        for src in sources:
            ds = load_unlabeled(src.path, split=src.split)
            d = len(self.datasets)
            self.datasets.append(ds)
            self.records.append({"path": src.path, "split": src.split, "kind": _source_kind(src.path, ds)})
            store_paths = [_store_path(s) for s in ds.stores]
            sidecars = [_tar_sidecars(s.path) if isinstance(s, TarStore) else {} for s in ds.stores]
            for it in ds.items:
                side = sidecars[it.shard].get(os.path.splitext(it.key)[0], {})
                self.source.append(store_paths[it.shard])
                self.key.append(it.key)
                self.box.append([float(v) for v in it.box] if it.box is not None else None)
                self.url.append(side.get("url"))
                self.caption.append(side.get("caption"))
            ds_index.append(np.full(len(ds.items), d, dtype=np.int32))
            item_index.append(np.arange(len(ds.items), dtype=np.int64))
        self.ds_index = np.concatenate(ds_index)
        self.item_index = np.concatenate(item_index)

    def __len__(self) -> int:
        return len(self.key)

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for src, key, box in zip(self.source, self.key, self.box, strict=True):
            h.update(f"{src}\0{key}\0{box}\n".encode())
        return h.hexdigest()


class _Rows(Protocol):
    """What embedding and writing a shard read of a listing: a ``_Listing``, or the rows of one
    shard read back from a planned build's listing files (``gallery_shards``)."""

    datasets: list[ImageDataset]
    ds_index: np.ndarray
    item_index: np.ndarray
    source: list[str]
    key: list[str]
    box: list[list[float] | None]
    url: list[str | None]
    caption: list[str | None]


class _EmbedDataset(torch.utils.data.Dataset):
    """Position in the listing -> (uint8 pixels | None, position, width, height, error | None).

    Unlike ``ImageDataset.__getitem__`` an unreadable image is reported, not replaced by the next
    readable one: a gallery must hold each image once, and say which ones it left out.
    """

    def __init__(self, listing: _Rows, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.datasets = listing.datasets
        self.ds_index = listing.ds_index
        self.item_index = listing.item_index
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ds_index)

    def __getitem__(self, pos: int) -> tuple[torch.Tensor | None, int, int, int, str | None]:
        ds = self.datasets[int(self.ds_index[pos])]
        try:
            img = ds.load_image(int(self.item_index[pos]))
        except DatasetError as e:
            return None, pos, -1, -1, str(e)
        return self.transform(img), pos, img.width, img.height, None


def _collate(samples: list[tuple[torch.Tensor | None, int, int, int, str | None]]) -> dict[str, Any]:
    good = [s[0] for s in samples if s[0] is not None]
    return {
        "pixels": torch.stack(good) if good else torch.zeros(0, 3, 1, 1, dtype=torch.uint8),
        "pos": [s[1] for s in samples],
        "width": [s[2] for s in samples],
        "height": [s[3] for s in samples],
        "error": [s[4] for s in samples],
    }


# --------------------------------------------------------------------------------------------
# building


def _build_plan(listing: Any, desc: dict[str, Any], shard_size: int) -> dict[str, Any]:
    """What a build is made of (its sources, encoder, shard size and listing), recorded in the
    build dir so a resumed build, one process or many, checks it is the same build."""
    return {
        "sources": listing.records,
        "encoder": desc,
        "shard_size": int(shard_size),
        "listed": len(listing),
        "listing_sha1": listing.fingerprint(),
    }


class _ShardBuffer:
    """Rows of one shard as batches come back, written out when the last position arrives."""

    def __init__(self, k: int, start: int, stop: int, dim: int) -> None:
        self.k, self.start, self.stop = k, start, stop
        self.emb = np.empty((stop - start, dim), dtype=np.float16)
        self.rows = 0
        self.received = 0
        self.positions: list[int] = []
        self.width: list[int] = []
        self.height: list[int] = []
        self.skipped: list[dict[str, str]] = []

    @property
    def complete(self) -> bool:
        return self.received == self.stop - self.start

    def take(self, batch: dict[str, Any], vecs: np.ndarray | None, listing: _Rows) -> tuple[int, list[str]]:
        """Add a batch's rows (``vecs`` holds the readable images' embeddings, in order); returns
        how many were embedded and the errors of the images that could not be read."""
        j, errors = 0, []
        for pos, w, h, err in zip(batch["pos"], batch["width"], batch["height"], batch["error"], strict=True):
            if err is not None:
                self.skipped.append({"source": listing.source[pos], "key": listing.key[pos], "error": err})
                errors.append(err)
                continue
            assert vecs is not None
            self.emb[self.rows] = vecs[j]
            self.rows += 1
            j += 1
            self.positions.append(pos)
            self.width.append(w)
            self.height.append(h)
        self.received += len(batch["pos"])
        return j, errors


class _ShardBatches:
    """Batches of listing positions that never straddle two shards (a batch sampler, built lazily)."""

    def __init__(self, ranges: list[tuple[int, int]], batch_size: int) -> None:
        self.ranges = ranges
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start, stop in self.ranges:
            for a in range(start, stop, self.batch_size):
                yield list(range(a, min(a + self.batch_size, stop)))

    def __len__(self) -> int:
        return sum(math.ceil((stop - start) / self.batch_size) for start, stop in self.ranges)


def _meta_table(ids: np.ndarray, cols: Mapping[str, Sequence[Any]]) -> Any:
    import pyarrow as pa

    n = len(ids)
    schema = _meta_schema()
    arrays = [pa.array(ids, type=pa.int64())]
    for field in schema.names[1:]:
        values = cols.get(field)
        if values is None:
            values = [-1] * n if field in ("width", "height") else [None] * n
        arrays.append(pa.array(values, type=schema.field(field).type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _write_shard(shard_dir: Path, buf: _ShardBuffer, listing: _Rows, id_offset: int) -> dict[str, Any]:
    shard_dir.mkdir(parents=True, exist_ok=True)
    (shard_dir / SUCCESS).unlink(missing_ok=True)
    pos = buf.positions
    _save_npy(shard_dir / EMBEDDINGS, buf.emb[: buf.rows])
    table = _meta_table(
        np.arange(id_offset, id_offset + buf.rows, dtype=np.int64),
        {
            "source": [listing.source[p] for p in pos],
            "key": [listing.key[p] for p in pos],
            "width": buf.width,
            "height": buf.height,
            "url": [listing.url[p] for p in pos],
            "caption": [listing.caption[p] for p in pos],
            "box": [listing.box[p] for p in pos],
        },
    )
    _save_parquet(shard_dir / META, table)
    info = {
        "name": shard_dir.name,
        "count": buf.rows,
        "planned": buf.stop - buf.start,
        "id_offset": id_offset,
        "num_skipped": len(buf.skipped),
        "skipped": buf.skipped[:MAX_SKIPPED_LISTED],
    }
    atomic_write_json(shard_dir / SHARD_JSON, info)
    atomic_write_text(shard_dir / SUCCESS, "")
    return info


def _shard_done(shard_dir: Path) -> dict[str, Any] | None:
    if not (shard_dir / SUCCESS).exists():
        return None
    return _read_json(shard_dir / SHARD_JSON)


_PLAN_WORDS = {
    "listed": "images (the sources' contents changed)",
    "listing_sha1": "images (the sources' contents changed)",
    "files": "embedding files",
    "image_root": "image_root",
}


def _prepare_out_dir(out: Path, plan: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Check ``out`` against the requested build. Returns the existing gallery.json when it is the
    same build (complete or resumable), None when starting fresh; raises when it is another one."""
    gj = out / GALLERY_JSON
    if gj.exists():
        doc = _read_json(gj)
        same = {k: doc.get("plan", {}).get(k) for k in plan} == json.loads(json.dumps(plan))
        if same and not overwrite:
            return doc
        if not overwrite:
            diffs = {
                _PLAN_WORDS.get(k, k)
                for k in plan
                if doc.get("plan", {}).get(k) != json.loads(json.dumps(plan[k]))
            }
            raise DatasetError(
                f"{out} already holds gallery {doc.get('name')!r}, made with other {', '.join(sorted(diffs))}; "
                f"use a new output directory, or pass overwrite=True (kt gallery build --overwrite) to replace it"
            )
        for sub in ("shards", "index", "listing"):  # listing/: a distributed build's (gallery_shards)
            shutil.rmtree(out / sub, ignore_errors=True)
        for f in (SUCCESS, GALLERY_JSON):
            (out / f).unlink(missing_ok=True)
        return None
    if out.exists() and not out.is_dir():
        raise DatasetError(f"gallery output {out} is a file; pass a directory path")
    if out.exists() and any(out.iterdir()):
        raise DatasetError(
            f"{out} exists, is not empty and is not a gallery; pass a new or empty directory "
            f"(nothing is deleted there, even with overwrite)"
        )
    return None


def _base_doc(name: str, plan: dict[str, Any], encoder: dict[str, Any], dim: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "name": name,
        "status": "building",
        "encoder": encoder,
        "dim": dim,
        "count": None,
        "sources": plan["sources"],
        "shards": [],
        "index": None,
        "plan": plan,
    }


def _start(out: Path, doc: dict[str, Any]) -> None:
    """Mark ``out`` as a gallery being built (readers refuse it until _finalize)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / SUCCESS).unlink(missing_ok=True)
    atomic_write_json(out / GALLERY_JSON, doc)


def _finalize(
    out: Path,
    doc: dict[str, Any],
    infos: list[dict[str, Any]],
    *,
    index_kind: str | None,
    memory_budget_bytes: int | None,
    make_index: Callable[[Gallery], None] | None = None,
) -> Gallery:
    """Contiguous ids across shards, the per-shard indexes (or ``make_index``'s), then gallery.json
    'complete' + _SUCCESS."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    offset = 0
    shards = []
    for info in infos:
        shard_dir = out / "shards" / info["name"]
        if info["id_offset"] != offset:
            # An earlier shard came out with another count than when this one was written (it was
            # deleted and rebuilt); renumber so that ids stay 0..count-1.
            table = pq.read_table(shard_dir / META)
            ids = pa.array(np.arange(offset, offset + info["count"], dtype=np.int64))
            _save_parquet(shard_dir / META, table.set_column(0, "id", ids))
            info = {**info, "id_offset": offset}
            atomic_write_json(shard_dir / SHARD_JSON, info)
        if info["count"]:
            shards.append({"name": info["name"], "count": info["count"], "id_offset": offset})
        offset += info["count"]
    skipped = [s for info in infos for s in info.get("skipped", [])][:MAX_SKIPPED_LISTED]
    num_skipped = sum(int(info.get("num_skipped", 0)) for info in infos)
    if offset == 0:
        raise DatasetError(
            f"none of the {sum(i['planned'] for i in infos)} images of gallery {doc['name']!r} could be "
            f"read (first problems: {[s['error'] for s in skipped[:3]]}); check that the sources hold valid images"
        )
    doc.update(count=offset, shards=shards, skipped=skipped, num_skipped=num_skipped, index=None)
    atomic_write_json(out / GALLERY_JSON, doc)
    gallery = Gallery(out, doc)
    if make_index is not None:
        make_index(gallery)
    elif index_kind is not None:
        gallery.build_index(index_kind, memory_budget_bytes=memory_budget_bytes)
    gallery.doc["status"] = "complete"
    atomic_write_json(out / GALLERY_JSON, gallery.doc)
    atomic_write_text(out / SUCCESS, "")
    return gallery


def build_gallery(
    sources: str | Path | Sequence[SourceArg],
    out_dir: str | Path,
    *,
    encoder: str | Encoder = DEFAULT_ENCODER,
    image_size: int | None = None,
    name: str | None = None,
    batch_size: int = 128,
    shard_size: int = 50_000,
    index_kind: str | None = "auto",
    memory_budget_bytes: int | None = None,
    num_workers: int = 0,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
) -> Gallery:
    """Embed every image of ``sources`` into a gallery at ``out_dir`` (resuming a partial build there).

    ``sources``: image folders, .zip files, .tar shards (a .tar, a directory of them, or a brace
    pattern like 'shards/{00000..00009}.tar'), .csv/.jsonl manifests; each may be a
    ``(path, split_file)`` pair that keeps only the split's entries. Unreadable images are skipped
    and listed in gallery.json. ``progress(done, total, images_per_s)`` is called after every
    batch. ``index_kind=None`` leaves the index to a later ``Gallery.build_index``.
    """
    if shard_size < 1:
        raise ConfigError(f"shard_size must be >= 1, got {shard_size}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
    out = Path(_abs(out_dir))
    listing = _Listing(_normalize_sources(sources))
    total = len(listing)
    if isinstance(encoder, Encoder):
        if image_size is not None and image_size != encoder.image_size:
            raise ConfigError(
                f"image_size={image_size} differs from the given encoder's {encoder.image_size}; "
                f"build the encoder at that size or leave image_size unset"
            )
        enc = encoder
    else:
        enc = Encoder.from_spec(str(encoder), image_size=image_size, device=device, batch_size=batch_size)
    desc = enc.describe()
    plan = _build_plan(listing, desc, shard_size)
    existing = _prepare_out_dir(out, plan, overwrite)
    if existing is not None and existing.get("status") == "complete":
        try:
            return Gallery.open(out)
        except DatasetError as e:  # a shard was lost since: rebuild just that
            log.warning("%s; rebuilding the missing shards", e)
    doc = _base_doc(name or (existing or {}).get("name") or out.name, plan, desc, enc.dim)
    _start(out, doc)

    n_shards = math.ceil(total / shard_size)
    ranges = [(k * shard_size, min(total, (k + 1) * shard_size)) for k in range(n_shards)]
    infos: dict[int, dict[str, Any]] = {}
    for k in range(n_shards):
        info = _shard_done(out / "shards" / _shard_name(k))
        if info is not None:
            infos[k] = info
    todo = [k for k in range(n_shards) if k not in infos]
    if infos:
        log.info("gallery %s: resuming, %d of %d shards already embedded", out, len(infos), n_shards)

    t0 = time.perf_counter()
    done = sum(ranges[k][1] - ranges[k][0] for k in infos)
    embedded = 0
    warned = 0
    buffers: dict[int, _ShardBuffer] = {}  # at most two shards in flight: the one ending, the next
    loader = torch.utils.data.DataLoader(
        _EmbedDataset(listing, enc.transform),
        batch_sampler=_ShardBatches([ranges[k] for k in todo], batch_size),
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=enc.device.type == "cuda",
    )

    def consume(batch: dict[str, Any], vectors: torch.Tensor | None) -> None:
        nonlocal done, embedded, warned
        vecs = vectors.cpu().numpy().astype(np.float16) if vectors is not None else None
        k = batch["pos"][0] // shard_size
        buf = buffers.get(k) or buffers.setdefault(k, _ShardBuffer(k, ranges[k][0], ranges[k][1], enc.dim))
        j, errors = buf.take(batch, vecs, listing)
        for err in errors:
            if warned < _MAX_WARNINGS:
                log.warning("gallery %s: skipping %s", out.name, err)
            warned += 1
        done += len(batch["pos"])
        embedded += j
        if buf.complete:
            offset = sum(infos[i]["count"] for i in range(k) if i in infos)
            infos[k] = _write_shard(out / "shards" / _shard_name(k), buf, listing, offset)
            del buffers[k]
            log.info("gallery %s: %s done (%d/%d images)", out.name, _shard_name(k), done, total)
        if progress is not None:
            progress(done, total, embedded / max(time.perf_counter() - t0, 1e-9))

    # One batch in flight: the next batch is queued on the device before the previous one's
    # vectors are copied back, so decoding, transfer and the forward overlap on a GPU.
    pending: tuple[dict[str, Any], torch.Tensor | None] | None = None
    for batch in loader:
        vectors = enc.encode_tensor(batch["pixels"]) if len(batch["pixels"]) else None
        if pending is not None:
            consume(*pending)
        pending = (batch, vectors)
    if pending is not None:
        consume(*pending)
    elapsed = time.perf_counter() - t0
    if warned > _MAX_WARNINGS:
        log.warning("gallery %s: %d unreadable images skipped in all", out.name, warned)
    if todo:
        log.info(
            "gallery %s: embedded %d images in %.1f s (%.1f images/s)",
            out.name,
            embedded,
            elapsed,
            embedded / max(elapsed, 1e-9),
        )
    doc["build"] = {
        "embedded": embedded,
        "seconds": round(elapsed, 3),
        "images_per_s": round(embedded / max(elapsed, 1e-9), 2),
        "device": str(enc.device),
    }
    return _finalize(
        out,
        doc,
        [infos[k] for k in range(n_shards)],
        index_kind=index_kind,
        memory_budget_bytes=memory_budget_bytes,
    )


# --------------------------------------------------------------------------------------------
# importing precomputed embeddings


def _numbered(path: Path, pattern: str, what: str, fix: str) -> dict[int, Path]:
    if path.is_file():
        m = re.fullmatch(pattern, path.name)
        return {int(m.group(1)) if m else 0: path}
    if not path.is_dir():
        raise DatasetError(f"{what} {path} does not exist; {fix}")
    found = {int(m.group(1)): p for p in path.iterdir() if (m := re.fullmatch(pattern, p.name))}
    if not found:
        like = pattern.replace("(\\d+)", "<n>").replace("\\.", ".")
        raise DatasetError(f"{what} {path} holds no files named like {like}; {fix}")
    return dict(sorted(found.items()))


def _import_metadata_batches(meta_path: Path, chunk_rows: int) -> Iterator[dict[str, list[Any]]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(meta_path)
    names = set(pf.schema_arrow.names)
    wanted = [c for c in ("image_path", "key", "url", "caption", "width", "height") if c in names]
    for rb in pf.iter_batches(batch_size=chunk_rows, columns=wanted or None):
        cols = rb.to_pydict() if wanted else {}
        n = rb.num_rows
        key_col = cols.get("image_path") or cols.get("key") or cols.get("url") or [""] * n
        yield {
            "key": ["" if v is None else str(v) for v in key_col],
            "url": [None if v is None else str(v) for v in cols.get("url", [None] * n)],
            "caption": [None if v is None else str(v) for v in cols.get("caption", [None] * n)],
            "width": [-1 if v is None else int(v) for v in cols.get("width", [-1] * n)],
            "height": [-1 if v is None else int(v) for v in cols.get("height", [-1] * n)],
            "n": [n],
        }


def import_embeddings(
    embeddings: str | Path,
    metadata: str | Path,
    out_dir: str | Path,
    *,
    name: str | None = None,
    image_root: str | Path | None = None,
    index_kind: str | None = "auto",
    memory_budget_bytes: int | None = None,
    encoder_spec: str | None = None,
    overwrite: bool = False,
    chunk_rows: int = 65_536,
) -> Gallery:
    """A gallery from precomputed embeddings in the clip-retrieval / autofaiss layout.

    ``embeddings``: a directory of ``img_emb_<n>.npy`` (float16/32 [n_i, d]) or one such file;
    ``metadata``: a directory of ``metadata_<n>.parquet`` with the same row counts (columns such as
    image_path, url, caption) or one such file. Rows are re-normalized and stored as float16, one
    shard per input file, reading ``chunk_rows`` rows at a time. ``image_root`` is the directory
    that ``image_path`` values are relative to (without it only absolute paths can be opened).
    ``encoder_spec`` records the model that made the embeddings, so queries can be checked.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb_dir, meta_dir = Path(_abs(embeddings)), Path(_abs(metadata))
    fix = "pass the clip-retrieval output: embeddings/img_emb_<n>.npy and metadata/metadata_<n>.parquet"
    embs = _numbered(emb_dir, r"img_emb_(\d+)\.npy", "embeddings", fix)
    metas = _numbered(meta_dir, r"metadata_(\d+)\.parquet", "metadata", fix)
    if len(embs) == 1 and len(metas) == 1:  # single files pair up whatever their numbers
        metas = {next(iter(embs)): next(iter(metas.values()))}
    lonely = sorted(set(embs) ^ set(metas))
    if lonely:
        n = lonely[0]
        have, lack = (embs[n], "metadata_{n}.parquet") if n in embs else (metas[n], "img_emb_{n}.npy")
        raise DatasetError(
            f"{have} has no counterpart {lack.format(n=n)}; every img_emb_<n>.npy needs a metadata_<n>.parquet "
            f"with the same rows (remove the unmatched file or add its counterpart)"
        )
    parts: list[tuple[Path, Path, int]] = []
    dims: dict[int, list[str]] = {}
    for n, epath in embs.items():
        try:
            arr = np.load(epath, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read embeddings {epath} ({e}); it must be a .npy array [n, d]") from e
        if arr.ndim != 2 or arr.dtype.kind != "f":
            raise DatasetError(
                f"embeddings {epath} has shape {arr.shape} and dtype {arr.dtype}; expected a float array [n, d]"
            )
        try:
            rows = pq.ParquetFile(metas[n]).metadata.num_rows
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"cannot read metadata {metas[n]} ({e}); it must be a parquet file") from e
        if rows != arr.shape[0]:
            raise DatasetError(
                f"{epath} has {arr.shape[0]} rows but {metas[n]} has {rows}; each metadata file must describe "
                f"its embeddings file row by row (re-export them together)"
            )
        dims.setdefault(int(arr.shape[1]), []).append(epath.name)
        parts.append((epath, metas[n], int(arr.shape[0])))
    if len(dims) > 1:
        listed = "; ".join(f"{d}-d: {', '.join(names[:3])}" for d, names in sorted(dims.items()))
        raise DatasetError(
            f"embedding files in {emb_dir} have different dimensions ({listed}); import files from one model only"
        )
    total = sum(p[2] for p in parts)
    if total == 0:
        raise DatasetError(f"embeddings in {emb_dir} have no rows; nothing to import")
    dim = next(iter(dims))
    out = Path(_abs(out_dir))
    root = _abs(image_root) if image_root is not None else ""
    encoder = {"spec": encoder_spec, "dim": dim, "imported_from": str(emb_dir)}
    plan = {
        "sources": [{"path": str(emb_dir), "split": None, "kind": "precomputed", "metadata": str(meta_dir)}],
        "encoder": encoder,
        "image_root": root or None,
        "files": [[e.name, m.name, n] for e, m, n in parts],
    }
    existing = _prepare_out_dir(out, plan, overwrite)
    if existing is not None and existing.get("status") == "complete":
        try:
            return Gallery.open(out)
        except DatasetError as e:
            log.warning("%s; re-importing the missing shards", e)
    doc = _base_doc(name or (existing or {}).get("name") or out.name, plan, encoder, dim)
    _start(out, doc)

    infos: list[dict[str, Any]] = []
    offset = 0
    for k, (epath, mpath, n) in enumerate(parts):
        shard_dir = out / "shards" / _shard_name(k)
        info = _shard_done(shard_dir)
        if info is None:
            shard_dir.mkdir(parents=True, exist_ok=True)
            src = np.load(epath, mmap_mode="r")
            tmp = shard_dir / f".{EMBEDDINGS}.tmp"
            dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim))
            try:
                for a in range(0, n, chunk_rows):
                    block = np.asarray(src[a : a + chunk_rows], dtype=np.float32)
                    norms = np.linalg.norm(block, axis=1, keepdims=True)
                    bad = ~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0)
                    if bad.any():
                        raise DatasetError(
                            f"row {a + int(np.argmax(bad))} of {epath} is all zeros or not finite, so it has "
                            f"no direction to search by; drop such rows (and their metadata rows) before importing"
                        )
                    dst[a : a + len(block)] = (block / norms).astype(np.float16)
                dst.flush()
                del dst
                os.replace(tmp, shard_dir / EMBEDDINGS)
            finally:
                tmp.unlink(missing_ok=True)

            tmp_meta = shard_dir / f".{META}.tmp"
            try:
                with pq.ParquetWriter(tmp_meta, _meta_schema()) as writer:
                    row = offset
                    for cols in _import_metadata_batches(mpath, chunk_rows):
                        m = cols.pop("n")[0]
                        ids = np.arange(row, row + m, dtype=np.int64)
                        cols["source"] = [root] * m
                        writer.write_table(_meta_table(ids, cols))
                        row += m
                os.replace(tmp_meta, shard_dir / META)
            finally:
                tmp_meta.unlink(missing_ok=True)
            info = {
                "name": shard_dir.name,
                "count": n,
                "planned": n,
                "id_offset": offset,
                "num_skipped": 0,
                "skipped": [],
                "embeddings_file": str(epath),
                "metadata_file": str(mpath),
            }
            atomic_write_json(shard_dir / SHARD_JSON, info)
            atomic_write_text(shard_dir / SUCCESS, "")
        infos.append(info)
        offset += info["count"]
    return _finalize(out, doc, infos, index_kind=index_kind, memory_budget_bytes=memory_budget_bytes)


# --------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class _Shard:
    name: str
    count: int
    id_offset: int


class Gallery:
    """A built gallery on disk: vectors, metadata and images by global id, and k-NN search."""

    path: Path
    name: str
    dim: int
    count: int
    encoder: dict[str, Any]

    def __init__(self, path: str | Path, doc: dict[str, Any]) -> None:
        self.path = Path(path)
        self.doc = doc
        self.name = str(doc.get("name") or self.path.name)
        self.dim = int(doc["dim"])
        self.count = int(doc.get("count") or 0)
        self.encoder = dict(doc.get("encoder") or {})
        self.shards = [_Shard(s["name"], int(s["count"]), int(s["id_offset"])) for s in doc.get("shards", [])]
        self._offsets = np.array([s.id_offset for s in self.shards], dtype=np.int64)
        self._lock = threading.Lock()
        self._emb: dict[int, np.ndarray] = {}
        self._meta: dict[int, Any] = {}
        self._stores: dict[str, ImageStore] = {}
        self._index: Any = None

    def __repr__(self) -> str:
        return f"Gallery({str(self.path)!r}, name={self.name!r}, count={self.count}, dim={self.dim})"

    def __len__(self) -> int:
        return self.count

    @classmethod
    def open(cls, path: str | Path) -> Gallery:
        path = Path(_abs(path))
        gj = path / GALLERY_JSON
        if not gj.exists():
            raise DatasetError(
                f"{path} is not a gallery (no {GALLERY_JSON}); build one with 'kt gallery build' "
                f"(kt_train.gallery.build_gallery) or import embeddings with 'kt gallery import'"
            )
        doc = _read_json(gj)
        if doc.get("format") != FORMAT:
            raise DatasetError(
                f"{gj} has format {doc.get('format')!r}, expected {FORMAT!r}; rebuild the gallery with this version"
            )
        if doc.get("status") != "complete" or not (path / SUCCESS).exists():
            raise DatasetError(
                f"gallery {path} is incomplete (its build was interrupted); re-run 'kt gallery build' with the "
                f"same sources and output directory to resume it"
            )
        missing = [
            s["name"] for s in doc.get("shards", []) if not (path / "shards" / s["name"] / SUCCESS).exists()
        ]
        if missing:
            raise DatasetError(
                f"gallery {path} lacks finished shards {missing[:5]}; re-run 'kt gallery build' with the same "
                f"sources and output directory to rebuild them"
            )
        return cls(path, doc)

    # -- vectors -------------------------------------------------------------------------------

    def _embeddings(self, s: int) -> np.ndarray:
        mm = self._emb.get(s)
        if mm is None:
            mm = np.load(self.path / "shards" / self.shards[s].name / EMBEDDINGS, mmap_mode="r")
            self._emb[s] = mm
        return mm

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = (ids < 0) | (ids >= self.count)
        if bad.any():
            raise DatasetError(
                f"gallery {self.name!r} has no id {int(ids[bad][0])}; its ids are 0..{self.count - 1}"
            )
        shard = np.searchsorted(self._offsets, ids, side="right") - 1
        return shard, ids - self._offsets[shard]

    def ids(self) -> np.ndarray:
        return np.arange(self.count, dtype=np.int64)

    def vectors(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """float32 [len(ids), dim] unit-norm rows, by global id."""
        shard, local = self._locate(np.asarray(ids))
        out = np.empty((len(local), self.dim), dtype=np.float32)
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            rows = local[sel]
            order = np.argsort(rows, kind="stable")  # read the memmap front to back
            out[sel[order]] = self._embeddings(int(s))[rows[order]]
        return out

    def iter_vectors(self, chunk: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids int64, float16 block) over the whole gallery, in id order."""
        for s, sh in enumerate(self.shards):
            mm = self._embeddings(s)
            for a in range(0, sh.count, chunk):
                b = min(sh.count, a + chunk)
                yield np.arange(sh.id_offset + a, sh.id_offset + b, dtype=np.int64), np.asarray(mm[a:b])

    # -- metadata and images -------------------------------------------------------------------

    def _table(self, s: int) -> Any:
        t = self._meta.get(s)
        if t is None:
            import pyarrow.parquet as pq

            t = pq.read_table(self.path / "shards" / self.shards[s].name / META)
            self._meta[s] = t
        return t

    def metadata(self, ids: np.ndarray | Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Rows {id, source, key, width, height, url, caption, box} in the order of ``ids`` (all if None)."""
        import pyarrow as pa

        if ids is None:
            return [row for s in range(len(self.shards)) for row in self._table(s).to_pylist()]
        shard, local = self._locate(np.asarray(ids))
        out: list[dict[str, Any]] = [{} for _ in range(len(local))]
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            rows = self._table(int(s)).take(pa.array(local[sel])).to_pylist()
            for i, row in zip(sel, rows, strict=True):
                out[i] = row
        return out

    def _store(self, source: str, key: str) -> ImageStore:
        cache_key = source if source else "/"
        with self._lock:
            store = self._stores.get(cache_key)
            if store is None:
                p = Path(cache_key)
                if not source and not Path(key).is_absolute():
                    raise DatasetError(
                        f"gallery {self.name!r} was imported without image_root, so {key!r} cannot be opened; "
                        f"re-import it with image_root= the directory its image paths are relative to"
                    )
                if p.is_dir():
                    store = FolderStore(p)
                elif p.suffix.lower() == ".zip":
                    store = ZipStore(p)
                elif p.suffix.lower() == ".tar":
                    store = TarStore(p)
                else:
                    raise DatasetError(
                        f"image source {source} of gallery {self.name!r} no longer exists; restore it or rebuild the gallery"
                    )
                self._stores[cache_key] = store
        return store

    def open_image(self, id: int) -> Image.Image:
        """The decoded RGB image of gallery item ``id`` (its crop box applied, if it has one)."""
        (row,) = self.metadata([int(id)])
        store = self._store(row["source"] or "", row["key"])
        box = row.get("box")
        item = Item(key=row["key"], box=tuple(box) if box else None)  # type: ignore[arg-type]
        return ImageDataset([store], [item], None, name=self.name).load_image(0)

    # -- index and search ----------------------------------------------------------------------

    def _index_path(self, name: str) -> Path:
        return self.path / "index" / f"{name}.faiss"

    def build_index(
        self,
        kind: str = "auto",
        memory_budget_bytes: int | None = None,
        *,
        on_disk: bool | None = None,
        **kw: Any,
    ) -> None:
        """(Re)build and save the gallery's FAISS index and record it in gallery.json: one index per
        shard, or (``on_disk``; by default when ``kt_index.choose_index`` finds that the whole
        gallery's IVF index exceeds ``memory_budget_bytes``) one IVF index over every shard whose
        inverted lists stay on disk and are memory-mapped by searches (``build_ondisk_index``)."""
        from . import index as kt_index

        whole = kt_index.choose_index(
            self.count, self.dim, memory_budget_bytes=memory_budget_bytes, kind=kind
        )
        if on_disk is None:
            on_disk = whole.on_disk and whole.kind in kt_index.IVF_KINDS
        if on_disk:
            self.build_ondisk_index(whole, requested=kind, **kw)
            return
        entries = []
        for s, sh in enumerate(self.shards):
            budget = None if memory_budget_bytes is None else int(memory_budget_bytes * sh.count / self.count)
            plan = kt_index.choose_index(sh.count, self.dim, memory_budget_bytes=budget, kind=kind)
            t = time.perf_counter()
            idx = kt_index.build_index(self._embeddings(s), plan, **kw)
            path = kt_index.save_index(idx, self._index_path(sh.name))
            del idx
            log.info(
                "gallery %s: %s index %s in %.1f s", self.name, sh.name, plan.kind, time.perf_counter() - t
            )
            entries.append(
                {"name": sh.name, "path": str(path.relative_to(self.path)), "plan": plan.to_dict()}
            )
        self._record_index({"kind": kind, "shards": entries})

    def _record_index(self, entry: dict[str, Any]) -> None:
        self.doc["index"] = entry
        atomic_write_json(self.path / GALLERY_JSON, self.doc)
        with self._lock:
            self._index = None

    def build_ondisk_index(
        self, plan: Any, *, requested: str | None = None, train_size: int = 262_144, seed: int = 0, **kw: Any
    ) -> None:
        """One IVF index over the whole gallery with its lists on disk: the quantizer trained once on
        a random sample of ``train_size`` vectors (``index/trained.faiss``), each shard added to a
        copy of it with its global ids (``index/parts/``), the parts merged into
        ``index/merged.faiss`` + ``index/merged.ivfdata`` and then deleted. ``plan``: an IVF
        ``IndexPlan`` for ``self.count`` vectors (``kt_index.choose_index``)."""
        from . import index as kt_index

        t = time.perf_counter()
        rng = np.random.default_rng(seed)
        m = min(self.count, train_size)
        sample = self.vectors(np.sort(rng.choice(self.count, size=m, replace=False)))
        trained = kt_index.train_empty_index(sample, plan, seed=seed)
        del sample
        index_dir = self.path / "index"
        trained_path = kt_index.save_index(trained, index_dir / TRAINED_INDEX)
        parts = [
            kt_index.add_shard(
                trained, self._embeddings(s), sh.id_offset, index_dir / "parts" / f"{sh.name}.faiss", **kw
            )
            for s, sh in enumerate(self.shards)
        ]
        self.merge_index_parts(trained_path, parts, plan.to_dict(), requested=requested)
        log.info("gallery %s: on-disk %s index in %.1f s", self.name, plan.kind, time.perf_counter() - t)

    def merge_index_parts(
        self,
        trained_path: Path,
        parts: Sequence[Path],
        plan: dict[str, Any],
        *,
        requested: str | None = None,
        id_map: dict[str, Any] | None = None,
    ) -> None:
        """Merge per-shard IVF parts (``kt_index.add_shard`` outputs of ``trained_path``) into
        ``index/merged.faiss`` on disk, record it (``id_map``: how the parts' ids map to gallery ids,
        see ``_from_index_ids``) and delete the parts."""
        from . import index as kt_index

        merged = kt_index.merge_shards(trained_path, parts, self.path / "index" / MERGED_INDEX)
        entry: dict[str, Any] = {
            "kind": requested or plan.get("kind"),
            "on_disk": {
                "path": str(merged.relative_to(self.path)),
                "ivfdata": str(merged.with_suffix(kt_index.IVFDATA_SUFFIX).relative_to(self.path)),
                "plan": {**plan, "on_disk": True},
            },
            "shards": [],
        }
        if id_map is not None:
            entry["on_disk"]["id_map"] = id_map
        self._record_index(entry)
        for part in parts:
            Path(part).unlink(missing_ok=True)

    def _from_index_ids(self, ids: np.ndarray) -> np.ndarray:
        """Gallery ids of an on-disk index's ids. A distributed build numbers the vectors of
        planned shard ``k`` from ``k * stride`` (known before any shard is embedded, so a redone
        shard gets the same ids); with skipped images the gallery's contiguous ids differ."""
        id_map = ((self.doc.get("index") or {}).get("on_disk") or {}).get("id_map")
        if not id_map:
            return ids
        stride = int(id_map["stride"])
        offsets = np.asarray(id_map["offsets"], dtype=np.int64)
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        return np.where(valid, offsets[safe // stride] + safe % stride, -1)

    def _sharded_index(self) -> Any:
        from . import index as kt_index

        with self._lock:
            if self._index is None:
                if not self.doc.get("index"):
                    raise DatasetError(
                        f"gallery {self.name!r} has no index; build it with Gallery.build_index() ('kt gallery index')"
                    )
                merged = self.doc["index"].get("on_disk")
                if merged:  # one index, its lists memory-mapped from disk
                    parts = [(kt_index.load_ondisk_index(self.path / merged["path"]), 0)]
                else:
                    parts = [
                        # an index planned bigger than the memory budget is memory-mapped, not read
                        (kt_index.load_index(self.path / e["path"], mmap=e["plan"]["on_disk"]), sh.id_offset)
                        for e, sh in zip(self.doc["index"]["shards"], self.shards, strict=True)
                    ]
                self._index = kt_index.ShardedIndex(parts)
            return self._index

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, global ids) for each query row over all shards."""
        q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        scores, ids = self._sharded_index().search(q, k, nprobe=nprobe, ef_search=ef_search)
        return scores, self._from_index_ids(ids)

    # -- encoder -------------------------------------------------------------------------------

    def check_encoder(self, encoder: Encoder) -> None:
        """DatasetError unless ``encoder`` embeds into this gallery's space (same model and size)."""
        g = self.encoder
        problems = []
        if int(g.get("dim") or self.dim) != encoder.dim:
            problems.append("dimension")
        if g.get("spec") and g["spec"] != encoder.spec:
            problems.append("model")
        if g.get("spec") and (g.get("checkpoint") or None) != (encoder.checkpoint or None):
            problems.append("checkpoint")
        if g.get("image_size") and int(g["image_size"]) != encoder.image_size:
            problems.append("image size")
        if not problems:
            return

        def label(spec: Any, ckpt: Any, size: Any, dim: Any) -> str:
            s = str(spec) if spec else "an unrecorded model"
            s += f" from checkpoint {ckpt}" if ckpt else ""
            return s + f" ({dim}-d" + (f", {size} px)" if size else ")")

        raise DatasetError(
            f"gallery {self.name!r} was embedded with "
            f"{label(g.get('spec'), g.get('checkpoint'), g.get('image_size'), g.get('dim') or self.dim)} "
            f"but the query encoder is {label(encoder.spec, encoder.checkpoint, encoder.image_size, encoder.dim)} "
            f"(different {', '.join(problems)}); embed queries with the gallery's encoder "
            f"(Encoder.from_description(gallery.encoder)) or build a gallery with this encoder"
        )
