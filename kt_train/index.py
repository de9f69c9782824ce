"""FAISS indexes over L2-normalized embeddings (metric: inner product = cosine).

The index type follows the gallery size and a memory budget (``choose_index``): exact ``Flat`` for
small galleries, IVF with fp16 vectors up to a few million, IVF-PQ (compressed codes) beyond or when
memory is short, HNSW only on request. ``build_index`` trains on a random sample and adds in batches,
converting float16 to float32 one batch at a time, so a float16 memmap of 10M vectors never sits in
memory as float32. Search parameters (nprobe, efSearch) go with each call (``search``) and never
mutate the index, which other requests share. ``ShardedIndex`` searches several indexes (one per
gallery shard or machine) as one gallery.

Indexes bigger than RAM (``IndexPlan.on_disk``) are built the autofaiss way, which is also how many
workers build one gallery: ``train_empty_index`` trains the quantizer (and PQ codebooks) once on a
sample; ``add_shard`` adds each shard's vectors to a copy of that empty index with global ids and
saves it (temp file + rename, so a shard redone after a crash replaces its file, never appends);
``merge_shards`` merges the shards' inverted lists into one ``OnDiskInvertedLists`` file
(``faiss.contrib.ondisk.merge_ondisk``: ``<name>.faiss`` + ``<name>.ivfdata``), which
``load_ondisk_index`` memory-maps read-only. Shards made from different trained indexes are refused.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .errors import ConfigError

__all__ = [
    "IVF_KINDS",
    "KINDS",
    "IndexPlan",
    "ShardedIndex",
    "add_shard",
    "build_index",
    "choose_index",
    "default_nprobe",
    "exact_search",
    "is_memory_mapped",
    "load_index",
    "load_ondisk_index",
    "merge_shards",
    "recall_at_k",
    "rerank",
    "save_index",
    "search",
    "train_empty_index",
]

KINDS = ("flat", "hnsw", "ivf_flat", "ivf_pq")
IVF_KINDS = ("ivf_flat", "ivf_pq")  # the kinds that can be trained once, filled per shard and merged on disk
IVFDATA_SUFFIX = ".ivfdata"  # the inverted lists of a merged on-disk index, beside its .faiss file

# Size rules of ``choose_index`` (kind="auto").
FLAT_MAX_N = 50_000  # below this, exact search is fast enough and needs no training
IVF_FLAT_MAX_N = 4_000_000  # above this, fp16 vectors (1 KB each at 512-d) get too big: PQ codes
# From this many lists the coarse quantizer is an HNSW graph: adding 10M vectors must not compare
# each one with all 16k centroids.
HNSW_QUANTIZER_MIN_NLIST = 8192
# From this many lists k-means runs in two levels (sqrt(nlist) x sqrt(nlist) clusters), which costs
# ~2 sqrt(nlist) instead of nlist distances per point and iteration.
TWO_LEVEL_KMEANS_MIN_NLIST = 2048
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 64
PQ_MIN_TRAIN = 1_000  # PQ sub-quantizers have 256 centroids each
IVF_MIN_POINTS_PER_LIST = 39  # faiss' own k-means rule of thumb

_faiss: Any = faiss  # the bundled stubs lack some wrapped classes (SearchParametersHNSW)

Vectors = np.ndarray | Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class IndexPlan:
    """What ``choose_index`` decided: the faiss factory string and the numbers behind it."""

    kind: str  # "flat" | "hnsw" | "ivf_flat" | "ivf_pq"
    factory: str  # faiss.index_factory string, e.g. "IVF4096,SQfp16" or "IVF16384_HNSW32,PQ64"
    nlist: int | None
    pq_m: int | None
    est_bytes: int  # estimated memory of the filled index
    on_disk: bool  # IVF lists should be memory-mapped from disk (see ``load_index(mmap=True)``)
    n: int = 0  # number of vectors the plan was made for (needed to build from chunks)
    dim: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- choosing


def _pow2_round(x: float) -> int:
    """Nearest power of two in log space (4 * sqrt(1M) = 4000 -> 4096; 4 * sqrt(10M) = 12649 -> 16384)."""
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def _pow2_floor(x: float) -> int:
    return 1 << max(0, math.floor(math.log2(max(x, 1.0))))


def _nlist_for(n: int) -> int:
    nlist = _pow2_round(4 * math.sqrt(n))
    # k-means needs ~39 points per centroid; tiny galleries get fewer, fuller lists.
    return max(1, min(nlist, _pow2_floor(n / IVF_MIN_POINTS_PER_LIST)))


def _largest_divisor_at_most(dim: int, target: int) -> int:
    for m in range(max(1, min(target, dim)), 0, -1):
        if dim % m == 0:
            return m
    return 1


def _quantizer_bytes(nlist: int, dim: int) -> int:
    graph = nlist * HNSW_M * 2 * 4 if nlist >= HNSW_QUANTIZER_MIN_NLIST else 0
    return nlist * dim * 4 + graph


def _ivf_factory(nlist: int, codec: str) -> str:
    coarse = f"IVF{nlist}_HNSW{HNSW_M}" if nlist >= HNSW_QUANTIZER_MIN_NLIST else f"IVF{nlist}"
    return f"{coarse},{codec}"


def _estimate(kind: str, n: int, dim: int, nlist: int | None = None, pq_m: int | None = None) -> int:
    ids = 8  # IVF lists store an int64 id per vector
    if kind == "flat":
        return n * dim * 4
    if kind == "hnsw":
        return n * (dim * 4 + int(HNSW_M * 2 * 4 * 1.1))  # level-0 graph + a few upper levels
    assert nlist is not None
    if kind == "ivf_flat":
        return n * (dim * 2 + ids) + _quantizer_bytes(nlist, dim)
    assert pq_m is not None
    return n * (pq_m + ids) + _quantizer_bytes(nlist, dim) + 256 * dim * 4


def choose_index(
    n: int, dim: int, *, memory_budget_bytes: int | None = None, kind: str = "auto"
) -> IndexPlan:
    """Pick the index for ``n`` vectors of ``dim`` dimensions.

    ``auto``: Flat below 50k vectors; IVF with fp16 vectors ("IVF<nlist>,SQfp16") up to 4M when it
    fits the budget; IVF-PQ beyond that or when the budget is too small; HNSW only when asked for.
    nlist ~ 4 sqrt(n) rounded to a power of two, with an HNSW coarse quantizer from 8192 lists.
    PQ uses dim/8 bytes per vector by default; with a budget, the most bytes (up to dim/4) that fit,
    down to dim/32. ``on_disk`` is set when even that exceeds the budget: save the index and load it
    with ``load_index(path, mmap=True)``. Without a budget only the size rules apply.
    """
    if kind not in ("auto", *KINDS):
        raise ConfigError(f"unknown index kind {kind!r}; use one of: auto, {', '.join(KINDS)}")
    if not isinstance(n, (int, np.integer)) or n <= 0:
        raise ConfigError(f"cannot index {n} vectors; a gallery needs at least one embedding")
    if not isinstance(dim, (int, np.integer)) or dim <= 0:
        raise ConfigError(f"embedding dimension must be positive, got {dim}")
    n, dim = int(n), int(dim)
    budget = memory_budget_bytes
    if budget is not None and budget <= 0:
        raise ConfigError(f"memory_budget_bytes must be positive, got {budget}; leave it unset for no limit")

    def fits(est: int) -> bool:
        return budget is None or est <= budget

    if kind == "auto":
        if n < FLAT_MAX_N and fits(_estimate("flat", n, dim)):
            kind = "flat"
        elif n <= IVF_FLAT_MAX_N and fits(_estimate("ivf_flat", n, dim, _nlist_for(n))):
            kind = "ivf_flat"
        else:
            kind = "ivf_pq"

    if kind in ("flat", "hnsw"):
        est = _estimate(kind, n, dim)
        factory = "Flat" if kind == "flat" else f"HNSW{HNSW_M},Flat"
        return IndexPlan(kind, factory, None, None, est, on_disk=False, n=n, dim=dim)

    nlist = _nlist_for(n)
    if kind == "ivf_flat":
        est = _estimate(kind, n, dim, nlist)
        return IndexPlan(
            kind, _ivf_factory(nlist, "SQfp16"), nlist, None, est, on_disk=not fits(est), n=n, dim=dim
        )

    if n < PQ_MIN_TRAIN:
        raise ConfigError(
            f"ivf_pq needs at least {PQ_MIN_TRAIN} vectors to train its codebooks, got {n}; "
            "use kind='flat' (exact and fast at this size)"
        )
    default_m = _largest_divisor_at_most(dim, max(1, dim // 8))
    pq_m = default_m
    if budget is not None:
        candidates = sorted(
            {_largest_divisor_at_most(dim, max(1, dim // f)) for f in (4, 8, 16, 32)}, reverse=True
        )
        fitting = [m for m in candidates if fits(_estimate(kind, n, dim, nlist, m))]
        pq_m = fitting[0] if fitting else default_m
    est = _estimate(kind, n, dim, nlist, pq_m)
    return IndexPlan(kind, _ivf_factory(nlist, f"PQ{pq_m}"), nlist, pq_m, est, not fits(est), n=n, dim=dim)


def default_nprobe(nlist: int) -> int:
    """IVF lists visited when a search names no nprobe: 1/128 of the lists, at least 16 (on
    clustered 512-d data recall@50 >= 0.95 took ~1/256, real embeddings are less clustered)."""
    return max(1, min(nlist, max(16, nlist // 128)))


# --------------------------------------------------------------------------- building


def _batches(chunks: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    for chunk in chunks:
        for start in range(0, len(chunk), size):
            yield chunk[start : start + size]


def _as_float32_rows(x: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ConfigError(f"{what} must be a 2-D array [n, dim], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ConfigError(f"{what} must be float16 or float32, got {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ConfigError(
            f"{what} are {x.shape[1]}-d but the index is {dim}-d; every chunk must come from the same encoder"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_normalized(x: np.ndarray, what: str) -> None:
    if not np.isfinite(x).all():
        raise ConfigError(f"{what} contain NaN or inf; re-embed the images that produced them")
    norms = np.linalg.norm(x, axis=1)
    bad = np.abs(norms - 1.0) > 0.02  # float16 storage alone moves norms by ~1e-3
    if bad.any():
        i = int(np.argmax(bad))
        raise ConfigError(
            f"{what} must be L2-normalized (row {i} has norm {norms[i]:.4g}); "
            "divide each vector by its norm before indexing (metric is cosine = inner product)"
        )


def _two_level_kmeans(x: np.ndarray, nlist: int, seed: int, niter: int = 10) -> np.ndarray:
    """Spherical k-means in two levels: sqrt(nlist) coarse clusters, then each split in proportion
    to its size. Costs ~2 sqrt(nlist) distances per point and iteration instead of nlist, which is
    what makes training 16k lists on a couple of cores take seconds instead of many minutes."""
    n, d = x.shape
    nc1 = max(1, int(math.sqrt(nlist)))
    km = faiss.Kmeans(d, nc1, niter=20, spherical=True, seed=seed, max_points_per_centroid=2000)
    km.train(x)
    _, assign = km.index.search(x, 1)
    assign = assign.ravel()
    sizes = np.bincount(assign, minlength=nc1)
    cum = np.cumsum(sizes)
    per = cum * nlist // cum[-1]
    per[1:] -= per[:-1].copy()
    order = np.argsort(assign, kind="stable")
    starts = np.concatenate([[0], cum[:-1]])
    centroids = []
    for c in range(nc1):
        k = int(min(per[c], sizes[c]))
        if k == 0:
            continue
        sub = x[order[starts[c] : starts[c] + sizes[c]]]
        if k == len(sub):
            centroids.append(sub)
            continue
        km2 = faiss.Kmeans(
            d,
            k,
            niter=niter,
            spherical=True,
            seed=seed + 1 + c,
            max_points_per_centroid=256,
            min_points_per_centroid=1,
        )
        km2.train(sub)
        centroids.append(np.asarray(km2.centroids))
    out = np.concatenate(centroids) if centroids else np.empty((0, d), np.float32)
    if len(out) < nlist:  # a coarse cluster smaller than its share: fill with random training points
        rng = np.random.default_rng(seed)
        out = np.concatenate([out, x[rng.choice(n, nlist - len(out), replace=n < nlist - len(out))]])
    out = out[:nlist].astype(np.float32)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def _train(index: faiss.Index, sample: np.ndarray, seed: int) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
        if ivf.nlist >= TWO_LEVEL_KMEANS_MIN_NLIST and len(sample) >= ivf.nlist:
            centroids = _two_level_kmeans(sample, ivf.nlist, seed)
            ivf.quantizer.reset()
            ivf.quantizer.add(centroids)
            ivf.quantizer.is_trained = True
    index.train(sample)  # with the quantizer filled, faiss trains only the codec (PQ) here


def _set_defaults(index: faiss.Index) -> None:
    """Search defaults stored in the index, set once before anyone shares it."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = default_nprobe(ivf.nlist)
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        hnsw.hnsw.efSearch = HNSW_EF_SEARCH


