"""A distributed gallery build as a Celery canvas: thin wrappers over ``kt_train.gallery_shards``.

``chain(train, chord(group(shard 0 .. shard N-1), merge))``: one task trains the IVF quantizer on a
sample and saves the empty trained index; one task per shard embeds it and fills its copy of the
trained index (any worker on any machine that sees the gallery folder takes them); the chord's body
merges the parts on disk and marks the gallery complete. The ``build_gallery`` job that dispatched
it (``worker.runner``) shows shards done / total, and registers the gallery once it is complete.
Every step is idempotent (files written whole, then renamed; shard ids fixed by the shard number),
so a step run again after its worker died redoes its step without duplicating ids.

**A step whose worker dies.** Workers run ``--pool solo``, so ``task_reject_on_worker_lost`` never
applies (it needs a pool child that dies under a live parent): a SIGKILLed (OOM-killed, lost)
worker takes its step's message with it, unacked (``acks_late``), and Redis would hand it out again
only after the visibility timeout (``worker.app.VISIBILITY_TIMEOUT_S``, 12 h). So each step, while
it runs, keeps its result at STARTED with a beat count bumped every quarter of
``KT_WORKER_HEARTBEAT_TIMEOUT_S`` from a thread (``_beating``), and the build job's ``Watch`` sends a
step whose count has not moved for ``KT_WORKER_HEARTBEAT_TIMEOUT_S`` back to its queue at once: the
unacked message itself, moved back (no second copy, so the chord counts the step once). A worker that
dies after taking a message but before its step's first beat (or on a broker other than Redis, which
keeps no unacked message to move) is left to the visibility timeout, or to a retry of the job.

Test hook: ``KT_TEST_HOLD_SHARD=<k>:<file>`` makes the shard ``k`` task of a worker started with it
write ``<file>`` (its pid) once the shard's embeddings are on disk, and then sleep until the process
is killed (``tests/worker/test_distributed_gallery.py``). Nothing reads it outside tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from celery import Task, chain, chord, group, states
from celery.result import AsyncResult, ResultBase

from worker.app import REDIS_SCHEMES, celery_app

log = logging.getLogger(__name__)

TRAIN, SHARD, MERGE = "kt.gallery.train", "kt.gallery.shard", "kt.gallery.merge"


def _steps() -> Any:
    """``kt_train.gallery_shards``, imported in the task (torch is not needed to be ready)."""
    from worker.tasks import _size_threads

    _size_threads()
    from kt_train import gallery_shards

    return gallery_shards


BEAT = "beat"  # the STARTED result's beat count (``_beating``)
HOLD_ENV = "KT_TEST_HOLD_SHARD"  # tests only: see the module docstring


@contextlib.contextmanager
def _beating(task: Task) -> Iterator[None]:
    """While a step runs: its result is STARTED with this process's pid, node name and a beat count,
    written at once and then every quarter of ``KT_WORKER_HEARTBEAT_TIMEOUT_S`` from a thread (a
    step busy in native code still beats). The thread is joined before the step returns, so no beat
    lands after the step's final state."""
    task_id = task.request.id
    if task_id is None or task.request.called_directly:
        yield
        return
    from service.settings import get_settings
    from service.workers import worker_beat_interval_s

    interval = worker_beat_interval_s(get_settings())
    meta = {"pid": os.getpid(), "hostname": task.request.hostname}
    stop = threading.Event()

    def beat(n: int) -> None:
        try:
            task.update_state(task_id=task_id, state=states.STARTED, meta={**meta, BEAT: n})
        except Exception:  # the result backend is away: a missed beat, not a failed step
            log.warning("step %s: beat %d not written", task_id, n, exc_info=True)

    def run() -> None:
        n = 1
        while not stop.wait(interval):
            beat(n)
            n += 1

    beat(0)
    thread = threading.Thread(target=run, name=f"kt-step-beat-{task_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _test_hold(k: int) -> Callable[[], None] | None:
    """``KT_TEST_HOLD_SHARD=<k>:<file>`` (tests only): shard ``k`` writes ``<file>`` half-way and
    sleeps until its worker is killed."""
    shard, _, marker = os.environ.get(HOLD_ENV, "").partition(":")
    if not marker or shard.strip() != str(k):
        return None

    def hold() -> None:
        Path(marker).write_text(str(os.getpid()))
        log.warning("%s: shard %d holds here until this worker is killed", HOLD_ENV, k)
        while True:
            time.sleep(1)

    return hold


@celery_app.task(name=TRAIN, acks_late=True, bind=True)
def train(self: Task, out_dir: str, device: str | None = None) -> str | None:
    with _beating(self):
        path = _steps().train_quantizer(out_dir, device=device)
    return None if path is None else str(path)


@celery_app.task(name=SHARD, acks_late=True, bind=True)
def shard(self: Task, out_dir: str, k: int, device: str | None = None) -> dict[str, Any]:
    with _beating(self):
        result: dict[str, Any] = _steps().build_shard(out_dir, k, device=device, embedded=_test_hold(k))
    return result


@celery_app.task(name=MERGE, acks_late=True, bind=True)
def merge(self: Task, _shards: list[dict[str, Any]], out_dir: str) -> dict[str, Any]:
    with _beating(self):
        gallery = _steps().finish_build(out_dir)
    return {"count": gallery.count, "dim": gallery.dim}


def dispatch(out_dir: str, n_shards: int, *, queue: str, device: str | None = None) -> AsyncResult:
    """Send the canvas for a build planned with ``plan_distributed_build``; returns the merge's result."""
    app = celery_app  # looked up at call time: tests point it at their broker

    def sig(name: str, *args: Any) -> Any:
        return app.signature(name, args=args, queue=queue, immutable=name != MERGE)

    shards = group(sig(SHARD, out_dir, k, device) for k in range(n_shards))
    return chain(sig(TRAIN, out_dir, device), chord(shards, sig(MERGE, out_dir))).apply_async()


def _links(result: ResultBase | None) -> list[ResultBase]:
    out: list[ResultBase] = []
    while result is not None:
        out.append(result)
        result = result.parent
    return out


def _send_back(task_id: str) -> dict[str, Any] | None:
    """Move the unacked message of task ``task_id`` back to its queue (a Redis broker's ack
    emulation keeps it in its ``unacked`` hash until the visibility timeout); its headers, or None
    when no such message is held (acked, moved back already, or not a Redis broker)."""
    app = celery_app
    if not str(app.conf.broker_url).startswith(REDIS_SCHEMES):
        return None
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        client = channel.client
        for tag, raw in client.hscan_iter(channel.unacked_key):
            try:
                headers = json.loads(raw)[0]["headers"]
            except (ValueError, TypeError, LookupError):
                continue
            if isinstance(headers, dict) and headers.get("id") == task_id:
                channel.qos.restore_by_tag(tag, client=client)  # one transaction: unacked -> queue
                return headers
    return None


class Watch:
    """The build job's eye on its canvas: ``poll()`` (once a second) says why it failed, and sends
    back to their queue the steps whose worker died (module docstring). A step is taken for lost
    when its STARTED beat (pid, node, count) has not changed for ``lost_after_s`` as seen from here
    (this process's clock only: no skew between machines). Each run of a step is sent back once; its
    next run (a new beat) is watched afresh."""

    def __init__(self, result: AsyncResult, lost_after_s: float) -> None:
        self.result = result
        self.lost_after_s = lost_after_s
        self._seen: dict[str, tuple[Any, float]] = {}  # task id -> (its beat, when first seen)
        self._sent_back: dict[str, Any] = {}  # task id -> the beat of the run sent back

    def poll(self) -> tuple[str | None, list[str]]:
        """(why the canvas failed (the first failed step's error) or None, a line per step sent back)."""
        now = time.monotonic()
        why: str | None = None
        sent: list[str] = []
        for link in _links(self.result):
            for child in getattr(link, "results", None) or [link]:
                meta = child.backend.get_task_meta(child.id)
                state, info = meta.get("status"), meta.get("result")
                if state == states.FAILURE:
                    why = why or f"{child.name or 'a step'} failed: {info!r}"
                elif state == states.STARTED and isinstance(info, dict) and (BEAT in info or "pid" in info):
                    # Celery's own STARTED meta (pid, hostname) counts as beat 0: a worker killed
                    # between starting the step and its first beat is caught the same way
                    line = self._check(child.id, info, now)
                    if line is not None:
                        sent.append(line)
        return why, sent

    def _check(self, task_id: str, info: dict[str, Any], now: float) -> str | None:
        beat = (info.get("hostname"), info.get("pid"), info.get(BEAT))
        seen = self._seen.get(task_id)
        if seen is None or seen[0] != beat:
            self._seen[task_id] = (beat, now)
            return None
        silent = now - seen[1]
        if silent < self.lost_after_s or self._sent_back.get(task_id) == beat:
            return None
        self._sent_back[task_id] = beat
        headers = _send_back(task_id)
        if headers is None:
            return None
        return (
            f"step {headers.get('task')}{headers.get('argsrepr') or ''} [{task_id}] lost its worker "
            f"{info.get('hostname')} (pid {info.get('pid')}, no beat for {silent:.0f} s): sent back to its queue"
        )


def revoke(result: AsyncResult) -> None:
    """Stop what has not started yet (a canceled job)."""
    for link in _links(result):
        link.revoke()
