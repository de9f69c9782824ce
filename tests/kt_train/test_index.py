"""kt_train.index: index choice, building each kind, per-call search parameters, shards, files, errors."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import faiss
import numpy as np
import pytest

from kt_train import index as ix
from kt_train.errors import ConfigError, KTError
from kt_train.index import (
    IndexPlan,
    ShardedIndex,
    build_index,
    choose_index,
    exact_search,
    load_index,
    recall_at_k,
    rerank,
    save_index,
    search,
)

D = 32
GB = 1 << 30


def clustered(n: int, d: int = D, centers: int = 100, noise: float = 0.6, seed: int = 0) -> np.ndarray:
    """L2-normalized points around random centers (neighbours mostly share a cluster)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, centers, n)] + rng.standard_normal((n, d)).astype(np.float32) * noise / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(8_000)


@pytest.fixture(scope="module")
def built(data: np.ndarray) -> dict[str, faiss.Index]:
    """One index of each kind over ``data``, built once for the module (IVF-PQ with a budget roomy
    enough for dim/4 bytes per vector)."""
    return {kind: build_index(data, kind=kind, memory_budget_bytes=GB) for kind in ix.KINDS}


# --------------------------------------------------------------------------- choose_index


def test_small_gallery_is_flat() -> None:
    plan = choose_index(10_000, 512)
    assert plan.kind == "flat" and plan.factory == "Flat" and plan.nlist is None
    assert plan.est_bytes == 10_000 * 512 * 4 and not plan.on_disk


def test_1m_that_fits_the_budget_is_ivf_flat() -> None:
    plan = choose_index(1_000_000, 512, memory_budget_bytes=4 * GB)
    assert plan.kind == "ivf_flat"
    assert plan.nlist == 4096 and plan.factory == "IVF4096,SQfp16"
    assert 1_000_000 * 1024 < plan.est_bytes < 4 * GB and not plan.on_disk
    assert choose_index(1_000_000, 512).kind == "ivf_flat"  # no budget: the size rule alone


def test_1m_with_a_small_budget_is_ivf_pq_that_fits() -> None:
    plan = choose_index(1_000_000, 512, memory_budget_bytes=200 * 2**20)
    assert plan.kind == "ivf_pq" and plan.pq_m is not None
    assert plan.est_bytes <= 200 * 2**20 and not plan.on_disk
    assert plan.factory == f"IVF4096,PQ{plan.pq_m}"
    # A larger budget buys more PQ bytes per vector (better recall).
    roomy = choose_index(1_000_000, 512, memory_budget_bytes=1 * GB, kind="ivf_pq")
    assert roomy.pq_m == 128


def test_20m_is_ivf_pq_with_hnsw_quantizer() -> None:
    plan = choose_index(20_000_000, 512)
    assert plan.kind == "ivf_pq" and plan.nlist == 16384 and plan.pq_m == 64
    assert plan.factory == "IVF16384_HNSW32,PQ64"
    tiny = choose_index(20_000_000, 512, memory_budget_bytes=100 * 2**20)
    assert tiny.kind == "ivf_pq" and tiny.on_disk  # even the compressed codes exceed the budget


