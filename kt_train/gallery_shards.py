"""A gallery built by many workers: four idempotent steps on a shared gallery folder (issue 16).

``plan_distributed_build`` lists the sources, fixes the shards (``shard_size`` images each) and the
index plan (``kt_index.choose_index`` over the whole listing), writes ``gallery.json`` (status
``building``) and writes the listing once, one parquet file per shard (``listing/shard-<k>.parquet``:
store path and kind, key, crop box, url, caption). It is the only step that lists the sources. Then,
in any processes on any machines that see the folder:

1. ``train_quantizer``: embeds a random sample of the listing and saves the empty trained IVF (or
   IVF-PQ) index, ``index/trained.faiss`` (autofaiss: train once, then add per batch; shards from
   different trained indexes could not be merged, clip-retrieval's known failure);
2. ``build_shard(k)``, one per shard, in any order and in parallel: reads its own listing file
   (memory and reads O(shard), never the whole listing), embeds shard ``k`` (its files as
   ``build_gallery`` writes them) and adds it to a copy of the trained index with ids
   ``k * shard_size + row`` (``index/parts/shard-<k>.faiss``, temp file + rename). Ids are a pure
   function of the shard number and the row, so a shard redone after a crash or a redelivery writes
   the same files again, never duplicate ids;
3. ``finish_build``: merges the parts into one on-disk index (``index/merged.faiss`` +
   ``merged.ivfdata``, ``kt_index.merge_shards``), records how the parts' ids map to the gallery's
   contiguous ids (images that could not be read leave gaps in the planned ids), and marks the
   gallery complete.

A plan whose index is not IVF (``flat`` below ~50k images, ``hnsw``) skips step 1, and step 3 builds
the per-shard indexes as ``build_gallery`` does. Steps 1 and 2 read the listing files, not the
sources' listings, so they do not notice sources changed after the plan: an image gone since is
skipped as an unreadable one is. ``shards_done`` gives the progress (shards done /
total). This module knows nothing of queues: ``worker.gallery_tasks`` runs the steps as a Celery
canvas, and ``build_gallery_parallel`` runs them in a local process pool (``kt gallery build
--workers N``).
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import index as kt_index
from .data import FileStore, FolderStore, ImageDataset, ImageStore, Item, TarStore, ZipStore
from .embed import Encoder
from .errors import ConfigError, DatasetError
from .gallery import (
    DEFAULT_ENCODER,
    EMBEDDINGS,
    GALLERY_JSON,
    TRAINED_INDEX,
    Gallery,
    SourceArg,
    _abs,
    _base_doc,
    _build_plan,
    _collate,
    _EmbedDataset,
    _finalize,
    _Listing,
    _normalize_sources,
    _prepare_out_dir,
    _read_json,
    _Rows,
    _save_parquet,
    _shard_done,
    _shard_name,
    _ShardBuffer,
    _start,
    _write_shard,
)
from .io import SUCCESS

__all__ = [
    "build_gallery_parallel",
    "build_shard",
    "finish_build",
    "plan_distributed_build",
    "shards_done",
    "train_quantizer",
]

DIST = "distributed"  # gallery.json: how the build was cut up


LISTING = "listing"  # the planned listing, one parquet file per shard

# the kind of store an image is read from, and how a shard task opens it again from its path
_STORE_KINDS: dict[type[ImageStore], str] = {
    FolderStore: "folder",
    ZipStore: "zip",
    TarStore: "tar",
    FileStore: "file",
}
_OPEN_STORE: dict[str, Callable[[str], ImageStore]] = {
    "folder": FolderStore,
    "zip": ZipStore,
    "tar": TarStore,
    "file": FileStore,
}


def _part_path(out: Path, k: int) -> Path:
    return out / "index" / "parts" / f"{_shard_name(k)}.faiss"


def _listing_path(out: Path, k: int) -> Path:
    return out / LISTING / f"{_shard_name(k)}.parquet"


def _listing_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("source", pa.string()),  # the store's path, as the gallery's metadata records it
            ("store", pa.string()),  # its kind: folder, zip, tar or file (a manifest's base folder)
            ("key", pa.string()),
            ("box", pa.list_(pa.float64())),  # float64: the crop is the one build_gallery makes
            ("url", pa.string()),
            ("caption", pa.string()),
        ]
    )


def _write_listing(out: Path, listing: _Listing, shard_size: int) -> None:
    """One parquet file per shard with its rows of ``listing``. A file already there was written by
    an earlier plan of the same build (same sources, same fingerprint, same cut) and is kept."""
    import pyarrow as pa

    kinds = [[_STORE_KINDS[type(st)] for st in ds.stores] for ds in listing.datasets]
    schema = _listing_schema()
    for k in range(math.ceil(len(listing) / shard_size)):
        path = _listing_path(out, k)
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = range(k * shard_size, min(len(listing), (k + 1) * shard_size))
        store = []
        for p in rows:
            d = int(listing.ds_index[p])
            store.append(kinds[d][listing.datasets[d].items[int(listing.item_index[p])].shard])
        cols = {
            "source": [listing.source[p] for p in rows],
            "store": store,
            "key": [listing.key[p] for p in rows],
            "box": [listing.box[p] for p in rows],
            "url": [listing.url[p] for p in rows],
            "caption": [listing.caption[p] for p in rows],
        }
        arrays = [pa.array(cols[f.name], type=f.type) for f in schema]
        _save_parquet(path, pa.Table.from_arrays(arrays, schema=schema))


class _ListingRows:
    """Rows of a planned listing read back from its files (one shard's, or the quantizer's sample),
    as ``_Rows``: positions count from 0, and only the stores these rows use are opened."""

    def __init__(self, table: Any) -> None:
        cols = table.to_pydict()
        self.source: list[str] = cols["source"]
        self.key: list[str] = cols["key"]
        self.box: list[list[float] | None] = cols["box"]
        self.url: list[str | None] = cols["url"]
        self.caption: list[str | None] = cols["caption"]
        opened: dict[tuple[str, str], int] = {}
        stores: list[ImageStore] = []
        items: list[Item] = []
        for src, kind, key, box in zip(self.source, cols["store"], self.key, self.box, strict=True):
            s = opened.get((kind, src))
            if s is None:
                s = opened[(kind, src)] = len(stores)
                stores.append(_OPEN_STORE[kind](src))
            items.append(Item(key=key, box=tuple(box) if box is not None else None, shard=s))  # type: ignore[arg-type]
        self.datasets = [ImageDataset(stores, items, None, name="gallery listing")]
        self.ds_index = np.zeros(len(items), dtype=np.int32)
        self.item_index = np.arange(len(items), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.key)


def _read_listing(out: Path, doc: dict[str, Any], k: int, rows: int) -> Any:
    """Shard ``k``'s listing file as an arrow table of ``rows`` rows (DatasetError if it is not)."""
    import pyarrow.parquet as pq

    path = _listing_path(out, k)
    try:
        table = pq.read_table(path, schema=_listing_schema())
    except (OSError, ValueError) as e:
        raise DatasetError(
            f"cannot read the listing of shard {k} of gallery {doc.get('name')!r} ({path}: {e}); plan the "
            f"build again (plan_distributed_build with the same arguments rewrites missing listing files)"
        ) from e
    if table.num_rows != rows:
        raise DatasetError(
            f"{path} holds {table.num_rows} images where the plan has {rows}; the build folder is damaged, "
            f"start the build again (overwrite=True)"
        )
    return table


