"""Smoke test of bench/retrieval/scale_ondisk.py (BENCHMARKS.md §2(c), issue 16 part 5) at 10k
32-d vectors: the vectors are a pure function of (seed, id); a gallery is trained once, filled shard
by shard by worker processes, merged on disk, searched memory-mapped, re-ranked from regenerated
vectors and checked against exact search; the results land beside ``--out`` only."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.service.conftest import flushed_redis

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench" / "retrieval"


@pytest.fixture(scope="module")
def so() -> ModuleType:
    sys.path.insert(0, str(BENCH_DIR))
    import scale_ondisk

    return scale_ondisk


def test_vectors_are_a_function_of_seed_and_id(so: ModuleType) -> None:
    g = so.SynthVectors(64, centers=50, groups=5, seed=3)
    ids = np.arange(5000)
    a = g.rows(ids)
    assert np.array_equal(a, np.concatenate(list(g.chunks(0, 5000, rows=777))))
    some = np.random.default_rng(0).permutation(5000)[:300]
    assert np.array_equal(a[some], g.rows(some))  # any ids, any order: the same rows
    assert np.array_equal(a, so.SynthVectors(64, centers=50, groups=5, seed=3).rows(ids))
    assert not np.array_equal(a, so.SynthVectors(64, centers=50, groups=5, seed=4).rows(ids))
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    # clustered: each vector is closest to its own (hashed) cluster center
    assert ((a @ g.c.T).argmax(axis=1) == g.labels(ids)).mean() > 0.95


def test_a_small_on_disk_gallery_end_to_end(so: ModuleType, tmp_path: Path) -> None:
    """In a local process pool (no broker)."""
    res = tmp_path / "res"
    res.mkdir()
    other = {"n": 10_000, "benchmark": "bench/retrieval/scale.py", "curate_s": 1.0}
    (res / "retrieval.json").write_text(json.dumps({"real": {"x": 1}, "scale": {"10k": other}}))
    work = tmp_path / "work"
    args = ["--sizes", "10k", "--dim", "32", "--centers", "100", "--groups", "10", "--kind", "ivf_pq"]
    args += ["--executor", "pool", "--workers", "2", "--threads", "1", "--query-images", "40"]
    args += ["--nprobe", "8,16", "--rerank", "4", "--work-dir", str(work), "--out", str(res / "r.json")]
    assert so.main(args) == 0

    e = json.loads((res / "r.json").read_text())["scale"]["10k"]
    assert e["n"] == 10_000 and e["kind"] == "ivf_pq" and e["on_disk"]
    assert e["recall_at_50"] >= 0.9 and e["recall_queries"] == 100
    assert e["shards"] == 4 and sum(s["count"] for s in e["shard_timings"]) == 10_000
    assert os.getpid() not in {s["pid"] for s in e["shard_timings"]}  # the shards ran in the workers
    for key in ("peak_rss_gb", "disk_bytes", "curate_s", "build_s", "bytes_per_vector", "curate_cold_s"):
        assert e[key] > 0, key
    assert e["build_s"] >= e["train_s"] + e["merge_s"]
    assert e["lists"]["max_list"] > 0 and any(r["used"] for r in e["sweep"])
    assert not work.joinpath("n10k_d32_s0").exists()  # removed without --keep
    md = (res / "r.md").read_text()
    assert "regeneration stands in for reading" in md and "| 10k |" in md

    # merged beside --out: scale_ondisk always; scale only where no other benchmark's entry is
    doc = json.loads((res / "retrieval.json").read_text())
    assert doc["real"] == {"x": 1} and doc["scale"]["10k"] == other
    assert doc["scale_ondisk"]["10k"]["recall_at_50"] == e["recall_at_50"]
    so.merge_into_retrieval(res / "retrieval.json", {"20k": e})
    assert json.loads((res / "retrieval.json").read_text())["scale"]["20k"]["n"] == 10_000


def test_two_celery_workers_on_redis_take_the_shards(so: ModuleType, tmp_path: Path) -> None:
    """The default executor: the script starts two Celery workers on Redis and sends the canvas
    chain(train, chord(group(shards), merge)); both workers add shards."""
    url = os.environ.get("KT_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")  # the worker tests' db
    with flushed_redis(url):
        args = ["--sizes", "8k", "--dim", "32", "--centers", "100", "--groups", "10", "--kind", "ivf_pq"]
        args += ["--executor", "celery", "--broker", url, "--workers", "2", "--threads", "1"]
        args += ["--query-images", "20", "--nprobe", "16", "--rerank", "4", "--work-dir", str(tmp_path / "w")]
        assert so.main([*args, "--out", str(tmp_path / "res" / "r.json"), "--no-retrieval-json"]) == 0
    e = json.loads((tmp_path / "res" / "r.json").read_text())["scale"]["8k"]
    assert "Celery" in e["executor"] and e["recall_at_50"] >= 0.9
    assert len({s["pid"] for s in e["shard_timings"]}) == 2
    assert not (tmp_path / "res" / "retrieval.json").exists()