def _hnsw_of(index: Any) -> Any:
    idx = faiss.downcast_index(index)
    return idx if isinstance(idx, faiss.IndexHNSW) else None


def _sample_from_chunks(
    make_chunks: Callable[[], Iterable[np.ndarray]], n: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """A uniform random sample of ``size`` rows in one pass over chunks whose total is ``n``."""
    wanted = np.sort(rng.choice(n, size=size, replace=False))
    out: np.ndarray | None = None
    start = 0
    for chunk in make_chunks():
        if out is None:
            out = np.empty((size, chunk.shape[1]), np.float32)
        end = start + len(chunk)
        lo, hi = np.searchsorted(wanted, [start, end])
        if hi > lo:
            out[lo:hi] = chunk[wanted[lo:hi] - start]
        start = end
    if start != n or out is None:
        raise ConfigError(
            f"the chunks hold {start} vectors but the plan says n={n}; make the plan with "
            "choose_index(<number of vectors>, dim)"
        )
    return out


def _new_index(plan: IndexPlan, dim: int) -> faiss.Index:
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    ivf = faiss.try_extract_index_ivf(index)
    ivfpq: Any = faiss.downcast_index(ivf) if ivf is not None else None
    if isinstance(ivfpq, faiss.IndexIVFPQ):
        # Polysemous codes serve Hamming pre-filtering, which search() never uses, and training
        # them costs ~10x the PQ itself.
        ivfpq.do_polysemous_training = False  # type: ignore[attr-defined]  # missing from the stubs
    return index


def build_index(
    vectors: Vectors,
    plan: IndexPlan | None = None,
    *,
    kind: str = "auto",
    memory_budget_bytes: int | None = None,
    train_size: int = 262_144,
    seed: int = 0,
    add_batch: int = 262_144,
    progress: Progress | None = None,
) -> faiss.Index:
    """Build a filled index over L2-normalized ``vectors``.

    ``vectors`` is a float16/float32 array [n, d] (an ``np.memmap`` is fine: rows are read and
    converted one batch at a time) or, for galleries built chunk by chunk, an iterable of such chunks
    or a zero-argument callable that returns a fresh iterable each call. Chunks need ``plan`` (it
    gives n and d). A callable is read twice: once for a uniform training sample, once to add;
    a one-shot iterable is trained on a random sample of its first ``train_size`` rows.
    ``progress(done, total)`` is called after each added batch.
    """
    if train_size < 1 or add_batch < 1:
        raise ConfigError("train_size and add_batch must be >= 1")
    rng = np.random.default_rng(seed)
    is_array = isinstance(vectors, np.ndarray)
    if is_array:
        assert isinstance(vectors, np.ndarray)
        if vectors.ndim != 2:
            raise ConfigError(f"vectors must be a 2-D array [n, dim], got shape {vectors.shape}")
        n, dim = vectors.shape
        if plan is None:
            plan = choose_index(n, dim, memory_budget_bytes=memory_budget_bytes, kind=kind)
    else:
        if plan is None or plan.n <= 0 or plan.dim <= 0:
            raise ConfigError(
                "building from chunks needs plan=choose_index(n, dim, ...) so the number of vectors is "
                "known in advance; or pass one [n, dim] array"
            )
        n, dim = plan.n, plan.dim
    if plan.dim and plan.dim != dim:
        raise ConfigError(f"the plan is for {plan.dim}-d vectors but the vectors are {dim}-d")

    index = _new_index(plan, dim)
    needs_training = not index.is_trained

    chunks: Iterable[np.ndarray]
    pending: list[np.ndarray] = []  # one-shot iterables: rows read for training, added first
    if is_array:
        assert isinstance(vectors, np.ndarray)
        arr = vectors
        chunks = (arr[s : s + add_batch] for s in range(0, n, add_batch))
        if needs_training:
            m = min(n, train_size)
            idx = np.sort(rng.choice(n, size=m, replace=False)) if m < n else slice(None)
            sample = _as_float32_rows(arr[idx], dim, "vectors")
    elif callable(vectors):
        make = vectors
        if needs_training:
            sample = _sample_from_chunks(make, n, min(n, train_size), rng)
        chunks = make()
    else:
        it = iter(vectors)
        if needs_training:
            got = 0
            for chunk in it:
                pending.append(chunk)
                got += len(chunk)
                if got >= train_size:
                    break
            head = np.concatenate([np.asarray(c) for c in pending]) if pending else np.empty((0, dim))
            if len(head) > train_size:
                head = head[np.sort(rng.choice(len(head), size=train_size, replace=False))]
            sample = _as_float32_rows(head, dim, "vectors")

        def rest() -> Iterator[np.ndarray]:
            yield from pending
            yield from it

        chunks = rest()

    if needs_training:
        sample = _as_float32_rows(sample, dim, "vectors")
        if len(sample) == 0:
            raise ConfigError("no vectors to index; the gallery has no embeddings yet")
        _check_normalized(sample, "vectors")
        if plan.kind == "ivf_pq" and len(sample) < PQ_MIN_TRAIN:
            raise ConfigError(
                f"ivf_pq needs at least {PQ_MIN_TRAIN} training vectors, got {len(sample)}; use kind='flat'"
            )
        _train(index, sample, seed)
        del sample

    done = 0
    for batch in _batches(chunks, add_batch):
        x = _as_float32_rows(batch, dim, "vectors")
        _check_normalized(x, "vectors")
        index.add(x)
        done += len(x)
        if progress is not None:
            progress(done, n)
    if not is_array and done != n:
        raise ConfigError(
            f"the chunks held {done} vectors but the plan says n={n}; make the plan with "
            "choose_index(<number of vectors>, dim)"
        )
    _set_defaults(index)
    return index


# --------------------------------------------------------------------------- trained once, filled per shard, merged on disk


def train_empty_index(sample: np.ndarray, plan: IndexPlan, *, seed: int = 0) -> faiss.Index:
    """The IVF (or IVF-PQ) index of ``plan``, trained on ``sample`` (L2-normalized rows [m, d],
    float16/float32, e.g. a random sample of the gallery) and holding no vectors: the index every
    shard of a distributed build copies (``add_shard``), so that their lists can be merged."""
    if plan.kind not in IVF_KINDS:
        raise ConfigError(
            f"only IVF indexes ({', '.join(IVF_KINDS)}) can be trained once and filled shard by shard, "
            f"the plan is {plan.kind!r}; plan with kind='ivf_flat' or 'ivf_pq'"
        )
    x = _as_float32_rows(sample, plan.dim or None, "training vectors")
    if len(x) == 0:
        raise ConfigError("no training vectors; the sample of the gallery is empty")
    _check_normalized(x, "training vectors")
    if plan.kind == "ivf_pq" and len(x) < PQ_MIN_TRAIN:
        raise ConfigError(
            f"ivf_pq needs at least {PQ_MIN_TRAIN} training vectors, got {len(x)}; use kind='ivf_flat'"
        )
    index = _new_index(plan, x.shape[1])
    _train(index, x, seed)
    _set_defaults(index)
    return index


def _ivf(index: faiss.Index, what: str) -> Any:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise ConfigError(
            f"{what} is not an IVF index; shards are filled copies of train_empty_index's index"
        )
    return ivf


def add_shard(
    trained: faiss.Index | str | Path,
    vectors: np.ndarray | Iterable[np.ndarray],
    id_start: int,
    out_path: str | Path,
    *,
    add_batch: int = 262_144,
) -> Path:
    """Add ``vectors`` ([n, d] L2-normalized, a memmap is fine, or chunks) to a copy of the empty
    ``trained`` index (the index or its file) with ids ``id_start .. id_start + n - 1`` and save it
    to ``out_path`` (temp file + rename). Ids are a function of the arguments only, so a shard redone
    (a crashed or redelivered task) writes the same file again instead of adding its vectors twice."""
    index = load_index(trained) if isinstance(trained, (str, Path)) else faiss.clone_index(trained)
    ivf = _ivf(index, str(trained) if isinstance(trained, (str, Path)) else "the trained index")
    if index.ntotal:
        raise ConfigError(f"the trained index holds {index.ntotal} vectors already; pass the empty one")
    if id_start < 0:
        raise ConfigError(f"id_start must be >= 0, got {id_start}")
    chunks = (
        (vectors[s : s + add_batch] for s in range(0, len(vectors), add_batch))
        if isinstance(vectors, np.ndarray)
        else _batches(vectors, add_batch)
    )
    next_id = int(id_start)
    for batch in chunks:
        x = _as_float32_rows(batch, ivf.d, "vectors")
        _check_normalized(x, "vectors")
        index.add_with_ids(x, np.arange(next_id, next_id + len(x), dtype=np.int64))
        next_id += len(x)
    return save_index(index, out_path)


def _centroids(index: faiss.Index) -> np.ndarray:
    ivf = _ivf(index, "index")
    return np.asarray(ivf.quantizer.reconstruct_n(0, ivf.nlist))


def merge_shards(trained: str | Path, shard_paths: Sequence[str | Path], out_path: str | Path) -> Path:
    """Merge the inverted lists of ``shard_paths`` (``add_shard`` outputs of the same ``trained``
    index file) into one on-disk index: ``out_path`` (the trained index pointing at its lists) and
    ``out_path`` with suffix ``.ivfdata`` (the lists, ``faiss.contrib.ondisk.merge_ondisk``). Both
    are written in a temp folder beside and renamed into place (lists first), so a reader never sees
    a half-merged index. Load it with ``load_ondisk_index``. Shards trained apart are refused: their
    lists would be searched with the wrong centroids."""
    from faiss.contrib.ondisk import merge_ondisk

    trained, out_path = Path(trained), Path(out_path)
    if not shard_paths:
        raise ConfigError("no shards to merge; add_shard writes one index file per shard")
    index = load_index(trained)
    ivf = _ivf(index, str(trained))
    if index.ntotal:
        raise ConfigError(f"{trained} holds {index.ntotal} vectors; merge into the empty trained index")
    centroids = _centroids(index)
    for shard in shard_paths:
        part = load_index(shard, mmap=True)  # the lists are not read, only the quantizer
        if part.d != index.d or not np.array_equal(_centroids(part), centroids):
            raise ConfigError(
                f"shard {shard} was not filled from {trained} (different trained quantizer); rebuild it "
                "with add_shard from that trained index: lists of indexes trained apart cannot be merged"
            )
        del part
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".merge-{out_path.name}.{os.getpid()}.{time.monotonic_ns()}"
    tmp.mkdir()
    ivfdata = out_path.with_name(out_path.stem + IVFDATA_SUFFIX)
    try:
        tmp_data = tmp / ivfdata.name  # the index records this name; load_ondisk_index looks beside it
        merge_ondisk(index, [str(p) for p in shard_paths], str(tmp_data))
        index.ntotal = ivf.ntotal  # merge_ondisk sets it on the IVF part, which may be wrapped
        faiss.write_index(index, str(tmp / out_path.name))
        del index, ivf
        os.replace(tmp_data, ivfdata)
        os.replace(tmp / out_path.name, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_path


def load_ondisk_index(path: str | Path) -> faiss.Index:
    """A ``merge_shards`` index: its inverted lists are memory-mapped read-only from the
    ``.ivfdata`` file beside ``path`` (found there even when the folder was moved), so only the
    quantizer is in memory and the lists come from disk (the page cache) as searches touch them."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no index file at {path}; build the gallery's index first (kt gallery build)")
    data = path.with_name(path.stem + IVFDATA_SUFFIX)
    if not data.is_file():
        raise ConfigError(f"{path} has no inverted lists file {data.name} beside it; rebuild the index")
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as e:
        raise ConfigError(f"{path} is not a readable on-disk FAISS index ({e}); rebuild the index") from e


def is_memory_mapped(index: faiss.Index) -> bool:
    """Whether ``index``'s inverted lists are memory-mapped from a file (an on-disk index, or one
    read with ``load_index(mmap=True)``) rather than held in memory."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return False
    lists: Any = ivf.invlists
    return lists is not None and isinstance(faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists)


# --------------------------------------------------------------------------- searching


def _as_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise ConfigError(f"queries must be a 2-D array [q, dim], got shape {q.shape}")
    if q.shape[1] != dim:
        raise ConfigError(
            f"gallery embeddings are {dim}-d but the query encoder gives {q.shape[1]}-d; embed queries "
            "with the gallery's encoder (the model named in the gallery's metadata), or rebuild the "
            "gallery with the query encoder"
        )
    if not np.issubdtype(q.dtype, np.floating):
        raise ConfigError(f"queries must be float16 or float32, got {q.dtype}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        raise ConfigError("queries contain NaN or inf; check the query images and the encoder's output")
    return q


def _check_k(k: int, ntotal: int) -> None:
    if ntotal == 0:
        raise ConfigError("the index is empty; add the gallery's embeddings (build_index) before searching")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if k > ntotal:
        raise ConfigError(f"k={k} is more than the {ntotal} vectors in the gallery; ask for k <= {ntotal}")


def _search_params(index: faiss.Index, nprobe: int | None, ef_search: int | None) -> Any:
    if nprobe is not None and nprobe < 1:
        raise ConfigError(f"nprobe must be >= 1, got {nprobe}")
    if ef_search is not None and ef_search < 1:
        raise ConfigError(f"ef_search must be >= 1, got {ef_search}")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        probe = min(ivf.nlist, nprobe if nprobe is not None else ivf.nprobe)
        params = _faiss.SearchParametersIVF()
        params.nprobe = probe
        quantizer = _hnsw_of(ivf.quantizer)
        if quantizer is not None:
            # The coarse HNSW must find the `probe` nearest lists: give it room beyond probe.
            params.quantizer_params = _hnsw_params(max(ef_search or 0, 2 * probe, quantizer.hnsw.efSearch))
        return params
    hnsw = _hnsw_of(index)
    if hnsw is not None and ef_search is not None:
        return _hnsw_params(ef_search)
    return None


def _hnsw_params(ef_search: int) -> Any:
    params = _faiss.SearchParametersHNSW()
    params.efSearch = ef_search
    return params


def search(
    index: faiss.Index | ShardedIndex,
    queries: np.ndarray,
    k: int,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by cosine: scores float32 [q, k] and ids int64 [q, k] (-1 with score -inf where an
    approximate index finds fewer than k). ``nprobe`` / ``ef_search`` apply to this call only (the
    index's own values are the defaults); they are ignored by index types that have no such knob."""
    if isinstance(index, ShardedIndex):
        return index.search(queries, k, nprobe=nprobe, ef_search=ef_search)
    q = _as_queries(queries, index.d)
    _check_k(k, index.ntotal)
    params = _search_params(index, nprobe, ef_search)
    scores, ids = index.search(q, k, params=params)
    ids = ids.astype(np.int64, copy=False)
    scores = scores.astype(np.float32, copy=False)
    scores[ids < 0] = -np.inf
    return scores, ids


class ShardedIndex:
    """Several indexes searched as one gallery: shard ``i`` holds global ids
    ``offset_i .. offset_i + ntotal_i - 1``. Shards are searched in parallel threads (faiss releases
    the GIL) and the per-shard top-k lists merged by score."""

    def __init__(self, shards: Sequence[tuple[faiss.Index, int]]):
        if not shards:
            raise ConfigError("a sharded index needs at least one (index, id_offset) shard")
        dims = {int(ix.d) for ix, _ in shards}
        if len(dims) != 1:
            raise ConfigError(
                f"shards have different dimensions {sorted(dims)}; every shard must be embedded with the same encoder"
            )
        spans = sorted((int(off), int(off) + int(ix.ntotal)) for ix, off in shards)
        if spans[0][0] < 0:
            raise ConfigError("shard id offsets must be >= 0")
        for (a0, a1), (b0, _) in pairwise(spans):
            if b0 < a1:
                raise ConfigError(
                    f"shard id ranges overlap ([{a0}, {a1}) and one starting at {b0}); give each shard "
                    "the offset = number of vectors in the shards before it"
                )
        self.shards: list[tuple[faiss.Index, int]] = [(ix, int(off)) for ix, off in shards]

    @property
    def ntotal(self) -> int:
        return sum(int(ix.ntotal) for ix, _ in self.shards)

    @property
    def d(self) -> int:
        return int(self.shards[0][0].d)

    def search(
        self, queries: np.ndarray, k: int, *, nprobe: int | None = None, ef_search: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        q = _as_queries(queries, self.d)
        _check_k(k, self.ntotal)
        live = [(ix, off) for ix, off in self.shards if ix.ntotal > 0]

        def one(shard: tuple[faiss.Index, int]) -> tuple[np.ndarray, np.ndarray]:
            ix, off = shard
            s, i = search(ix, q, min(k, int(ix.ntotal)), nprobe=nprobe, ef_search=ef_search)
            return s, np.where(i >= 0, i + off, -1)

        if len(live) == 1:
            results = [one(live[0])]
        else:
            with ThreadPoolExecutor(max_workers=min(len(live), os.cpu_count() or 1)) as pool:
                results = list(pool.map(one, live))
        return _merge_topk([r[0] for r in results], [r[1] for r in results], k)


def _merge_topk(scores: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    s = np.concatenate(scores, axis=1)
    i = np.concatenate(ids, axis=1)
    if s.shape[1] > k:
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        s, i = np.take_along_axis(s, part, 1), np.take_along_axis(i, part, 1)
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


# --------------------------------------------------------------------------- files


def save_index(index: faiss.Index, path: str | Path) -> Path:
    """Write ``index`` to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_index(path: str | Path, *, mmap: bool = False) -> faiss.Index:
    """Read an index. ``mmap=True`` maps the IVF lists from the file instead of reading them into
    memory (for indexes bigger than RAM); the file must then stay in place while the index is used."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no index file at {path}; build the gallery's index first (kt gallery build)")
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
    except RuntimeError as e:
        raise ConfigError(f"{path} is not a readable FAISS index ({e}); rebuild the index") from e


# --------------------------------------------------------------------------- exact search, recall


def exact_search(
    vectors: np.ndarray | Iterable[np.ndarray], queries: np.ndarray, k: int, *, block: int = 65_536
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` inner products over ``vectors`` ([n, d] float16/float32, memmap OK, or
    an iterable of such chunks), read ``block`` rows at a time in float32. Ground truth for recall,
    and the search of small galleries."""
    if block < 1:
        raise ConfigError(f"block must be >= 1, got {block}")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    chunks = (
        (vectors[s : s + block] for s in range(0, len(vectors), block))
        if isinstance(vectors, np.ndarray)
        else _batches(vectors, block)
    )
    q: np.ndarray | None = None
    best_s: np.ndarray | None = None
    best_i: np.ndarray | None = None
    offset = 0
    for chunk in chunks:
        x = _as_float32_rows(chunk, None, "vectors")
        if q is None:
            q = _as_queries(queries, x.shape[1])
        elif x.shape[1] != q.shape[1]:
            raise ConfigError("all chunks must have the same dimension")
        kk = min(k, len(x))
        s, i = faiss.knn(q, x, kk, metric=faiss.METRIC_INNER_PRODUCT)
        i = i.astype(np.int64) + offset
        offset += len(x)
        if best_s is None or best_i is None:
            best_s, best_i = s, i
        else:
            best_s, best_i = _merge_topk([best_s, s], [best_i, i], k)
    if best_s is None or best_i is None:
        raise ConfigError("exact_search got no vectors; the gallery is empty")
    if offset < k:
        raise ConfigError(f"k={k} is more than the {offset} vectors searched; ask for k <= {offset}")
    return best_s.astype(np.float32, copy=False), best_i


def rerank(
    vectors: np.ndarray, queries: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores for candidate ``ids`` [q, k'] (e.g. an IVF-PQ search with k' = 4k) from the
    gallery's stored vectors ([n, d] float16/float32, a memmap is fine: only candidate rows are
    read), and the top-``k`` of them. Buys back the recall PQ codes lose, at the cost of reading
    q * k' rows. -1 candidates stay last with score -inf."""
    cand = np.asarray(ids)
    if cand.ndim != 2:
        raise ConfigError(f"ids must be a 2-D array [q, k'], got shape {cand.shape}")
    q = _as_queries(queries, vectors.shape[1])
    if len(q) != len(cand):
        raise ConfigError(f"{len(q)} queries but {len(cand)} rows of candidate ids")
    if not 1 <= k <= cand.shape[1]:
        raise ConfigError(f"k must be between 1 and the {cand.shape[1]} candidates per query, got {k}")
    if cand.size and cand.max() >= len(vectors):
        raise ConfigError(
            f"candidate id {int(cand.max())} is outside the {len(vectors)} stored vectors; "
            "rerank with the vectors the index was built from"
        )
    scores = np.full(cand.shape, -np.inf, np.float32)
    valid = cand >= 0
    # One query at a time: gathering its k' rows and a mat-vec stays in cache, and beats both a
    # [block, k', d] gather and a unique-rows gather by ~2x.
    for r in range(len(q)):
        ok = valid[r]
        rows = np.asarray(vectors[cand[r][ok]], dtype=np.float32)
        scores[r, ok] = rows @ q[r]
    return _merge_topk([scores], [np.where(valid, cand, -1).astype(np.int64)], k)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / k (k = number of columns of ``exact_ids``)."""
    a = np.asarray(approx_ids)
    e = np.asarray(exact_ids)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise ConfigError(
            f"recall_at_k needs two [q, k] id arrays with the same q, got {a.shape} and {e.shape}"
        )
    if e.shape[1] == 0 or e.shape[0] == 0:
        raise ConfigError("recall_at_k needs at least one query and k >= 1")
    hits = np.zeros(a.shape[0], dtype=np.int64)
    # Chunked so that [q, ka, ke] comparisons stay small.
    step = max(1, 4_000_000 // max(1, a.shape[1] * e.shape[1]))
    for s in range(0, a.shape[0], step):
        aa, ee = a[s : s + step], e[s : s + step]
        match = (aa[:, :, None] == ee[:, None, :]) & (ee[:, None, :] >= 0)
        hits[s : s + step] = match.any(axis=1).sum(axis=1)
    return float(np.mean(hits / e.shape[1]))