def plan_distributed_build(
    sources: str | Path | Sequence[SourceArg],
    out_dir: str | Path,
    *,
    encoder: str = DEFAULT_ENCODER,
    image_size: int | None = None,
    name: str | None = None,
    batch_size: int = 128,
    shard_size: int = 50_000,
    index_kind: str = "auto",
    memory_budget_bytes: int | None = None,
    train_size: int = 262_144,
    seed: int = 0,
    num_workers: int = 0,
    overwrite: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Start (or resume) a distributed build in ``out_dir``: {"out", "shards", "listed", "index"
    (the planned kind), "complete"}. Same checks and resume rules as ``build_gallery``.
    ``num_workers``: the image-decoding processes of each shard task's loader (0: in the task)."""
    if shard_size < 1 or batch_size < 1 or train_size < 1:
        raise ConfigError("shard_size, batch_size and train_size must be >= 1")
    if num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
    out = Path(_abs(out_dir))
    listing = _Listing(_normalize_sources(sources))
    total = len(listing)
    enc = Encoder.from_spec(str(encoder), image_size=image_size, device=device, batch_size=batch_size)
    desc = enc.describe()
    plan = _build_plan(listing, desc, shard_size)
    n_shards = math.ceil(total / shard_size)
    index_plan = kt_index.choose_index(
        total, enc.dim, memory_budget_bytes=memory_budget_bytes, kind=index_kind
    )
    info = {"out": str(out), "shards": n_shards, "listed": total, "index": index_plan.kind, "complete": False}
    existing = _prepare_out_dir(out, plan, overwrite)
    if existing is not None and existing.get("status") == "complete":
        return {**info, "complete": True}
    doc = _base_doc(name or (existing or {}).get("name") or out.name, plan, desc, enc.dim)
    doc[DIST] = {
        "shards": n_shards,
        "shard_size": int(shard_size),
        "index_kind": index_kind,
        "memory_budget_bytes": memory_budget_bytes,
        "index_plan": index_plan.to_dict() if index_plan.kind in kt_index.IVF_KINDS else None,
        "train_size": int(train_size),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "num_workers": int(num_workers),
    }
    _start(out, doc)
    _write_listing(out, listing, int(shard_size))
    return info


def _load(out_dir: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    out = Path(_abs(out_dir))
    doc = _read_json(out / GALLERY_JSON)
    dist = doc.get(DIST)
    if not isinstance(dist, dict):
        raise DatasetError(f"{out} is not a distributed gallery build; start one with plan_distributed_build")
    return out, doc, dist


def _encoder(doc: dict[str, Any], device: str | torch.device | None) -> Encoder:
    dist = doc[DIST]
    return Encoder.from_description(doc["encoder"], device=device, batch_size=int(dist["batch_size"]))


def _embed(
    listing: _Rows, enc: Encoder, positions: Sequence[int], batch_size: int, num_workers: int = 0
) -> _ShardBuffer:
    """Embed the listing's ``positions`` (unreadable images are recorded as skipped)."""
    buf = _ShardBuffer(0, 0, len(positions), enc.dim)
    batches = [list(positions[a : a + batch_size]) for a in range(0, len(positions), batch_size)]
    loader = torch.utils.data.DataLoader(
        _EmbedDataset(listing, enc.transform),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    for batch in loader:
        vecs = (
            enc.encode_tensor(batch["pixels"]).cpu().numpy().astype(np.float16)
            if len(batch["pixels"])
            else None
        )
        buf.take(batch, vecs, listing)
    return buf


def _num_workers(dist: dict[str, Any], num_workers: int | None) -> int:
    n = int(dist.get("num_workers", 0)) if num_workers is None else int(num_workers)
    if n < 0:
        raise ConfigError(f"num_workers must be >= 0, got {n}")
    return n


def train_quantizer(
    out_dir: str | Path, *, device: str | torch.device | None = None, num_workers: int | None = None
) -> Path | None:
    """Step 1: ``index/trained.faiss`` from a random sample of ``train_size`` images (None when the
    plan's index is not IVF). Done once: an existing trained index is kept, since the shards already
    added to it would not merge with another. Reads the listing files one at a time, keeping only
    the sampled rows."""
    import pyarrow as pa

    out, doc, dist = _load(out_dir)
    if dist["index_plan"] is None:
        return None
    path = out / "index" / TRAINED_INDEX
    if path.is_file():
        return path
    total, stride = int(doc["plan"]["listed"]), int(dist["shard_size"])
    rng = np.random.default_rng(int(dist["seed"]))
    m = min(total, int(dist["train_size"]))
    positions = np.sort(rng.choice(total, size=m, replace=False))
    parts = []
    for k in np.unique(positions // stride).tolist():
        table = _read_listing(out, doc, k, min(total, (k + 1) * stride) - k * stride)
        local = positions[(positions >= k * stride) & (positions < (k + 1) * stride)] - k * stride
        parts.append(table.take(pa.array(local)))
    sample = _ListingRows(pa.concat_tables(parts))
    buf = _embed(
        sample, _encoder(doc, device), range(m), int(dist["batch_size"]), _num_workers(dist, num_workers)
    )
    plan = kt_index.IndexPlan(**dist["index_plan"])
    trained = kt_index.train_empty_index(buf.emb[: buf.rows], plan, seed=int(dist["seed"]))
    kt_index.save_index(trained, path)
    return path


def build_shard(
    out_dir: str | Path,
    k: int,
    *,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    embedded: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Step 2 for shard ``k``: embed it (unless done) and fill its copy of the trained index with
    ids ``k * shard_size + row`` (unless done). Safe to run twice or concurrently: every file is
    written whole and renamed into place. Reads only shard ``k``'s listing file.
    ``num_workers``: the loader's decoding processes (default: the plan's). ``embedded``: called
    once the shard's embeddings are on disk, before its index part is made (the half-way point,
    where the tests hold a shard task to kill its worker)."""
    out, doc, dist = _load(out_dir)
    n_shards, stride = int(dist["shards"]), int(dist["shard_size"])
    if not 0 <= k < n_shards:
        raise ConfigError(f"shard {k} is out of range: the build has shards 0..{n_shards - 1}")
    shard_dir = out / "shards" / _shard_name(k)
    info = _shard_done(shard_dir)
    if info is not None and doc.get("status") == "complete":  # a late duplicate: all merged already
        return {"shard": k, "count": int(info["count"]), "seconds": 0.0}
    t = time.perf_counter()
    if info is None:
        start, stop = k * stride, min(int(doc["plan"]["listed"]), (k + 1) * stride)
        rows = _ListingRows(_read_listing(out, doc, k, stop - start))
        workers = _num_workers(dist, num_workers)
        buf = _embed(rows, _encoder(doc, device), range(stop - start), int(dist["batch_size"]), workers)
        buf.start, buf.stop = start, stop
        info = _write_shard(shard_dir, buf, rows, k * stride)
    if embedded is not None:
        embedded()
    if dist["index_plan"] is not None and not _part_path(out, k).is_file():
        trained = out / "index" / TRAINED_INDEX
        if not trained.is_file():
            raise DatasetError(
                f"{trained} is missing; train the quantizer (train_quantizer) before the shards"
            )
        emb = np.load(shard_dir / EMBEDDINGS, mmap_mode="r")
        kt_index.add_shard(trained, emb, k * stride, _part_path(out, k))
    return {"shard": k, "count": int(info["count"]), "seconds": round(time.perf_counter() - t, 3)}


def _done(out: Path, dist: dict[str, Any], k: int) -> bool:
    if not (out / "shards" / _shard_name(k) / SUCCESS).is_file():
        return False
    return dist["index_plan"] is None or _part_path(out, k).is_file()


def shards_done(out_dir: str | Path) -> tuple[int, int]:
    """(shards embedded and indexed, shards in all); a finished build counts all of them."""
    out, doc, dist = _load(out_dir)
    total = int(dist["shards"])
    if doc.get("status") == "complete" and (out / SUCCESS).is_file():
        return total, total
    return sum(_done(out, dist, k) for k in range(total)), total


def finish_build(out_dir: str | Path) -> Gallery:
    """Step 3, after every shard: merge the parts on disk (or build the per-shard indexes of a
    non-IVF plan) and mark the gallery complete. Idempotent."""
    out, doc, dist = _load(out_dir)
    if doc.get("status") == "complete" and (out / SUCCESS).is_file():
        return Gallery.open(out)
    n_shards, stride = int(dist["shards"]), int(dist["shard_size"])
    missing = [k for k in range(n_shards) if not _done(out, dist, k)]
    if missing:
        raise DatasetError(
            f"gallery {doc.get('name')!r}: shards {missing[:10]} of {n_shards} are not built yet; run "
            f"build_shard for them before finish_build"
        )
    infos = [_shard_done(out / "shards" / _shard_name(k)) for k in range(n_shards)]
    assert all(i is not None for i in infos)
    counts = [int(i["count"]) for i in infos if i is not None]
    doc["build"] = {"embedded": sum(counts), DIST: True, "shards": n_shards}

    def make_index(gallery: Gallery) -> None:
        if dist["index_plan"] is None:
            gallery.build_index(str(dist["index_kind"]), memory_budget_bytes=dist["memory_budget_bytes"])
            return
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        gallery.merge_index_parts(
            out / "index" / TRAINED_INDEX,
            [_part_path(out, k) for k in range(n_shards)],
            dist["index_plan"],
            requested=str(dist["index_kind"]),
            id_map={"stride": stride, "offsets": offsets},
        )

    return _finalize(
        out,
        doc,
        [i for i in infos if i is not None],
        index_kind=None,
        memory_budget_bytes=None,
        make_index=make_index,
    )


def _shard_in_process(out: str, k: int, device: str | None) -> dict[str, Any]:
    from .threads import configure_threads

    configure_threads(processes=1)
    return build_shard(out, k, device=device)  # the plan's num_workers


def build_gallery_parallel(
    sources: str | Path | Sequence[SourceArg],
    out_dir: str | Path,
    *,
    workers: int,
    progress: Callable[[int, int], None] | None = None,
    device: str | None = None,
    **plan_kw: Any,
) -> Gallery:
    """The three steps on this machine: the quantizer here, the shards in ``workers`` processes,
    the merge here (``kt gallery build --workers N``). ``progress(shards done, shards)``: it counts
    shards, not images. ``plan_kw`` go to ``plan_distributed_build`` (``num_workers`` included: the
    decoding processes of each shard process's loader)."""
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    info = plan_distributed_build(sources, out_dir, device=device, **plan_kw)
    out = info["out"]
    if info["complete"]:
        return Gallery.open(out)
    train_quantizer(out, device=device)
    todo = [k for k in range(info["shards"]) if not _done(Path(out), _load(out)[2], k)]
    done = info["shards"] - len(todo)
    if progress is not None:
        progress(done, info["shards"])
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for fut in as_completed([pool.submit(_shard_in_process, out, k, device) for k in todo]):
            fut.result()
            done += 1
            if progress is not None:
                progress(done, info["shards"])
    return finish_build(out)
