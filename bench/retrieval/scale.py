"""Retrieval at scale (BENCHMARKS.md §2(b)): synthetic clustered 512-d vectors, 1M and 10M.

For each size: build an index with ``kt_train.index`` (the index ``choose_index`` picks: IVF with fp16
vectors at 1M, IVF-PQ at 10M), then "curate" for 1,000 query images x 5 crops = 5,000 query vectors:
search top-50 per crop and pool the 5 crops of each query image (max score per gallery id), as the
curation stage does. The same 5,000 queries are searched exactly (brute force, faiss.knn over float32
blocks) for recall@50 and the speedup, in the same run.

Data: 10,000 unit cluster centers (in 100 groups of related centers, like classes of a super-class);
each point = center + Gaussian noise (a noise level per cluster, 0.5-1.0 of the center's norm),
L2-normalized, stored float16 in a file under
bench/work/retrieval/ (generated chunk by chunk from a seeded RNG and reused by later runs, so 10M
vectors never sit in memory as float32). Query images are random gallery points; their crops are the
point plus smaller noise.

Above 2M vectors the exact reference is, unless --exact-full, computed for a subset of 200 query
vectors over all vectors (recall is measured on that subset) and the exact time for all 5,000 queries
is extrapolated from timing them over the first 1M vectors (brute force is linear in the vector
count); the output says so (``exact_method``). Each size runs in its own process so that its peak RSS
(``resource.getrusage``) is its own; vectors are read with plain file reads, not a memory map, so the
RSS is the index and the working buffers, not the page cache.

    python bench/retrieval/scale.py                      # 1M and 10M, all cores
    python bench/retrieval/scale.py --sizes 100k --threads 1   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import mmap
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kt_train.index import (  # noqa: E402
    build_index,
    choose_index,
    exact_search,
    recall_at_k,
    rerank,
    save_index,
    search,
)

CHUNK = 262_144  # rows per generated / read chunk
EXACT_SUBSET = 200  # query vectors with an exact reference above --exact-full-max
EXACT_FULL_MAX = 2_000_000
EXTRAPOLATE_ROWS = 1_000_000  # exact time measured over this many rows, then scaled to n


def parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "km" else s) * mult)


def size_label(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


# --------------------------------------------------------------------------- data


def centers_and_noise(dim: int, centers: int, groups: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit cluster centers around ``groups`` unit group centers (center-group cosine ~0.7, so
    sibling clusters are related, as classes of one super-class are), and a noise level per cluster."""
    rng = np.random.default_rng([seed, 0])
    g = rng.standard_normal((groups, dim), dtype=np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    c = g[np.arange(centers) % groups] + rng.standard_normal((centers, dim), dtype=np.float32) / math.sqrt(
        dim
    )
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    sigma = rng.uniform(0.5, 1.0, centers).astype(np.float32)
    return c, sigma


def data_file(work: Path, n: int, dim: int, centers: int, groups: int, seed: int) -> Path:
    """float16 [n, dim] clustered unit vectors, written once (chunk by chunk) and reused."""
    path = work / f"clustered_n{n}_d{dim}_c{centers}_g{groups}_s{seed}.f16"
    done = path.with_suffix(".done")
    if done.exists() and path.stat().st_size == n * dim * 2:
        return path
    work.mkdir(parents=True, exist_ok=True)
    c, sigma = centers_and_noise(dim, centers, groups, seed)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for i, start in enumerate(range(0, n, CHUNK)):
            m = min(CHUNK, n - start)
            rng = np.random.default_rng([seed, 1, i])  # per chunk: the same rows whatever the chunking
            lab = rng.integers(0, centers, m)
            x = rng.standard_normal((m, dim), dtype=np.float32)
            x *= (sigma[lab] / math.sqrt(dim))[:, None]
            x += c[lab]
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            f.write(x.astype(np.float16).tobytes())
    done.write_text(f"{time.perf_counter() - t0:.1f}\n")
    return path


def read_chunks(
    path: Path, n: int, dim: int, rows: int = CHUNK, limit: int | None = None
) -> Iterator[np.ndarray]:
    """Plain reads (no memory map): the process RSS stays the working set, not the file."""
    total = n if limit is None else min(n, limit)
    with open(path, "rb") as f:
        for start in range(0, total, rows):
            m = min(rows, total - start)
            yield np.fromfile(f, dtype=np.float16, count=m * dim).reshape(m, dim)


def make_queries(
    path: Path, n: int, dim: int, images: int, crops: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``images`` query images = random gallery points; each has ``crops`` crop embeddings near it."""
    rng = np.random.default_rng([seed, 2])
    base_ids = np.sort(rng.choice(n, images, replace=False))
    with open(path, "rb") as f:
        base = np.stack(
            [np.frombuffer(os.pread(f.fileno(), dim * 2, int(i) * dim * 2), np.float16) for i in base_ids]
        ).astype(np.float32)
    q = np.repeat(base, crops, axis=0)
    q += rng.standard_normal(q.shape, dtype=np.float32) * (0.45 / math.sqrt(dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q.astype(np.float32), base_ids


# --------------------------------------------------------------------------- curation steps


def pool_crops(scores: np.ndarray, ids: np.ndarray, crops: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge the hits of each query image's crops: one entry per gallery id with its best score,
    best first; freed slots (duplicates) at the end with id -1. Vectorized over all query images."""
    q = scores.shape[0] // crops
    s = scores.reshape(q, -1)
    i = ids.reshape(q, -1)
    order = np.lexsort((-s, i), axis=-1)  # by id, best score first within an id
    i = np.take_along_axis(i, order, 1)
    s = np.take_along_axis(s, order, 1)
    dup = np.zeros_like(i, dtype=bool)
    dup[:, 1:] = i[:, 1:] == i[:, :-1]
    dup |= i < 0
    s = np.where(dup, -np.inf, s)
    i = np.where(dup, -1, i)
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


class RowReader:
    """Rows of the float16 file by id through a read-only mapping whose pages are dropped after each
    block (MADV_DONTNEED), so re-ranking does not pile the touched file pages into the RSS."""

    def __init__(self, path: Path, n: int, dim: int):
        self._f = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
        self.rows = np.frombuffer(self._mm, dtype=np.float16).reshape(n, dim)

    def drop(self) -> None:
        if hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        del self.rows
        self._mm.close()
        self._f.close()


def rerank_blocked(
    reader: RowReader, q: np.ndarray, cand: np.ndarray, k: int, block: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    out_s, out_i = [], []
    for s in range(0, len(q), block):
        a, b = rerank(reader.rows, q[s : s + block], cand[s : s + block], k)
        reader.drop()
        out_s.append(a)
        out_i.append(b)
    return np.concatenate(out_s), np.concatenate(out_i)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------- one size


def run_size(args: argparse.Namespace, n: int) -> dict[str, Any]:
    faiss.omp_set_num_threads(args.threads)
    work = Path(args.work_dir)
    dim, k, crops = args.dim, args.k, args.crops
    (path, gen_s) = timed(lambda: data_file(work, n, dim, args.centers, args.groups, args.seed))
    queries, _ = make_queries(path, n, dim, args.query_images, crops, args.seed)
    nq = len(queries)

    plan = choose_index(
        n, dim, kind=args.kind, memory_budget_bytes=int(args.memory_gb * 2**30) if args.memory_gb else None
    )
    if args.factory:  # e.g. "IVF8192,SQfp16": another nlist / codec than choose_index's
        m = re.match(r"IVF(\d+)", args.factory)
        pq = re.search(r"PQ(\d+)", args.factory)
        kind = "ivf_pq" if pq else "ivf_flat" if m else "hnsw" if "HNSW" in args.factory else "flat"
        plan = dataclasses.replace(
            plan,
            kind=kind,
            factory=args.factory,
            nlist=int(m.group(1)) if m else None,
            pq_m=int(pq.group(1)) if pq else None,
        )
    train_size = args.train_size or min(n, max(262_144, 32 * (plan.nlist or 0)))
    t0 = time.perf_counter()
    marks: list[tuple[int, float]] = []  # (vectors added, seconds since t0) after each batch

    def progress(done: int, total: int) -> None:
        marks.append((done, time.perf_counter() - t0))
        if len(marks) == 1 or done == total or len(marks) % 8 == 0:
            print(f"  [{size_label(n)}] added {done}/{total} at {marks[-1][1]:.0f} s", flush=True)

    print(f"  [{size_label(n)}] building {plan.factory} (train on {train_size})", flush=True)
    index = build_index(
        lambda: read_chunks(path, n, dim),
        plan,
        train_size=train_size,
        seed=args.seed,
        add_batch=CHUNK,
        progress=progress,
    )
    build_s = time.perf_counter() - t0
    # Adding time, estimated from the batch marks (the first batch's own time is extrapolated).
    first_n, first_t = marks[0]
    add_s = (marks[-1][1] - first_t) * n / max(1, n - first_n) if len(marks) > 1 else None
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        index_bytes = save_index(index, Path(tmp) / "index.faiss").stat().st_size

    # Exact reference (and exact timing) for the same query vectors.
    full = args.exact_full or n <= EXACT_FULL_MAX
    if full:
        ref_rows = np.arange(nq)
        (_, exact_ids), exact_s = timed(lambda: exact_search(read_chunks(path, n, dim), queries, k))
        exact_method = f"all {nq} query vectors over all {n} vectors"
    else:
        ref_rows = np.sort(np.random.default_rng([args.seed, 3]).choice(nq, EXACT_SUBSET, replace=False))
        (_, exact_ids), subset_s = timed(
            lambda: exact_search(read_chunks(path, n, dim), queries[ref_rows], k)
        )
        rows = min(n, EXTRAPOLATE_ROWS)
        _, part_s = timed(lambda: exact_search(read_chunks(path, n, dim, limit=rows), queries, k))
        exact_s = part_s * n / rows
        exact_method = (
            f"extrapolated: all {nq} query vectors over the first {rows} vectors took {part_s:.1f} s, x {n / rows:g}; "
            f"recall on {EXACT_SUBSET} query vectors with an exact reference over all {n} vectors "
            f"({subset_s:.1f} s)"
        )

    nlist = plan.nlist or 1
    nprobes = (
        [int(p) for p in args.nprobe.split(",")]
        if args.nprobe
        else sorted({max(1, nlist // f) for f in (512, 256, 128, 64)})
    )
    if plan.kind in ("flat", "hnsw"):
        nprobes = [1]  # no IVF lists (for hnsw: efSearch below)
    rerank_factors = [0] + ([args.rerank] if plan.kind == "ivf_pq" and args.rerank else [])
    reader = RowReader(path, n, dim) if len(rerank_factors) > 1 else None
    sweep = []
    for nprobe in nprobes:
        for factor in rerank_factors:
            kk = k * factor if factor else k

            def curate(nprobe: int = nprobe, factor: int = factor, kk: int = kk) -> tuple:
                s, i = search(index, queries, kk, nprobe=nprobe, ef_search=args.ef_search)
                if factor:
                    assert reader is not None
                    s, i = rerank_blocked(reader, queries, i, k)
                t_search = time.perf_counter()
                pooled = pool_crops(s, i, crops)
                return i, pooled, t_search

            t0 = time.perf_counter()
            i, pooled, t_search = curate()
            curate_s = time.perf_counter() - t0
            search_s = t_search - t0
            sweep.append(
                {
                    "nprobe": nprobe if plan.kind.startswith("ivf") else None,
                    "rerank": factor or None,
                    "search_s": round(search_s, 3),
                    "curate_s": round(curate_s, 3),
                    "recall_at_50": round(recall_at_k(i[ref_rows], exact_ids), 4),
                    "speedup_vs_exact": round(exact_s / search_s, 1),
                    "pooled_per_query": round(float((pooled[1] >= 0).sum(axis=1).mean()), 1),
                }
            )
            print(f"  [{size_label(n)}] {sweep[-1]}", flush=True)
    if reader is not None:
        reader.close()
    good = [r for r in sweep if r["recall_at_50"] >= args.target_recall]
    # The cheapest setting that reaches the target recall; failing that, the best recall among the
    # settings that curate in under a minute (the 10M bar), failing that the best recall.
    fast = [r for r in sweep if r["curate_s"] < 60] or sweep
    used = (
        min(good, key=lambda r: r["curate_s"])
        if good
        else max(fast, key=lambda r: (r["recall_at_50"], -r["curate_s"]))
    )
    for r in sweep:
        r["used"] = r is used
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "n": n,
        "dim": dim,
        "build_s": round(build_s, 1),
        "train_s_est": round(build_s - add_s, 1) if add_s is not None else None,
        "add_s_est": round(add_s, 1) if add_s is not None else None,
        "bytes_per_vector": round(index_bytes / n, 1),
        "index_bytes": index_bytes,
        "curate_s": used["curate_s"],
        "search_s": used["search_s"],
        "exact_s": round(exact_s, 2),
        "speedup_vs_exact": used["speedup_vs_exact"],
        "recall_at_50": used["recall_at_50"],
        "index": plan.factory,
        "kind": plan.kind,
        "nlist": plan.nlist,
        "pq_m": plan.pq_m,
        "nprobe": used["nprobe"],
        "rerank": used["rerank"],
        "train_size": train_size,
        "peak_rss_gb": round(peak_rss_gb, 2),
        "query_images": args.query_images,
        "crops": crops,
        "query_vectors": nq,
        "k": k,
        "exact_method": exact_method,
        "recall_queries": len(ref_rows),
        "generate_s": round(gen_s, 1),
        "sweep": sweep,
        "threads": args.threads,
        "plan": plan.to_dict(),
    }


# --------------------------------------------------------------------------- driver


def machine(threads: int) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "memory_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(result: dict[str, Any]) -> str:
    lines = [
        "| size | index | nprobe | rerank | build s | bytes/vec | curate s | exact s | speedup | recall@50 | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in result["scale"].items():
        lines.append(
            f"| {label} | {r['index']} | {r['nprobe']} | {r['rerank'] or '-'} | {r['build_s']} | {r['bytes_per_vector']} "
            f"| {r['curate_s']} | {r['exact_s']} | {r['speedup_vs_exact']}x | {r['recall_at_50']} | {r['peak_rss_gb']} |"
        )
    return "\n".join(lines)


def write_md(result: dict[str, Any], out: Path) -> None:
    m = result["machine"]
    parts = [
        "# Retrieval at scale (BENCHMARKS.md §2(b))",
        "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']} · commit {result['git_commit']}",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['threads']} threads used), {m['memory_gb']} GB; "
        f"faiss {result['versions']['faiss']}, numpy {result['versions']['numpy']}",
        f"- {result['setup']}",
        "",
        table(result),
        "",
    ]
    for label, r in result["scale"].items():
        parts += [
            f"## {label}",
            "",
            f"exact: {r['exact_method']}",
            "",
            "| nprobe | rerank | search s | curate s | recall@50 | speedup | used |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in r["sweep"]:
            parts.append(
                f"| {s['nprobe']} | {s['rerank'] or '-'} | {s['search_s']} | {s['curate_s']} | {s['recall_at_50']} "
                f"| {s['speedup_vs_exact']}x | {'**yes**' if s['used'] else ''} |"
            )
        parts.append("")
    out.with_suffix(".md").write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M,10M", help="comma-separated gallery sizes, e.g. 1M,10M or 200k")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="faiss OpenMP threads")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--centers", type=int, default=10_000, help="cluster centers")
    ap.add_argument("--groups", type=int, default=100, help="groups of related cluster centers")
    ap.add_argument("--query-images", type=int, default=1_000)
    ap.add_argument("--crops", type=int, default=5)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument(
        "--kind", default="auto", help="index kind for every size (default: choose_index's choice)"
    )
    ap.add_argument(
        "--factory", default=None, help="faiss factory string instead of choose_index's, e.g. IVF8192,SQfp16"
    )
    ap.add_argument(
        "--memory-gb",
        type=float,
        default=24.0,
        help="index memory budget given to choose_index (default: the 24 GB of BENCHMARKS.md §2(b)); 0: none",
    )
    ap.add_argument(
        "--nprobe", default=None, help="comma-separated nprobe values (default: nlist/512, /256, /128, /64)"
    )
    ap.add_argument(
        "--ef-search", type=int, default=None, help="efSearch for HNSW (index or coarse quantizer)"
    )
    ap.add_argument(
        "--rerank",
        type=int,
        default=4,
        help="for IVF-PQ also measure: search k*F, re-rank exactly from the float16 file (0: off)",
    )
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument(
        "--train-size", type=int, default=None, help="training sample (default max(262144, 32 nlist))"
    )
    ap.add_argument(
        "--exact-full",
        action="store_true",
        help=f"exact search of all query vectors above {EXACT_FULL_MAX} too",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", default=str(ROOT / "bench/work/retrieval"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/retrieval_scale.json"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one size, print JSON
    args = ap.parse_args(argv)

    if args.one:
        print("RESULT " + json.dumps(run_size(args, parse_size(args.one))), flush=True)
        return 0

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    passthrough = list(argv if argv is not None else sys.argv[1:])
    scale: dict[str, Any] = {}
    for s in sizes:
        n = parse_size(s)
        print(f"== {size_label(n)} vectors", flush=True)
        # One process per size: its peak RSS is its own.
        proc = subprocess.run(
            [sys.executable, __file__, *passthrough, "--one", s],
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                scale[size_label(n)] = json.loads(line[len("RESULT ") :])
            else:
                print(line, flush=True)
        if proc.returncode != 0:
            print(f"size {s} failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode
    result = {
        "scale": scale,
        "setup": (
            f"synthetic clustered {args.dim}-d unit vectors ({args.centers} cluster centers in {args.groups} groups, "
            "float16 file); "
            f"{args.query_images} query images x {args.crops} crops, top-{args.k} per crop pooled per image"
        ),
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *passthrough]),
        "machine": machine(args.threads),
        "versions": {"faiss": faiss.__version__, "numpy": np.__version__},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": git_commit(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_md(result, out)
    print(table(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
