"""A distributed gallery build on real Celery worker processes (issue 16 part 1): a
``build_gallery`` job with ``distributed: true`` sends the canvas (train the quantizer, one task per
shard, merge on disk), two worker processes on Redis take the shards, the job shows shards done /
total and registers the gallery; a shard task delivered again after the merge changes nothing."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from kt_train import index as ix
from kt_train.gallery import Gallery
from service.db.models import Gallery as GalleryRow
from service.db.models import Job
from tests.kt_train._images import write_image
from tests.reliability.conftest import running, start_worker, worker_env
from tests.worker.conftest import add_tenant, get_job
from worker import gallery_tasks, runner
from worker.app import make_celery


def test_two_workers_build_one_gallery_as_a_canvas(
    tmp_path: Path, redis_url: str, session_factory, worker_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    for i in range(60):
        write_image(src / f"img_{i:03d}.png", 24, 20, seed=i)
    (src / "img_999.png").write_bytes(b"broken")  # skipped: the planned ids get a gap, mapped away
    settings = worker_settings.model_copy(update={"broker_url": redis_url, "result_backend": redis_url})
    app = make_celery(settings)
    monkeypatch.setattr(gallery_tasks, "celery_app", app)
    tenant = add_tenant(session_factory)
    config = {
        "name": "web-dist",
        "sources": [str(src)],
        "encoder": "timm:test_resnet",
        "image_size": 32,
        "index_kind": "ivf_flat",
        "batch_size": 8,
        "shard_size": 10,
        "device": "cpu",
        "distributed": True,
    }
    with session_factory() as s:
        job = Job(tenant_id=tenant, kind="build_gallery", params={"config": config})
        s.add(job)
        s.commit()
        job_id = job.id
    env = worker_env(settings.data_dir, settings.database_url, redis_url, KT_THREADS="1")
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    with running(start_worker(env, logs[0], "w1")), running(start_worker(env, logs[1], "w2")):
        assert runner.run_job(session_factory, job_id, settings, log_interval_s=0) == "succeeded"
        done = get_job(session_factory, job_id)
        out = runner.gallery_dir(settings, job_id)
        g = Gallery.open(out)
        assert (done.metrics["size"], done.metrics["index_kind"]) == (60, "ivf_flat (on disk)")
        with session_factory() as s:
            row = s.get(GalleryRow, done.metrics["gallery_id"])
            assert row is not None and (row.name, row.size, row.path) == ("web-dist", 60, str(out))

        # every shard task ran on one of the two workers, and both took some
        ran = [re.findall(r"Task kt\.gallery\.shard\[[^\]]+\] succeeded", p.read_text()) for p in logs]
        assert sum(map(len, ran)) == 7 and all(ran), [len(r) for r in ran]
        joblog = (settings.data_dir / "jobs" / job_id / "job.log").read_text()
        assert "7 shard task(s)" in joblog and "7/7 shards, merged on disk" in joblog

        # a shard message delivered again after the merge: no duplicate ids, nothing left behind
        again = app.signature(gallery_tasks.SHARD, args=(str(out), 3, "cpu"), queue="cpu").apply_async()
        assert again.get(timeout=60)["count"] == 10
    index = Gallery.open(out)._sharded_index().shards[0][0]
    assert index.ntotal == 60 and ix.is_memory_mapped(index)
    assert not any((out / "index" / "parts").iterdir())
    nlist = int(g.doc["index"]["on_disk"]["plan"]["nlist"])
    _, ids = g.search(g.vectors(g.ids()), 1, nprobe=nlist)
    assert np.array_equal(ids[:, 0], np.arange(60))
