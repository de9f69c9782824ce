"""Transfer-set curation: query-balanced crop retrieval from a gallery, and the baselines.

For each labeled image (a *query*) we embed the full image and K crops at several scales, search
the gallery for the top-k' items of every crop, pool the hits per query (an item's score is its
best cosine to any of the query's crops), then fill an equal quota per query round-robin, skipping
items another query already took, so that a query whose neighbours are contested still gets its
share (the paper's diversity argument: plain global top-N is dominated by a few easy queries).
Near-duplicates (cosine >= tau) are dropped as they are met, and a leakage guard removes gallery
items that are near-duplicates of the user's labeled or evaluation images.

The selection functions work on plain arrays so that they can be tested on hand-made vectors;
``curate_transfer_set`` wires them to a :class:`~kt_train.gallery.Gallery` and an encoder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from . import cache_store
from .config import CurateConfig
from .errors import ConfigError, DatasetError
from .io import atomic_write, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from .data import ImageDataset
    from .embed import Encoder
    from .gallery import Gallery
    from .models import ImageClassifier

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
METHODS = ("query_balanced", "knn", "class_balanced", "random")
MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")


# --------------------------------------------------------------------------- crops


def crop_boxes(width: int, height: int, crops: int, scales: Sequence[float], seed: int = 0) -> list[Box]:
    """K crop boxes (x0, y0, x1, y1) in pixels: square-ish crops whose side is ``scale`` of the image
    side, cycling through ``scales``, at seeded random positions (reproducible per image)."""
    rng = np.random.default_rng(seed)
    boxes: list[Box] = []
    for k in range(crops):
        s = float(scales[k % len(scales)])
        cw, ch = max(1, round(width * s)), max(1, round(height * s))
        x0 = int(rng.integers(0, width - cw + 1))
        y0 = int(rng.integers(0, height - ch + 1))
        boxes.append((float(x0), float(y0), float(x0 + cw), float(y0 + ch)))
    return boxes


def _crop(img: Image.Image, box: Box | Sequence[float] | None) -> Image.Image:
    if box is None:
        return img
    return img.crop(tuple(round(v) for v in box))  # type: ignore[arg-type]


def write_transfer_report(
    ts: TransferSet, path: str | Path, gallery: Gallery, labeled: ImageDataset, title: str
) -> Path:
    """report.html of a transfer set: each query beside its hits, per-class counts, histograms."""
    from .report import write_report

    return write_report(
        path,
        ts.rows,
        load_hit=lambda row: hit_image(gallery, row),
        load_query=labeled.load_image,
        queries=ts.queries,
        title=title,
        summary={k: v for k, v in ts.summary.items() if k not in ("config", "per_class")},
    )


def hit_image(gallery: Gallery, row: Mapping[str, Any]) -> Image.Image:
    """The image a manifest row stands for (its gallery image, cropped to its box)."""
    return _crop(gallery.open_image(int(row["id"])), row.get("box"))


# --------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """Selected candidates in selection order: candidate index, the query (or group) that took it,
    and its rank within that query's picks."""

    items: list[int] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    dropped_duplicates: int = 0

    def __len__(self) -> int:
        return len(self.items)


class _DedupSet:
    """The selected vectors so far; answers 'is this a near-duplicate of something selected?'."""

    def __init__(self, vectors: np.ndarray | None, threshold: float | None, capacity: int) -> None:
        self.vectors = vectors
        self.threshold = threshold
        self.active = vectors is not None and threshold is not None
        self.buf = np.empty(
            (capacity if self.active else 0, 0 if vectors is None else vectors.shape[1]), np.float32
        )
        self.n = 0

    def filter(self, cands: list[int]) -> list[bool]:
        """Which of ``cands`` (in order) are kept; kept ones join the set."""
        if not self.active or not cands:
            return [True] * len(cands)
        assert self.vectors is not None and self.threshold is not None
        v = np.asarray(self.vectors[cands], dtype=np.float32)
        dup = np.zeros(len(cands), dtype=bool)
        if self.n:
            dup |= (v @ self.buf[: self.n].T).max(axis=1) >= self.threshold
        within = v @ v.T
        keep: list[bool] = []
        kept_idx: list[int] = []
        for i in range(len(cands)):
            ok = not dup[i] and not (kept_idx and within[i, kept_idx].max() >= self.threshold)
            keep.append(ok)
            if ok:
                kept_idx.append(i)
        if kept_idx:
            k = len(kept_idx)
            if self.n + k > len(self.buf):
                grow = np.empty((max(2 * len(self.buf), self.n + k), self.buf.shape[1]), np.float32)
                grow[: self.n] = self.buf[: self.n]
                self.buf = grow
            self.buf[self.n : self.n + k] = v[kept_idx]
            self.n += k
        return keep


