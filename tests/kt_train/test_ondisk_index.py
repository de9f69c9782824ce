"""On-disk IVF (issue 16 part 2): a quantizer trained once, shards filled with global ids, their lists
merged into one ``OnDiskInvertedLists`` file and memory-mapped by searches; the same results as the
in-RAM IVF index with the same trained quantizer."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import faiss
import numpy as np
import pytest

from kt_train import index as ix
from kt_train.errors import ConfigError
from kt_train.gallery import Gallery, import_embeddings

N, D = 20_000, 32


def unit(rows: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq"])
def test_merged_on_disk_index_equals_the_in_ram_one(kind: str, tmp_path: Path) -> None:
    x = unit(N)
    plan = ix.choose_index(N, D, kind=kind)
    trained = ix.train_empty_index(x[:8000], plan)
    trained_path = ix.save_index(trained, tmp_path / "trained.faiss")
    in_ram = faiss.clone_index(trained)
    in_ram.add_with_ids(x, np.arange(N, dtype=np.int64))

    bounds = [0, 7000, 13000, N]  # shards of unequal sizes, added out of order
    parts = [
        ix.add_shard(trained_path, x[a:b], a, tmp_path / "parts" / f"{k}.faiss")
        for k, (a, b) in reversed(list(enumerate(pairwise(bounds))))
    ]
    merged = ix.merge_shards(trained_path, parts, tmp_path / "out" / "merged.faiss")
    assert merged.with_suffix(".ivfdata").is_file() and not list((tmp_path / "out").glob(".merge-*"))
    moved = tmp_path / "moved"
    (tmp_path / "out").rename(moved)  # the lists are found beside the index wherever it goes

    disk = ix.load_ondisk_index(moved / "merged.faiss")
    assert disk.ntotal == N and ix.is_memory_mapped(disk) and not ix.is_memory_mapped(in_ram)
    assert str(moved / "merged.ivfdata") in mapped_files()

    q = unit(100, seed=1)
    exact = ix.exact_search(x, q, 10)[1]
    for nprobe in (1, 8):  # per call, as for any index
        s_ram, i_ram = ix.search(in_ram, q, 10, nprobe=nprobe)
        s_disk, i_disk = ix.search(disk, q, 10, nprobe=nprobe)
        assert np.array_equal(i_ram, i_disk) and np.allclose(s_ram, s_disk)
        assert ix.recall_at_k(i_disk, exact) == ix.recall_at_k(i_ram, exact)
    assert ix.recall_at_k(ix.search(disk, q, 10, nprobe=8)[1], exact) > ix.recall_at_k(
        ix.search(disk, q, 10, nprobe=1)[1], exact
    )
    assert faiss.extract_index_ivf(disk).nprobe == ix.default_nprobe(plan.nlist or 1)  # not mutated


def test_a_shard_added_twice_does_not_duplicate_ids(tmp_path: Path) -> None:
    x = unit(3000)
    plan = ix.choose_index(3000, D, kind="ivf_flat")
    trained = ix.save_index(ix.train_empty_index(x, plan), tmp_path / "trained.faiss")
    first = ix.add_shard(trained, x[:1000], 0, tmp_path / "p0.faiss")
    ix.add_shard(trained, x[1000:], 1000, tmp_path / "p1.faiss")
    ix.add_shard(trained, x[:1000], 0, tmp_path / "p0.faiss")  # redelivered: redone, replaced
    assert first == tmp_path / "p0.faiss" and not list(tmp_path.glob(".*.tmp"))
    disk = ix.load_ondisk_index(
        ix.merge_shards(trained, [first, tmp_path / "p1.faiss"], tmp_path / "m.faiss")
    )
    assert disk.ntotal == 3000
    _, ids = ix.search(disk, x[:50], 1, nprobe=plan.nlist)
    assert np.array_equal(ids[:, 0], np.arange(50))


def test_shards_from_another_trained_index_are_refused(tmp_path: Path) -> None:
    x = unit(3000)
    plan = ix.choose_index(3000, D, kind="ivf_flat")
    a = ix.save_index(ix.train_empty_index(x, plan, seed=0), tmp_path / "a.faiss")
    b = ix.save_index(ix.train_empty_index(x[::-1].copy(), plan, seed=5), tmp_path / "b.faiss")
    pa = ix.add_shard(a, x[:1500], 0, tmp_path / "pa.faiss")
    pb = ix.add_shard(b, x[1500:], 1500, tmp_path / "pb.faiss")
    with pytest.raises(ConfigError, match="different trained quantizer"):
        ix.merge_shards(a, [pa, pb], tmp_path / "m.faiss")
    assert not (tmp_path / "m.faiss").exists()
    with pytest.raises(ConfigError, match="only IVF"):
        ix.train_empty_index(x, ix.choose_index(3000, D, kind="flat"))


def test_a_gallery_over_its_memory_budget_gets_one_memory_mapped_index(tmp_path: Path) -> None:
    x = unit(N)
    emb, meta = tmp_path / "emb", tmp_path / "meta"
    emb.mkdir()
    meta.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    for k, (a, b) in enumerate([(0, 12000), (12000, N)]):
        np.save(emb / f"img_emb_{k}.npy", x[a:b].astype(np.float16))
        pq.write_table(pa.table({"key": [f"{i}.jpg" for i in range(a, b)]}), meta / f"metadata_{k}.parquet")
    budget = 200_000  # below even the smallest IVF-PQ codes of 20k vectors: on disk
    assert ix.choose_index(N, D, memory_budget_bytes=budget).on_disk
    g = import_embeddings(emb, meta, tmp_path / "g", memory_budget_bytes=budget)
    doc = g.doc["index"]
    assert doc["on_disk"]["path"] == "index/merged.faiss" and doc["shards"] == []
    assert not (tmp_path / "g" / "index" / "parts").exists() or not any(
        (tmp_path / "g" / "index" / "parts").iterdir()
    )

    opened = Gallery.open(tmp_path / "g")
    q = x[[5, 12345, 19999]]
    _, ids = opened.search(q, 5, nprobe=64)
    assert list(ids[:, 0]) == [5, 12345, 19999]
    assert ix.is_memory_mapped(opened._sharded_index().shards[0][0])
    assert str(tmp_path / "g" / "index" / "merged.ivfdata") in mapped_files()

    from service.admin import gallery_index_kind

    assert gallery_index_kind(opened.doc) == "ivf_pq (on disk)"
