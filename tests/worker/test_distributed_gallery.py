"""A distributed gallery build on real Celery worker processes (issue 16 part 1): a
``build_gallery`` job with ``distributed: true`` sends the canvas (train the quantizer, one task per
shard, merge on disk), two worker processes on Redis take the shards, the job shows shards done /
total and registers the gallery; a shard task delivered again after the merge changes nothing; the
only worker ``kill -9``-ed half-way through a shard: the job sends the step back to its queue and a
second worker redoes it, every id once (``worker.gallery_tasks.Watch``)."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from kt_train import index as ix
from kt_train.gallery import Gallery
from kt_train.io import SUCCESS
from service.db.models import Gallery as GalleryRow
from service.db.models import Job
from tests.kt_train._images import write_image
from tests.reliability.conftest import running, start_worker, wait_until, worker_env
from tests.worker.conftest import add_tenant, get_job
from worker import gallery_tasks, runner
from worker.app import make_celery


def queue_distributed_build(session_factory, tenant: str, src: Path, name: str) -> str:
    """A queued distributed ``build_gallery`` job over ``src`` (tiny encoder, 10 images a shard)."""
    config = {
        "name": name,
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
        return str(job.id)


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
    job_id = queue_distributed_build(session_factory, tenant, src, "web-dist")
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


HELD_SHARD = 2
LOST_AFTER_S = 10.0  # KT_WORKER_HEARTBEAT_TIMEOUT_S here: a step silent this long has lost its worker


def _index_ids(index: Any) -> np.ndarray:
    """Every id stored in an IVF index's inverted lists (on disk ones too), duplicates kept."""
    ivf = faiss.extract_index_ivf(index)
    lists: Any = ivf.invlists
    ids: list[np.ndarray] = []
    for i in range(ivf.nlist):
        n = lists.list_size(i)
        if n:
            ptr = lists.get_ids(i)
            ids.append(faiss.rev_swig_ptr(ptr, n).copy())
            lists.release_ids(i, ptr)
    return np.concatenate(ids)