def round_robin_select(
    ranked: Sequence[np.ndarray],
    size: int,
    *,
    vectors: np.ndarray | None = None,
    dedup_threshold: float | None = None,
    num_candidates: int | None = None,
    top_up: bool = True,
) -> Selection:
    """Query-balanced selection.

    ``ranked[q]`` lists candidate indices for query ``q``, best first. Each query gets an equal
    quota (``size // len(ranked)``, the remainder to the first queries); queries take turns, each
    taking its best candidate not yet taken by anyone, the turn order rotating every round so that
    no query always wins contested items. A candidate that is a near-duplicate (cosine >=
    ``dedup_threshold`` on ``vectors``) of one already selected is skipped and the query tries its
    next one in the same turn. When some queries run out of candidates, the others keep taking
    turns until ``size`` items are selected (or every list is exhausted); with ``top_up=False`` no
    query takes more than its quota, so the set holds what the queries' own candidates fill.
    """
    if size < 0:
        raise ConfigError(f"transfer-set size must be >= 0, got {size}")
    nq = len(ranked)
    sel = Selection()
    if nq == 0 or size == 0:
        return sel
    m = num_candidates
    if m is None:
        m = 1 + max((int(r.max()) for r in ranked if len(r)), default=-1)
    taken = np.zeros(max(m, 1), dtype=bool)
    ptr = [0] * nq
    counts = [0] * nq
    base, extra = divmod(size, nq)
    target = [base + (1 if q < extra else 0) for q in range(nq)]
    dedup = _DedupSet(vectors, dedup_threshold, size)
    rnd = 0
    filling = False  # phase 2: quotas are met or unreachable; anyone with candidates left fills
    while len(sel) < size:
        order = [(rnd + i) % nq for i in range(nq)]
        rnd += 1
        wanting = [q for q in order if filling or counts[q] < target[q]]
        progressed = False
        # Each wanting query proposes its next free candidate; a proposal rejected as a duplicate
        # is burned and the query proposes again, so a turn is never lost to a duplicate.
        while wanting and len(sel) < size:
            props: list[tuple[int, int]] = []
            for q in wanting:
                r = ranked[q]
                while ptr[q] < len(r) and taken[r[ptr[q]]]:
                    ptr[q] += 1
                if ptr[q] < len(r):
                    c = int(r[ptr[q]])
                    taken[c] = True
                    ptr[q] += 1
                    props.append((q, c))
            if not props:
                break
            keep = dedup.filter([c for _, c in props])
            retry = []
            for (q, c), ok in zip(props, keep, strict=True):
                if ok and len(sel) < size:
                    sel.items.append(c)
                    sel.owners.append(q)
                    sel.ranks.append(counts[q])
                    counts[q] += 1
                    progressed = True
                elif not ok:
                    sel.dropped_duplicates += 1
                    retry.append(q)
            wanting = retry
        if not progressed:
            if filling:
                break
            if all(counts[q] >= target[q] or ptr[q] >= len(ranked[q]) for q in range(nq)):
                if not top_up:
                    break
                filling = True
    return sel