def test_explicit_kind_is_honored() -> None:
    assert choose_index(1_000, 64, kind="hnsw").factory == "HNSW32,Flat"
    assert choose_index(20_000_000, 64, kind="flat").kind == "flat"
    assert choose_index(5_000, 64, kind="ivf_pq").kind == "ivf_pq"
    plan = choose_index(5_000, 64, kind="ivf_flat")
    assert plan.kind == "ivf_flat" and plan.nlist is not None and plan.nlist * 39 <= 5_000
    d = plan.to_dict()
    assert json.loads(json.dumps(d))["factory"] == plan.factory and d["n"] == 5_000


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((1000, 64), {"kind": "annoy"}, "auto, flat, hnsw, ivf_flat, ivf_pq"),
        ((0, 64), {}, "at least one"),
        ((100, 0), {}, "dimension"),
        ((100, 64), {"memory_budget_bytes": 0}, "memory_budget_bytes"),
        ((500, 64), {"kind": "ivf_pq"}, "kind='flat'"),
    ],
)
def test_bad_choices_raise_config_error(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        choose_index(*args, **kwargs)


# --------------------------------------------------------------------------- building and searching


@pytest.mark.parametrize("kind", ix.KINDS)
def test_each_kind_finds_the_querys_own_vector(kind: str, data: np.ndarray, built: dict) -> None:
    index = built[kind]
    assert index.ntotal == len(data) and index.d == D
    q = data[:200]
    scores, ids = search(index, q, 10, nprobe=16)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (200, 10)
    assert (ids[:, 0] == np.arange(200)).mean() >= (0.9 if kind == "ivf_pq" else 1.0)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # sorted, best first
    _, exact = exact_search(data, q, 10)
    recall = recall_at_k(ids, exact)
    assert recall >= {"flat": 1.0, "hnsw": 0.95, "ivf_flat": 0.9, "ivf_pq": 0.5}[kind], recall


def test_ivf_pq_with_rerank_recovers_recall(data: np.ndarray, built: dict) -> None:
    q = data[:200]
    _, exact = exact_search(data, q, 10)
    _, cand = search(built["ivf_pq"], q, 40, nprobe=16)
    scores, ids = rerank(data.astype(np.float16), q, cand, 10)
    assert recall_at_k(ids, exact) >= 0.9
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_nprobe_is_per_call_and_leaves_the_index_alone(data: np.ndarray, built: dict) -> None:
    index = built["ivf_flat"]
    ivf = faiss.extract_index_ivf(index)
    before = ivf.nprobe
    assert before == ix.default_nprobe(ivf.nlist)
    q = data[:300]
    _, exact = exact_search(data, q, 10)
    _, one = search(index, q, 10, nprobe=1)
    _, all_lists = search(index, q, 10, nprobe=ivf.nlist)
    assert not np.array_equal(one, all_lists)
    assert recall_at_k(one, exact) < recall_at_k(all_lists, exact)
    assert recall_at_k(all_lists, exact) >= 0.99
    assert ivf.nprobe == before
    _, default = search(index, q, 10)
    assert np.array_equal(default, search(index, q, 10, nprobe=before)[1])


def test_concurrent_searches_with_different_nprobe(data: np.ndarray, built: dict) -> None:
    """Requests that share one index, each with its own nprobe, get what they would get alone."""
    from concurrent.futures import ThreadPoolExecutor

    index = built["ivf_flat"]
    q = data[:100]
    probes = [1, 2, 4, 8, 16, 32] * 3
    alone = {p: search(index, q, 10, nprobe=p)[1] for p in set(probes)}
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(lambda p: search(index, q, 10, nprobe=p)[1], probes))
    for p, ids in zip(probes, together, strict=True):
        assert np.array_equal(ids, alone[p])


def test_ef_search_is_per_call(data: np.ndarray, built: dict) -> None:
    index = built["hnsw"]
    ef = faiss.downcast_index(index).hnsw.efSearch
    _, a = search(index, data[:50], 10, ef_search=200)
    assert faiss.downcast_index(index).hnsw.efSearch == ef
    assert (a[:, 0] == np.arange(50)).all()


def test_hnsw_quantizer_and_two_level_kmeans(monkeypatch: pytest.MonkeyPatch, data: np.ndarray) -> None:
    """The big-gallery code paths, at small scale: an HNSW coarse quantizer, trained in two levels."""
    monkeypatch.setattr(ix, "TWO_LEVEL_KMEANS_MIN_NLIST", 16)
    plan = IndexPlan("ivf_flat", "IVF64_HNSW32,SQfp16", 64, None, 0, False, n=len(data), dim=D)
    index = build_index(data, plan)
    q = data[:200]
    _, exact = exact_search(data, q, 10)
    _, ids = search(index, q, 10, nprobe=16)
    assert recall_at_k(ids, exact) >= 0.9
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    assert isinstance(quantizer, faiss.IndexHNSW) and quantizer.ntotal == 64


