"""A gallery built by many workers: four idempotent steps on a shared gallery folder (issue 16).

``plan_distributed_build`` lists the sources, fixes the shards (``shard_size`` images each) and the
index plan (``kt_index.choose_index`` over the whole listing) and writes ``gallery.json`` (status
``building``). Then, in any processes on any machines that see the folder:

1. ``train_quantizer``: embeds a random sample of the listing and saves the empty trained IVF (or
   IVF-PQ) index, ``index/trained.faiss`` (autofaiss: train once, then add per batch; shards from
   different trained indexes could not be merged, clip-retrieval's known failure);
2. ``build_shard(k)``, one per shard, in any order and in parallel: embeds shard ``k`` (its files
   as ``build_gallery`` writes them) and adds it to a copy of the trained index with ids
   ``k * shard_size + row`` (``index/parts/shard-<k>.faiss``, temp file + rename). Ids are a pure
   function of the shard number and the row, so a shard redone after a crash or a redelivery writes
   the same files again, never duplicate ids;
3. ``finish_build``: merges the parts into one on-disk index (``index/merged.faiss`` +
   ``merged.ivfdata``, ``kt_index.merge_shards``), records how the parts' ids map to the gallery's
   contiguous ids (images that could not be read leave gaps in the planned ids), and marks the
   gallery complete.

A plan whose index is not IVF (``flat`` below ~50k images, ``hnsw``) skips step 1, and step 3 builds
the per-shard indexes as ``build_gallery`` does. ``shards_done`` gives the progress (shards done /
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
    _collate,
    _EmbedDataset,
    _finalize,
    _Listing,
    _normalize_sources,
    _prepare_out_dir,
    _read_json,
    _shard_done,
    _shard_name,
    _ShardBuffer,
    _Source,
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


def _part_path(out: Path, k: int) -> Path:
    return out / "index" / "parts" / f"{_shard_name(k)}.faiss"


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
    overwrite: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Start (or resume) a distributed build in ``out_dir``: {"out", "shards", "listed", "index"
    (the planned kind), "complete"}. Same checks and resume rules as ``build_gallery``."""
    if shard_size < 1 or batch_size < 1 or train_size < 1:
        raise ConfigError("shard_size, batch_size and train_size must be >= 1")
    out = Path(_abs(out_dir))
    listing = _Listing(_normalize_sources(sources))
    total = len(listing)
    enc = Encoder.from_spec(str(encoder), image_size=image_size, device=device, batch_size=batch_size)
    desc = enc.describe()
    plan = {
        "sources": listing.records,
        "encoder": desc,
        "shard_size": int(shard_size),
        "listed": total,
        "listing_sha1": listing.fingerprint(),
    }
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
    }
    _start(out, doc)
    return info


def _load(out_dir: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    out = Path(_abs(out_dir))
    doc = _read_json(out / GALLERY_JSON)
    dist = doc.get(DIST)
    if not isinstance(dist, dict):
        raise DatasetError(f"{out} is not a distributed gallery build; start one with plan_distributed_build")
    return out, doc, dist


def _listing(doc: dict[str, Any]) -> _Listing:
    plan = doc["plan"]
    listing = _Listing([_Source(s["path"], s.get("split")) for s in plan["sources"]])
    if listing.fingerprint() != plan["listing_sha1"]:
        raise DatasetError(
            f"the sources of gallery {doc.get('name')!r} changed since its build was planned "
            f"({len(listing)} images now, {plan['listed']} then); start the build again"
        )
    return listing


def _encoder(doc: dict[str, Any], device: str | torch.device | None) -> Encoder:
    dist = doc[DIST]
    return Encoder.from_description(doc["encoder"], device=device, batch_size=int(dist["batch_size"]))


def _embed(
    listing: _Listing, enc: Encoder, positions: Sequence[int], batch_size: int, num_workers: int = 0
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


def train_quantizer(out_dir: str | Path, *, device: str | torch.device | None = None) -> Path | None:
    """Step 1: ``index/trained.faiss`` from a random sample of ``train_size`` images (None when the
    plan's index is not IVF). Done once: an existing trained index is kept, since the shards already
    added to it would not merge with another."""
    out, doc, dist = _load(out_dir)
    if dist["index_plan"] is None:
        return None
    path = out / "index" / TRAINED_INDEX
    if path.is_file():
        return path
    listing = _listing(doc)
    rng = np.random.default_rng(int(dist["seed"]))
    m = min(len(listing), int(dist["train_size"]))
    positions = np.sort(rng.choice(len(listing), size=m, replace=False)).tolist()
    buf = _embed(listing, _encoder(doc, device), positions, int(dist["batch_size"]))
    plan = kt_index.IndexPlan(**dist["index_plan"])
    trained = kt_index.train_empty_index(buf.emb[: buf.rows], plan, seed=int(dist["seed"]))
    kt_index.save_index(trained, path)
    return path


def build_shard(
    out_dir: str | Path, k: int, *, device: str | torch.device | None = None, num_workers: int = 0
) -> dict[str, Any]:
    """Step 2 for shard ``k``: embed it (unless done) and fill its copy of the trained index with
    ids ``k * shard_size + row`` (unless done). Safe to run twice or concurrently: every file is
    written whole and renamed into place."""
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
        listing = _listing(doc)
        start, stop = k * stride, min(len(listing), (k + 1) * stride)
        buf = _embed(listing, _encoder(doc, device), range(start, stop), int(dist["batch_size"]), num_workers)
        buf.start, buf.stop = start, stop
        info = _write_shard(shard_dir, buf, listing, k * stride)
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
    return build_shard(out, k, device=device)


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
    the merge here (``kt gallery build --workers N``). ``progress(shards done, shards)``."""
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