def global_topn_select(
    scores: np.ndarray,
    size: int,
    *,
    vectors: np.ndarray | None = None,
    dedup_threshold: float | None = None,
    block: int = 256,
) -> Selection:
    """Plain global top-N: candidates by score, best first, near-duplicates skipped; candidates
    with a non-finite score (filtered out) are never selected."""
    order = np.argsort(-scores, kind="stable")
    order = order[np.isfinite(scores[order])]
    sel = Selection()
    dedup = _DedupSet(vectors, dedup_threshold, size)
    for start in range(0, len(order), block):
        if len(sel) >= size:
            break
        chunk = [int(c) for c in order[start : start + block]]
        for c, ok in zip(chunk, dedup.filter(chunk), strict=True):
            if not ok:
                sel.dropped_duplicates += 1
            elif len(sel) < size:
                sel.items.append(c)
                sel.owners.append(-1)
                sel.ranks.append(len(sel.items) - 1)
    return sel


# --------------------------------------------------------------------------- candidates


@dataclass
class Candidates:
    """The pool the selection draws from: gallery items (optionally crops of them) with vectors,
    and per query its candidates ranked by score."""

    gallery_ids: np.ndarray  # int64 [m]
    boxes: list[Box | None]  # crop box within the gallery image, None = the whole image
    vectors: np.ndarray  # float32 [m, d]
    scores: np.ndarray  # float32 [m, num_queries]: best cosine to any crop of each query

    def ranked_for(
        self, q: int, allowed: np.ndarray | None = None, min_score: float | None = None
    ) -> np.ndarray:
        s = self.scores[:, q]
        ok = np.isfinite(s)
        if allowed is not None:
            ok &= allowed[:, q] if allowed.ndim == 2 else allowed
        if min_score is not None:
            ok &= s >= min_score
        idx = np.flatnonzero(ok)
        return idx[np.argsort(-s[idx], kind="stable")]


def pool_scores(
    query_vectors: np.ndarray, query_of_row: np.ndarray, cand_vectors: np.ndarray, nq: int
) -> np.ndarray:
    """[m, nq] max cosine of each candidate to any crop vector of each query."""
    sims = cand_vectors @ query_vectors.T  # [m, rows]
    out = np.full((len(cand_vectors), nq), -np.inf, dtype=np.float32)
    for q in range(nq):
        cols = np.flatnonzero(query_of_row == q)
        if len(cols):
            out[:, q] = sims[:, cols].max(axis=1)
    return out


def near_duplicate_mask(
    vectors: np.ndarray, guard: np.ndarray | None, threshold: float, block: int = 8192
) -> np.ndarray:
    """True where a vector has cosine >= threshold with any guard vector."""
    out = np.zeros(len(vectors), dtype=bool)
    if guard is None or len(guard) == 0 or len(vectors) == 0:
        return out
    g = np.asarray(guard, dtype=np.float32)
    for s in range(0, len(vectors), block):
        v = np.asarray(vectors[s : s + block], dtype=np.float32)
        out[s : s + block] = (v @ g.T).max(axis=1) >= threshold
    return out


# --------------------------------------------------------------------------- the transfer set


@dataclass
class TransferSet:
    """The curated transfer set: manifest rows, the queries, and a summary of how it was made."""

    rows: list[dict[str, Any]]
    queries: list[dict[str, Any]]
    summary: dict[str, Any]

    def __len__(self) -> int:
        return len(self.rows)

    def write(
        self, out_dir: str | Path, formats: Sequence[str] = ("jsonl", "csv", "parquet")
    ) -> dict[str, str]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        for fmt in formats:
            files[f"manifest_{fmt}"] = str(write_manifest(self.rows, out / f"manifest.{fmt}"))
        atomic_write_json(out / "queries.json", self.queries)
        atomic_write_json(out / "summary.json", self.summary)
        files["summary"] = str(out / "summary.json")
        return files


MANIFEST_COLUMNS = (
    "id",
    "source",
    "key",
    "box",
    "score",
    "query_id",
    "query_key",
    "query_label",
    "rank",
    "method",
)


