"""A distributed gallery build as a Celery canvas: thin wrappers over ``kt_train.gallery_shards``.

``chain(train, chord(group(shard 0 .. shard N-1), merge))``: one task trains the IVF quantizer on a
sample and saves the empty trained index; one task per shard embeds it and fills its copy of the
trained index (any worker on any machine that sees the gallery folder takes them); the chord's body
merges the parts on disk and marks the gallery complete. The ``build_gallery`` job that dispatched
it (``worker.runner``) shows shards done / total, and registers the gallery once it is complete.
Every step is idempotent (files written whole, then renamed; shard ids fixed by the shard number),
so a task redelivered after its worker died (``acks_late``, ``task_reject_on_worker_lost``) redoes
its step without duplicating ids.
"""

from __future__ import annotations

from typing import Any

from celery import chain, chord, group
from celery.result import AsyncResult, ResultBase

from worker.app import celery_app

TRAIN, SHARD, MERGE = "kt.gallery.train", "kt.gallery.shard", "kt.gallery.merge"


def _steps() -> Any:
    """``kt_train.gallery_shards``, imported in the task (torch is not needed to be ready)."""
    from worker.tasks import _size_threads

    _size_threads()
    from kt_train import gallery_shards

    return gallery_shards


@celery_app.task(name=TRAIN, acks_late=True)
def train(out_dir: str, device: str | None = None) -> str | None:
    path = _steps().train_quantizer(out_dir, device=device)
    return None if path is None else str(path)


@celery_app.task(name=SHARD, acks_late=True)
def shard(out_dir: str, k: int, device: str | None = None) -> dict[str, Any]:
    result: dict[str, Any] = _steps().build_shard(out_dir, k, device=device)
    return result


@celery_app.task(name=MERGE, acks_late=True)
def merge(_shards: list[dict[str, Any]], out_dir: str) -> dict[str, Any]:
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


def failure(result: AsyncResult) -> str | None:
    """Why the canvas failed (the first failed step's error), or None while it has not."""
    for link in _links(result):
        children = getattr(link, "results", None) or [link]
        for child in children:
            if child.failed():
                return f"{child.name or 'a step'} failed: {child.result!r}"
    return None


def revoke(result: AsyncResult) -> None:
    """Stop what has not started yet (a canceled job)."""
    for link in _links(result):
        link.revoke()
