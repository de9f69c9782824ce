"""Celery tasks of the on-disk gallery benchmark (``scale_ondisk.py``, BENCHMARKS.md §2(c)).

Thin wrappers over ``scale_ondisk``'s task functions, which call the product's ``kt_train.index``
(``train_empty_index``, ``add_shard``, ``merge_shards``, ``exact_search``). ``scale_ondisk.py``
starts the workers itself (``celery -A ondisk_tasks:app worker --pool solo`` in this folder) with
``KT_BENCH_BROKER`` and ``KT_BENCH_QUEUE`` set, and sends the canvas
``chain(train, chord(group(shard 0..S-1), merge))``, the shape of ``worker.gallery_tasks.dispatch``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale_ondisk as so

app = so.make_app(
    os.environ.get("KT_BENCH_BROKER", so.DEFAULT_BROKER), os.environ.get("KT_BENCH_QUEUE", "kt-bench-ondisk")
)


@app.task(name=so.TRAIN)
def train(spec: dict[str, Any]) -> dict[str, Any]:
    return so.train_task(spec)


@app.task(name=so.SHARD)
def shard(spec: dict[str, Any], k: int) -> dict[str, Any]:
    return so.shard_task(spec, k)


@app.task(name=so.MERGE)
def merge(results: list[dict[str, Any]], spec: dict[str, Any]) -> dict[str, Any]:
    return so.merge_task(results, spec)


@app.task(name=so.EXACT)
def exact(spec: dict[str, Any], k: int) -> dict[str, Any]:
    return so.exact_task(spec, k)