def test_a_shard_whose_worker_is_killed_is_redone_by_another_worker_without_duplicate_ids(
    tmp_path: Path, redis_url: str, session_factory, worker_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``kill -9`` of the only worker while it is half-way through shard 2 (its embeddings written,
    its index part not; ``KT_TEST_HOLD_SHARD`` holds it there), then a second worker is started.
    Under ``--pool solo`` nothing requeues the lost message (``task_reject_on_worker_lost`` needs a
    pool child) and Redis would only hand it out after the 12 h visibility timeout: the build job
    sees the step's beat stop and sends its message back (``gallery_tasks.Watch``). The second
    worker redoes shard 2 once and does the rest; the gallery holds every image exactly once."""
    src = tmp_path / "src"
    for i in range(60):
        write_image(src / f"img_{i:03d}.png", 24, 20, seed=i)
    settings = worker_settings.model_copy(
        update={
            "broker_url": redis_url,
            "result_backend": redis_url,
            "worker_heartbeat_timeout_s": LOST_AFTER_S,
            "job_heartbeat_timeout_s": 10.0,  # as the workers' reapers (worker_env) take it
        }
    )
    app = make_celery(settings)
    monkeypatch.setattr(gallery_tasks, "celery_app", app)
    tenant = add_tenant(session_factory)
    job_id = queue_distributed_build(session_factory, tenant, src, "web-kill")
    out = runner.gallery_dir(settings, job_id)
    held = tmp_path / "held"
    common = {"KT_THREADS": "1", "KT_WORKER_HEARTBEAT_TIMEOUT_S": str(LOST_AFTER_S)}
    env1 = worker_env(settings.data_dir, settings.database_url, redis_url, **common)
    env1[gallery_tasks.HOLD_ENV] = f"{HELD_SHARD}:{held}"
    env2 = worker_env(settings.data_dir, settings.database_url, redis_url, **common)
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]

    outcome: dict[str, Any] = {}

    def build() -> None:
        try:
            outcome["status"] = runner.run_job(session_factory, job_id, settings, log_interval_s=0)
        except BaseException as e:  # reported by the test
            outcome["error"] = e

    builder = threading.Thread(target=build, name="build-job", daemon=True)
    t0 = time.monotonic()
    w1 = start_worker(env1, logs[0], "w1")
    try:
        builder.start()
        wait_until(lambda: held.is_file() or not builder.is_alive(), 600, "shard 2 to be held", w1.tail)
        assert builder.is_alive(), outcome
        assert int(held.read_text()) == w1.pid  # solo pool: the task runs in the worker process
        shard_dir = out / "shards" / f"shard-{HELD_SHARD:05d}"
        part = out / "index" / "parts" / f"shard-{HELD_SHARD:05d}.faiss"
        assert (shard_dir / SUCCESS).is_file() and not part.exists()  # half-way
        held_id = re.findall(r"Task kt\.gallery\.shard\[([^\]]+)\] received", logs[0].read_text())[-1]
        w1.kill()
        killed_at = time.monotonic()
        with running(start_worker(env2, logs[1], "w2")) as w2:
            builder.join(timeout=600)
            redone_s = time.monotonic() - killed_at
            assert not builder.is_alive(), f"the build did not end after the kill\n{w2.tail()}"
            assert outcome.get("status") == "succeeded", (outcome, get_job(session_factory, job_id).error)
    finally:
        w1.stop()
        if builder.is_alive():  # stop the build thread before the fixtures go
            with session_factory() as s:
                row = s.get(Job, job_id)
                if row is not None:
                    row.cancel_requested = True
                    s.commit()
            builder.join(timeout=30)
    total_s = time.monotonic() - t0

    w1_log, w2_log = (p.read_text() for p in logs)
    assert f"kt.gallery.shard[{held_id}] succeeded" not in w1_log
    assert len(re.findall(rf"Task kt\.gallery\.shard\[{held_id}\] received", w2_log)) == 1
    assert len(re.findall(rf"Task kt\.gallery\.shard\[{held_id}\] succeeded", w2_log)) == 1
    succeeded = re.findall(r"Task kt\.gallery\.shard\[([^\]]+)\] succeeded", w1_log + w2_log)
    assert len(succeeded) == len(set(succeeded)) == 6  # every shard once: the held one redone once
    joblog = (settings.data_dir / "jobs" / job_id / "job.log").read_text()
    assert f"[{held_id}] lost its worker w1-" in joblog and "sent back to its queue" in joblog
    assert "6/6 shards, merged on disk" in joblog

    done = get_job(session_factory, job_id)
    assert done.metrics["size"] == 60
    g = Gallery.open(out)
    index = g._sharded_index().shards[0][0]
    ids = _index_ids(index)
    assert index.ntotal == 60 and len(ids) == 60
    assert np.array_equal(np.sort(ids), np.arange(60))  # planned ids k * 10 + row: each exactly once
    assert not any((out / "index" / "parts").iterdir())
    nlist = int(g.doc["index"]["on_disk"]["plan"]["nlist"])
    _, found = g.search(g.vectors(g.ids()), 1, nprobe=nlist)
    assert np.array_equal(found[:, 0], np.arange(60))
    print(
        f"\nkill -9 half-way through shard {HELD_SHARD}; build done {redone_s:.1f} s later; test {total_s:.1f} s"
    )


def test_the_watch_sends_a_silent_steps_message_back_once_per_run(
    redis_url: str, worker_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``gallery_tasks.Watch`` without worker processes: a step message taken and left unacked (as a
    killed ``acks_late`` worker leaves it), its STARTED beat frozen. Moved back to its queue once
    the beat is silent for ``lost_after_s``, not again for the same run, again for a later run that
    falls silent too; a step whose beat moves is left alone; a failed step is reported."""
    settings = worker_settings.model_copy(update={"broker_url": redis_url, "result_backend": redis_url})
    app = make_celery(settings)
    monkeypatch.setattr(gallery_tasks, "celery_app", app)
    step = app.signature(gallery_tasks.SHARD, args=("/nowhere", 0, None), queue="cpu").apply_async()
    live = app.signature(gallery_tasks.SHARD, args=("/nowhere", 1, None), queue="cpu").apply_async()
    backend = app.backend
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        client = channel.client

        def take() -> Any:  # a worker takes the message: acks_late, so it waits in `unacked`
            message = channel.basic_get("cpu", no_ack=False)
            assert message is not None
            return message

        def started(task_id: str, host: str, beat: int) -> None:
            backend.store_result(task_id, {"pid": 7, "hostname": host, gallery_tasks.BEAT: beat}, "STARTED")

        first, second = take(), take()
        assert {first.headers["id"], second.headers["id"]} == {step.id, live.id}
        assert client.llen("cpu") == 0 and client.hlen(channel.unacked_key) == 2
        started(step.id, "w1@h", 3)
        started(live.id, "w2@h", 0)
        watch = gallery_tasks.Watch(step, lost_after_s=0.3)
        watch_live = gallery_tasks.Watch(live, lost_after_s=0.3)
        assert watch.poll() == (None, []) and watch_live.poll() == (None, [])  # first sight
        time.sleep(0.4)
        started(live.id, "w2@h", 1)  # alive: its beat moved
        why, sent = watch.poll()
        assert why is None and len(sent) == 1 and f"[{step.id}] lost its worker w1@h (pid 7" in sent[0]
        assert "kt.gallery.shard('/nowhere', 0, None)" in sent[0]
        assert watch_live.poll() == (None, [])
        assert client.llen("cpu") == 1 and client.hlen(channel.unacked_key) == 1  # the live one stays
        time.sleep(0.4)
        assert watch.poll() == (None, [])  # this run was sent back already

        again = take()  # redelivered to another worker, which dies too
        assert again.headers["id"] == step.id and again.headers.get("redelivered")
        started(step.id, "w3@h", 0)
        assert watch.poll() == (None, [])
        time.sleep(0.4)
        why, sent = watch.poll()
        assert len(sent) == 1 and "lost its worker w3@h" in sent[0] and client.llen("cpu") == 1

        backend.mark_as_failure(step.id, ValueError("bad shard"))
        why, sent = watch.poll()
        assert sent == [] and why is not None and "bad shard" in why


def test_the_watch_sends_back_a_step_whose_worker_died_before_its_first_beat(
    redis_url: str, worker_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step with only Celery's STARTED meta (pid, hostname: ``task_track_started``), its worker
    killed before ``_beating`` wrote beat 0, is sent back too once that meta is silent."""
    settings = worker_settings.model_copy(update={"broker_url": redis_url, "result_backend": redis_url})
    app = make_celery(settings)
    monkeypatch.setattr(gallery_tasks, "celery_app", app)
    step = app.signature(gallery_tasks.SHARD, args=("/nowhere", 2, None), queue="cpu").apply_async()
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        message = channel.basic_get("cpu", no_ack=False)
        assert message is not None and message.headers["id"] == step.id
        app.backend.store_result(step.id, {"pid": 9, "hostname": "w5@h"}, "STARTED")
        watch = gallery_tasks.Watch(step, lost_after_s=0.3)
        assert watch.poll() == (None, [])
        time.sleep(0.4)
        why, sent = watch.poll()
        assert why is None and len(sent) == 1 and f"[{step.id}] lost its worker w5@h (pid 9" in sent[0]
        assert channel.client.llen("cpu") == 1 and channel.client.hlen(channel.unacked_key) == 0
