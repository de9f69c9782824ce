"""Uploaded zips validated and stored away from the API's event loop and at a lower CPU priority.

``ingest_zip`` decodes every image of an upload: seconds of CPU per 100 MB. Run in the API
process's threadpool it competes with every other request for the GIL and the cores, and status
polls behind five back-to-back uploads waited hundreds of milliseconds (bench/service/run.py
--mixed: p99 595 ms beside two training jobs). So uploads go to a small pool of their own
processes (``KT_INGEST_PROCESSES``, default 2; 0: the API's threadpool as before), started with
``spawn`` (the API process has threads: no fork) and run at niceness ``KT_INGEST_NICE`` (19): when
the cores are short, the API's requests go first and the uploads take the rest.

The pool is one per API process, started with the app (so its processes are part of the API's
baseline, not of an upload's cost) and shut down at exit; a pool whose process died is replaced.
Errors a user caused (``service.api.errors.UserError``) cross the process boundary unchanged.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import multiprocessing as mp
import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from service.api.errors import BadRequest
from service.segmentation_uploads import ingest_segmentation_zip
from service.settings import Settings
from service.uploads import IngestedDataset, ingest_zip

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_shape: tuple[int, int] | None = None


def _lower_priority(nice: int) -> None:
    if nice > 0:
        with contextlib.suppress(OSError):  # not allowed here: run at the API's priority
            os.nice(nice)


def pool(settings: Settings) -> ProcessPoolExecutor | None:
    """The ingest pool for ``settings`` (``None`` when ``ingest_processes`` is 0), started once."""
    global _pool, _shape
    shape = (settings.ingest_processes, settings.ingest_nice)
    if shape[0] <= 0:
        return None
    with _lock:
        if _pool is None or _shape != shape:
            if _pool is not None:
                _pool.shutdown(wait=False, cancel_futures=False)
            _pool = ProcessPoolExecutor(
                max_workers=shape[0],
                mp_context=mp.get_context("spawn"),
                initializer=_lower_priority,
                initargs=(shape[1],),
            )
            _shape = shape
        return _pool


def warm_up(settings: Settings) -> None:
    """Start the pool's processes now (at app start-up), not on the first upload."""
    p = pool(settings)
    if p is not None:
        for f in [p.submit(os.getpid) for _ in range(settings.ingest_processes)]:
            f.result()


def _forget(broken: ProcessPoolExecutor) -> None:
    global _pool
    with _lock:
        if _pool is broken:
            _pool = None


async def ingest(
    archive: Path,
    dest: Path,
    settings: Settings,
    *,
    task: str = "classification",
    fields: dict[str, str] | None = None,
) -> IngestedDataset:
    """``ingest_zip(archive, dest, settings)`` in the ingest pool (module docstring); for ``task``
    ``segmentation``, ``ingest_segmentation_zip`` with the upload's ``classes`` / ``void_index``
    form ``fields``."""
    func: Callable[..., IngestedDataset] = ingest_zip
    args: tuple[Any, ...] = (archive, dest, settings)
    if task == "segmentation":
        form = fields or {}
        func, args = ingest_segmentation_zip, (*args, form.get("classes"), form.get("void_index"))
    p = pool(settings)
    if p is None:
        return await run_in_threadpool(func, *args)
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(p, func, *args)
    except BrokenProcessPool:  # a pool process was killed (OOM, an operator): once more in a new one
        _forget(p)
    p = pool(settings)
    assert p is not None
    try:
        return await loop.run_in_executor(p, func, *args)
    except BrokenProcessPool as e:
        _forget(p)
        raise BadRequest(
            "Validating this upload stopped its process twice (out of memory?); nothing was kept. Split the "
            "dataset into smaller zips, or ask the operator to raise the API's memory."
        ) from e


@atexit.register
def _shutdown() -> None:
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