def write_manifest(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as .jsonl, .csv (box as x0,y0,x1,y1 columns) or .parquet, by suffix.

    The CSV is the one a person opens in a spreadsheet, so it follows OWASP's rule against CSV
    (formula) injection: a text cell starting with ``= + - @``, TAB or CR (a gallery file named
    ``=HYPERLINK(...).png``) gets a leading single quote, which makes the spreadsheet show it as
    text, and every text cell is quoted. Numbers (a negative score) are written as numbers. Read
    such a key back from the JSONL or Parquet manifest, which keep every value as it is."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return atomic_write_text(path, text)
    if suffix == ".csv":
        import io

        def cell(value: Any) -> Any:
            if value is None:
                return ""
            if isinstance(value, str) and value.startswith(CSV_ESCAPED):
                return "'" + value
            return value

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
        cols = [c for c in MANIFEST_COLUMNS if c != "box"]
        w.writerow([*cols, "x0", "y0", "x1", "y1"])
        for r in rows:
            box = r.get("box") or ["", "", "", ""]
            w.writerow([*(cell(r.get(c)) for c in cols), *box])
        return atomic_write_text(path, buf.getvalue())
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "id": pa.array([int(r["id"]) for r in rows], pa.int64()),
                "source": pa.array([r["source"] for r in rows], pa.string()),
                "key": pa.array([r["key"] for r in rows], pa.string()),
                "box": pa.array([r.get("box") for r in rows], pa.list_(pa.float32())),
                "score": pa.array([r.get("score") for r in rows], pa.float32()),
                "query_id": pa.array([r.get("query_id") for r in rows], pa.int32()),
                "query_key": pa.array([r.get("query_key") for r in rows], pa.string()),
                "query_label": pa.array([r.get("query_label") for r in rows], pa.string()),
                "rank": pa.array([r.get("rank") for r in rows], pa.int32()),
                "method": pa.array([r.get("method") for r in rows], pa.string()),
            }
        )
        return atomic_write(path, lambda f: pq.write_table(table, f))
    raise ConfigError(
        f"manifest {path}: unsupported type {suffix!r}; use one of {', '.join(MANIFEST_SUFFIXES)}"
    )


# A CSV cell starting with one of these gets a leading "'" (OWASP CSV injection; "'" itself too, so
# that reading back is unambiguous: ``csv_unescape`` drops exactly the quote the writer added).
CSV_ESCAPED = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_unescape(value: str) -> str:
    """A manifest CSV cell as it was before ``write_manifest`` neutralised it."""
    return value[1:] if len(value) > 1 and value[0] == "'" and value[1] in "".join(CSV_ESCAPED) else value


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a manifest written by :func:`write_manifest` (any of the three formats)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".csv":
        rows = []
        with path.open(encoding="utf-8", newline="") as fh:
            for r in csv.DictReader(fh):
                box = [r.pop(k) for k in ("x0", "y0", "x1", "y1")]
                out: dict[str, Any] = {k: csv_unescape(v) if isinstance(v, str) else v for k, v in r.items()}
                out["box"] = [float(v) for v in box] if all(box) else None
                for k, typ in (("id", int), ("query_id", int), ("rank", int), ("score", float)):
                    out[k] = typ(out[k]) if out.get(k) not in (None, "") else None
                rows.append(out)
        return rows
    raise ConfigError(
        f"manifest {path}: unsupported type {suffix!r}; use one of {', '.join(MANIFEST_SUFFIXES)}"
    )


# --------------------------------------------------------------------------- curation


def _check(cfg: CurateConfig, gallery: Gallery, nq: int) -> None:
    if gallery.count == 0:
        raise DatasetError(f"gallery {gallery.path} is empty; build it from a source with images")
    if nq == 0:
        raise DatasetError("no labeled query images; upload at least one labeled image per class")
    if cfg.size > gallery.count:
        raise ConfigError(
            f"curate.size={cfg.size} is larger than gallery {gallery.name!r} ({gallery.count} items); "
            f"ask for at most {gallery.count} items or use a bigger gallery"
        )