def test_float16_vectors_and_queries(data: np.ndarray, built: dict) -> None:
    half = data.astype(np.float16)
    index = build_index(half, kind="ivf_flat")
    scores, ids = search(index, half[:100], 5, nprobe=16)
    assert scores.dtype == np.float32 and (ids[:, 0] == np.arange(100)).all()
    s32, _ = search(built["flat"], data[:100], 5)
    s16, _ = search(built["flat"], half[:100], 5)
    assert np.allclose(s16, s32, atol=2e-3)


def test_chunked_build_equals_array_build_for_flat(data: np.ndarray, built: dict) -> None:
    chunks = [data[i : i + 1500] for i in range(0, len(data), 1500)]
    plan = choose_index(len(data), D)
    calls: list[tuple[int, int]] = []
    from_iter = build_index(iter(chunks), plan, add_batch=1000, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (len(data), len(data)) and len(calls) > len(chunks)
    q = data[:100]
    s_a, i_a = search(built["flat"], q, 10)
    s_c, i_c = search(from_iter, q, 10)
    assert np.array_equal(i_a, i_c) and np.allclose(s_a, s_c)


def test_chunked_build_of_an_ivf_index(data: np.ndarray) -> None:
    plan = choose_index(len(data), D, kind="ivf_flat")
    chunks = lambda: (data[i : i + 3000].astype(np.float16) for i in range(0, len(data), 3000))  # noqa: E731
    index = build_index(chunks, plan, train_size=4000)
    assert index.ntotal == len(data)
    _, ids = search(index, data[:100], 1, nprobe=16)
    assert (ids[:, 0] == np.arange(100)).all()
    one_shot = build_index(chunks(), plan, train_size=4000)  # trained on the first rows it reads
    assert one_shot.ntotal == len(data)
    with pytest.raises(ConfigError, match="plan"):
        build_index(chunks)
    with pytest.raises(ConfigError, match="n=9000"):
        build_index(chunks, choose_index(9000, D, kind="ivf_flat"))


def test_unnormalized_or_nan_vectors_are_refused(data: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="L2-normalized"):
        build_index(data * 3)
    bad = data.copy()
    bad[5, 0] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        build_index(bad)


# --------------------------------------------------------------------------- shards


def test_sharded_search_equals_unsharded(data: np.ndarray, built: dict) -> None:
    bounds = [0, 2000, 5500, len(data)]  # uneven shards
    shards = [(build_index(data[a:b]), a) for a, b in pairwise(bounds)]
    sharded = ShardedIndex(shards)
    assert sharded.ntotal == len(data) and sharded.d == D
    q = data[[0, 2500, 7000, 7999, 1999, 2000]]
    s_full, i_full = search(built["flat"], q, 20)
    s_sh, i_sh = sharded.search(q, 20)
    assert np.array_equal(i_full, i_sh) and np.allclose(s_full, s_sh, atol=1e-6)
    assert list(i_sh[:, 0]) == [0, 2500, 7000, 7999, 1999, 2000]  # global ids
    _, i_fn = search(sharded, q, 20, nprobe=4)  # search() takes a ShardedIndex too
    assert np.array_equal(i_fn, i_sh)
    # k larger than the smallest shard still works.
    assert sharded.search(q, 2500)[1].shape == (6, 2500)


def test_sharded_ivf_search_uses_per_call_nprobe(data: np.ndarray) -> None:
    halves = [
        (build_index(data[:4000], kind="ivf_flat"), 0),
        (build_index(data[4000:], kind="ivf_flat"), 4000),
    ]
    sharded = ShardedIndex(halves)
    q = data[::80]
    _, ids = sharded.search(q, 10, nprobe=64)
    _, exact = exact_search(data, q, 10)
    assert recall_at_k(ids, exact) >= 0.99


def test_bad_shards() -> None:
    a = faiss.IndexFlatIP(D)
    a.add(clustered(10))
    with pytest.raises(ConfigError, match="overlap"):
        ShardedIndex([(a, 0), (a, 5)])
    with pytest.raises(ConfigError, match="dimensions"):
        ShardedIndex([(a, 0), (faiss.IndexFlatIP(8), 10)])
    with pytest.raises(ConfigError, match="at least one"):
        ShardedIndex([])


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_pq"])
@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(kind: str, mmap: bool, tmp_path: Path, data: np.ndarray, built: dict) -> None:
    path = save_index(built[kind], tmp_path / "g" / "index.faiss")
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    loaded = load_index(path, mmap=mmap)
    q = data[:50]
    s0, i0 = search(built[kind], q, 10, nprobe=8)
    s1, i1 = search(loaded, q, 10, nprobe=8)
    assert np.array_equal(i0, i1) and np.allclose(s0, s1)
    ivf = faiss.try_extract_index_ivf(loaded)
    if ivf is not None:
        assert ivf.nprobe == faiss.extract_index_ivf(built[kind]).nprobe  # the default travels with it
        if mmap:
            assert "OnDisk" in type(faiss.downcast_InvertedLists(ivf.invlists)).__name__


def test_load_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no index file"):
        load_index(tmp_path / "missing.faiss")
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(ConfigError, match="rebuild"):
        load_index(tmp_path / "junk.faiss")


# --------------------------------------------------------------------------- errors


def test_search_errors_name_the_fix(built: dict) -> None:
    index = built["flat"]
    with pytest.raises(
        ConfigError, match=r"gallery embeddings are 32-d but the query encoder gives 16-d.*encoder"
    ):
        search(index, np.ones((2, 16), np.float32), 5)
    with pytest.raises(ConfigError, match=r"k=8001 .* 8000 vectors"):
        search(index, clustered(2), 8001)
    with pytest.raises(ConfigError, match="k must be >= 1"):
        search(index, clustered(2), 0)
    with pytest.raises(ConfigError, match="empty"):
        search(faiss.IndexFlatIP(D), clustered(2), 1)
    nan = clustered(2)
    nan[1, 3] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        search(index, nan, 1)
    with pytest.raises(ConfigError, match="nprobe"):
        search(built["ivf_flat"], clustered(2), 1, nprobe=0)
    assert issubclass(ConfigError, KTError)


def test_single_query_vector(built: dict, data: np.ndarray) -> None:
    scores, ids = search(built["flat"], data[7], 3)
    assert ids.shape == (1, 3) and ids[0, 0] == 7 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------- exact search, recall


def test_exact_search_matches_numpy(data: np.ndarray) -> None:
    q = clustered(37, seed=3)
    ref = q @ data.T
    want = np.argsort(-ref, axis=1)[:, :15]
    for vectors in (data, data.astype(np.float16), [data[:3000], data[3000:]]):
        scores, ids = exact_search(vectors, q, 15, block=1000)
        assert scores.shape == (37, 15)
        if isinstance(vectors, np.ndarray) and vectors.dtype == np.float16:
            assert recall_at_k(ids, want) >= 0.95
        else:
            assert np.array_equal(ids, want)
            assert np.allclose(scores, np.take_along_axis(ref, want, 1), atol=1e-5)
    with pytest.raises(ConfigError, match="k=9000"):
        exact_search(data, q, 9000)


def test_recall_at_k() -> None:
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert recall_at_k(exact, exact) == 1.0
    assert recall_at_k(np.array([[4, 3, 9, -1], [8, 0, 0, 0]]), exact) == pytest.approx((2 / 4 + 1 / 4) / 2)
    with pytest.raises(ConfigError):
        recall_at_k(exact[:1], exact)