def teacher_outputs(
    model: ImageClassifier, images: Sequence[Image.Image], batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """A finetuned teacher's L2-normalized pre-head features and softmax probabilities on PIL images."""
    import torch

    from .transforms import EvalTransform

    tf = EvalTransform(model.data_config.input_size)
    model.eval()
    feats, probs = [], []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            x = torch.stack([tf(im) for im in images[s : s + batch_size]])
            f = model.features(x).float().flatten(1)
            logits = model.head(f) if model.head is not None else f
            feats.append(torch.nn.functional.normalize(f, dim=1).numpy())
            probs.append(torch.softmax(logits.float(), dim=1).numpy())
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(feats), np.concatenate(probs)


def _gallery_identity(gallery: Gallery) -> dict[str, Any]:
    """What names a gallery's images and vectors: its folder and a digest of its gallery.json."""
    doc = json.dumps(gallery.doc, sort_keys=True, default=str).encode()
    return {"path": str(gallery.path), "doc": hashlib.sha256(doc).hexdigest()}


def embed_cached(
    cfg: CurateConfig, what: str, desc: dict[str, Any], compute: Callable[[], np.ndarray]
) -> tuple[np.ndarray, bool | None]:
    """``compute()``'s vectors, kept in ``cfg.cache_dir`` (a ``kt_train.cache_store`` store) under a
    key hashing ``what`` and ``desc`` (the encoder and the exact images and crops embedded), so a
    second curation of the same labeled images on the same gallery embeds nothing. Returns
    (vectors, built now); built is None without a cache dir."""
    if not cfg.cache_dir:
        return compute(), None
    root = Path(cfg.cache_dir)
    body = json.dumps({"what": what, "version": 1, **desc}, sort_keys=True, default=str)
    key = hashlib.sha256(body.encode()).hexdigest()[:16]
    path = root / key
    with cache_store.exclusive(root, key):
        built = not (path / "vectors.npy").is_file()
        if built:
            vectors = np.asarray(compute(), dtype=np.float32)
            tmp = root / f"{key}{cache_store.PARTIAL}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            np.save(tmp / "vectors.npy", vectors)
            atomic_write_text(tmp / "key.json", body)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        else:
            vectors = np.load(path / "vectors.npy")
        cache_store.touch(path)
        cache_store.evict(root, cfg.cache_max_bytes)  # this entry's lock is held: it stays
    log.info("curate: %s embeddings %s (%s)", what, "stored" if built else "reused", path)
    return vectors, built


def curate_transfer_set(
    gallery: Gallery,
    labeled: ImageDataset,
    cfg: CurateConfig,
    *,
    encoder: Encoder | None = None,
    guard: Sequence[ImageDataset] = (),
    teacher: ImageClassifier | None = None,
    teacher_classes: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> TransferSet:
    """Curate a transfer set of ``cfg.size`` gallery items for the labeled images ``labeled``.

    ``guard``: further image sets (validation, test) whose near-duplicates must not enter the
    transfer set; the labeled images always are. ``teacher``: a finetuned teacher; with
    ``cfg.teacher_filter`` an item is kept for a query only when the teacher predicts the query's
    class for it (with probability >= ``cfg.teacher_min_prob``).
    """
    from .embed import Encoder

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    say = progress or (lambda msg: log.info("%s", msg))
    nq = len(labeled)
    _check(cfg, gallery, nq)
    if encoder is None:
        spec = (gallery.encoder or {}).get("spec")
        if not spec:
            raise ConfigError(
                f"gallery {gallery.name!r} has no recorded encoder (imported embeddings); pass the encoder "
                f"that made them (curate.encoder / --encoder)"
            )
        encoder = Encoder.from_description(gallery.encoder)
    gallery.check_encoder(encoder)
    classes = list(labeled.classes or [])
    labels = [classes[it.label] if classes else str(it.label) for it in labeled.items]

    # 1. queries: the full image + K crops, embedded with the gallery's encoder
    t = time.perf_counter()
    crop_imgs: list[Image.Image] = []
    query_of_row: list[int] = []
    query_images = [labeled.load_image(i) for i in range(nq)]
    for q, img in enumerate(query_images):
        crop_imgs.append(img)
        query_of_row.append(q)
        for box in crop_boxes(img.width, img.height, cfg.crops, cfg.crop_scales, seed=cfg.seed * 100_003 + q):
            crop_imgs.append(_crop(img, box))
            query_of_row.append(q)
    cached: dict[str, bool] = {}
    if cfg.cache_dir:
        from .teacher_cache import dataset_fingerprint

        qdesc = {
            "encoder": encoder.describe(),
            "images": dataset_fingerprint(labeled),
            "crops": [cfg.crops, list(cfg.crop_scales), cfg.seed],
        }
    else:
        qdesc = {}
    qv, built = embed_cached(cfg, "queries", qdesc, lambda: encoder.encode_images(crop_imgs))
    if built is not None:
        cached["queries"] = built
    qrow = np.asarray(query_of_row)
    timings["embed_queries_s"] = time.perf_counter() - t
    say(f"embedded {nq} queries x {1 + cfg.crops} views")

    # 2. search top-k' per crop; the union of hits is the candidate pool
    t = time.perf_counter()
    quota = max(1, math.ceil(cfg.size / nq))
    k = cfg.k_per_crop or max(50, 4 * quota)
    k = min(k, gallery.count)
    if cfg.method == "random":
        rng = np.random.default_rng(cfg.seed)
        n_draw = min(gallery.count, 2 * cfg.size + 64)
        ids = np.sort(rng.choice(gallery.count, size=n_draw, replace=False)).astype(np.int64)
        ids = rng.permutation(ids)
    else:
        _, hit_ids = gallery.search(qv, k, nprobe=cfg.nprobe, ef_search=cfg.ef_search)
        ids = np.unique(hit_ids[hit_ids >= 0])
    timings["search_s"] = time.perf_counter() - t
    gvec = gallery.vectors(ids)
    boxes: list[Box | None] = [None] * len(ids)
    gids = ids.astype(np.int64)

    # 2b. optional gallery-side crops of the candidates, embedded and added as candidates
    if cfg.gallery_crops and cfg.method != "random":
        t = time.perf_counter()
        pre = pool_scores(qv, qrow, gvec, nq)
        top = np.unique(np.concatenate([np.argsort(-pre[:, q])[: 2 * quota] for q in range(nq)]))
        extra_imgs, extra_ids, extra_boxes = [], [], []
        for ci in top:
            img = gallery.open_image(int(gids[ci]))
            for box in crop_boxes(
                img.width, img.height, cfg.gallery_crops, cfg.crop_scales, seed=int(gids[ci])
            ):
                extra_imgs.append(_crop(img, box))
                extra_ids.append(int(gids[ci]))
                extra_boxes.append(box)
        if extra_imgs:
            cdesc = {
                "encoder": encoder.describe(),
                "gallery": _gallery_identity(gallery),
                "crops": [[i, list(b)] for i, b in zip(extra_ids, extra_boxes, strict=True)],
            }
            cvec, built = embed_cached(cfg, "gallery_crops", cdesc, lambda: encoder.encode_images(extra_imgs))
            if built is not None:
                cached["gallery_crops"] = built
            gvec = np.concatenate([gvec, cvec])
            gids = np.concatenate([gids, np.asarray(extra_ids, np.int64)])
            boxes += extra_boxes
        timings["gallery_crops_s"] = time.perf_counter() - t
    cands = Candidates(gids, boxes, gvec, pool_scores(qv, qrow, gvec, nq))
    say(f"{len(gids)} candidates from {len(ids)} gallery items")

    # 3. leakage guard: nothing near-duplicate to the labeled or evaluation images
    t = time.perf_counter()
    allowed = np.ones(len(gids), dtype=bool)
    leaked = 0
    if cfg.leakage_threshold is not None:
        guard_vecs = [qv[:: 1 + cfg.crops]]  # the full labeled images
        for ds in guard:
            guard_vecs.append(encoder.encode_images([ds.load_image(i) for i in range(len(ds))]))
        bad = near_duplicate_mask(gvec, np.concatenate(guard_vecs), cfg.leakage_threshold)
        leaked = int(bad.sum())
        allowed &= ~bad
    timings["leakage_guard_s"] = time.perf_counter() - t

    # 4. optional teacher: re-rank by similarity in its feature space and/or keep an item for a
    # query only if the teacher assigns it the query's class (one forward pass gives both)
    per_query_ok: np.ndarray | None = None
    teacher_dropped = 0
    if cfg.teacher_filter or cfg.teacher_rerank > 0:
        if teacher is None:
            raise ConfigError(
                "curate.teacher_filter / curate.teacher_rerank need the finetuned teacher: run "
                "finetune_teacher before curate (or pass --teacher to kt curate)"
            )
        t = time.perf_counter()
        tclasses = list(teacher_classes or classes)
        label_idx = np.asarray([tclasses.index(lbl) if lbl in tclasses else -1 for lbl in labels])
        # only the candidates a query could plausibly reach go through the teacher
        reach = np.unique(
            np.concatenate(
                [
                    cands.ranked_for(q, allowed, cfg.min_score)[: cfg.teacher_pool_factor * quota]
                    for q in range(nq)
                ]
            )
        )
        feats, probs = teacher_outputs(
            teacher, [_crop(gallery.open_image(int(gids[c])), boxes[c]) for c in reach]
        )
        reached = np.zeros(len(gids), dtype=bool)
        reached[reach] = True
        allowed &= reached
        if cfg.teacher_rerank > 0:
            tq, _ = teacher_outputs(teacher, crop_imgs)
            cands.scores[reach] += cfg.teacher_rerank * pool_scores(tq, qrow, feats, nq)
            cands.scores[~reached] = -np.inf
        if cfg.teacher_filter:
            pred, conf = probs.argmax(1), probs.max(1)
            per_query_ok = np.zeros((len(gids), nq), dtype=bool)
            per_query_ok[reach] = (pred[:, None] == label_idx[None, :]) & (
                conf[:, None] >= cfg.teacher_min_prob
            )
            per_query_ok &= allowed[:, None]
            teacher_dropped = int(len(reach) - per_query_ok[reach].any(1).sum())
        timings["teacher_s"] = time.perf_counter() - t

    # 5. selection
    t = time.perf_counter()
    mask = per_query_ok if per_query_ok is not None else allowed
    dedup = dict(vectors=cands.vectors, dedup_threshold=cfg.dedup_threshold, num_candidates=len(gids))
    owner_is_query = True
    if cfg.method == "query_balanced":
        ranked = [cands.ranked_for(q, mask, cfg.min_score) for q in range(nq)]
        sel = round_robin_select(ranked, cfg.size, top_up=cfg.top_up, **dedup)  # type: ignore[arg-type]
    elif cfg.method == "class_balanced":
        label_arr = np.asarray(labels)
        groups = sorted(set(labels), key=labels.index)
        ranked = []
        for g in groups:
            qs = np.flatnonzero(label_arr == g)
            s = np.where(mask[:, qs] if mask.ndim == 2 else mask[:, None], cands.scores[:, qs], -np.inf).max(
                1
            )
            if cfg.min_score is not None:
                s = np.where(s >= cfg.min_score, s, -np.inf)
            idx = np.flatnonzero(np.isfinite(s))
            ranked.append(idx[np.argsort(-s[idx], kind="stable")])
        sel = round_robin_select(ranked, cfg.size, top_up=cfg.top_up, **dedup)  # type: ignore[arg-type]
        owner_is_query = False
    else:  # knn, random
        s = np.where(mask if mask.ndim == 2 else mask[:, None], cands.scores, -np.inf).max(1)
        if cfg.min_score is not None and cfg.method == "knn":
            s = np.where(s >= cfg.min_score, s, -np.inf)
        if cfg.method == "random":
            s = np.where(mask.any(1) if mask.ndim == 2 else mask, 0.0, -np.inf)  # keep the random order
            order = np.flatnonzero(np.isfinite(s))
            sel = Selection(
                items=[int(c) for c in order[: cfg.size]], owners=[-1] * min(cfg.size, len(order))
            )
            sel.ranks = list(range(len(sel.items)))
        else:
            sel = global_topn_select(s, cfg.size, vectors=cands.vectors, dedup_threshold=cfg.dedup_threshold)
        owner_is_query = False
    timings["select_s"] = time.perf_counter() - t

    rows: list[dict[str, Any]] = []
    per_rank: dict[int, int] = {}
    label_arr = np.asarray(labels)
    for i, c in enumerate(sel.items):
        if owner_is_query:
            q = sel.owners[i]
        else:  # the query the item is closest to (among those whose filter admits it)
            sc = cands.scores[c]
            if per_query_ok is not None and per_query_ok[c].any():
                sc = np.where(per_query_ok[c], sc, -np.inf)
            if cfg.method == "class_balanced":
                grp = sorted(set(labels), key=labels.index)[sel.owners[i]]
                sc = np.where(label_arr == grp, sc, -np.inf)
            q = int(np.argmax(sc))
        rank = per_rank.get(q, 0)
        per_rank[q] = rank + 1
        meta = gallery.metadata(np.asarray([gids[c]]))[0]
        rows.append(
            {
                "id": int(gids[c]),
                "source": meta["source"],
                "key": meta["key"],
                "box": None if boxes[c] is None else [float(v) for v in boxes[c]],  # type: ignore[union-attr]
                "score": round(float(cands.scores[c, q]), 5),
                "query_id": int(q),
                "query_key": labeled.items[q].key,
                "query_label": labels[q],
                "rank": rank,
                "method": cfg.method,
            }
        )
    queries = [{"query_id": q, "key": labeled.items[q].key, "label": labels[q]} for q in range(nq)]
    per_class: dict[str, int] = {}
    for r in rows:
        per_class[r["query_label"]] = per_class.get(r["query_label"], 0) + 1
    # How full each class's quota got: the equal per-query quotas of its queries against what was
    # selected for them. Floors (min_score, teacher_min_prob) leave quotas unfilled by design when
    # the gallery holds too little of a class; the set is then smaller than asked.
    base_q, extra_q = divmod(cfg.size, nq)
    quota_of: dict[str, int] = {}
    for q, lbl in enumerate(labels):
        quota_of[lbl] = quota_of.get(lbl, 0) + base_q + (1 if q < extra_q else 0)
    per_class_fill = {
        lbl: {
            "quota": quota_of[lbl],
            "selected": per_class.get(lbl, 0),
            "fill": round(min(1.0, per_class.get(lbl, 0) / quota_of[lbl]), 4) if quota_of[lbl] else 1.0,
        }
        for lbl in sorted(quota_of, key=labels.index)
    }
    summary = {
        "method": cfg.method,
        "size_requested": cfg.size,
        "size": len(rows),
        "queries": nq,
        "views_per_query": 1 + cfg.crops,
        "k_per_crop": k,
        "gallery": {"name": gallery.name, "path": str(gallery.path), "count": gallery.count},
        "encoder": encoder.describe(),
        "candidates": len(gids),
        "leakage_dropped": leaked,
        "duplicates_dropped": sel.dropped_duplicates,
        "teacher_filter_dropped": teacher_dropped,
        "per_class": per_class,
        "per_class_fill": per_class_fill,
        "config": cfg.model_dump(mode="json"),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        # with curate.cache_dir: per embedding set, whether it was embedded now (true) or reused
        **({"embeddings_built": cached} if cached else {}),
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    if len(rows) < cfg.size:
        log.warning(
            "curated %d of %d requested items: the candidate pool ran out (raise curate.k_per_crop or "
            "lower curate.min_score / the dedup threshold)",
            len(rows),
            cfg.size,
        )
    return TransferSet(rows, queries, summary)
