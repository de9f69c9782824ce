"""Uploaded zips validated and stored away from the API's event loop and at a lower CPU priority.

``ingest_zip`` decodes every image of an upload: seconds of CPU per 100 MB. Run in the API
process's threadpool it competes with every other request for the GIL and the cores, and status
polls behind five back-to-back uploads waited hundreds of milliseconds (bench/service/run.py
--mixed: p99 595 ms beside two training jobs). So uploads go to a small pool of their own
processes (``KT_INGEST_PROCESSES``, default 2; 0: the API's threadpool as before), started with
``spawn`` (the API process has threads: no fork) and run at niceness ``KT_INGEST_NICE`` (19): when
the cores are short, the API's requests go first and the uploads take the rest.

The pool is one per API process, started with the app (so its processes are part of the API's
baseline, not of an upload's cost); a pool whose process died is replaced. Errors a user caused
(``service.api.errors.UserError``) cross the process boundary unchanged.

Its processes never outlive the API. The app's shutdown (its lifespan, e.g. after SIGTERM of ``kt
serve``) stops the pool: queued uploads cancelled, ``SHUTDOWN_TIMEOUT_S`` for its processes to exit,
then SIGKILL; the same runs at interpreter exit, before ``concurrent.futures`` would wait for every
running upload. On Linux each process also asks for SIGKILL when its parent dies
(``PR_SET_PDEATHSIG``: a ``kill -9`` of the API leaves no orphan), and exits at once if the API
died before it could ask. The kernel sends that signal when the *thread* that started the process
ends, so the pool's processes are started from the event loop's thread (``warm_up``, ``ingest``),
which runs as long as the app, never from a threadpool thread that exits when idle.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait as wait_sentinels
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from service.api.errors import BadRequest
from service.segmentation_uploads import ingest_segmentation_zip
from service.settings import Settings
from service.uploads import IngestedDataset, ingest_zip

SHUTDOWN_TIMEOUT_S = 5.0  # for the pool's processes to exit at shutdown before they are killed
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_shape: tuple[int, int] | None = None


def _die_with_parent(parent: int) -> None:
    """In a pool process: SIGKILL when the API process dies (Linux), and exit now if it already
    did (it died before the prctl call, which then has no parent left to watch)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no libc prctl: the exit hooks only
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # reparented: the API is gone
        os._exit(1)


def _lower_priority(nice: int) -> None:
    if nice > 0:
        with contextlib.suppress(OSError):  # not allowed here: run at the API's priority
            os.nice(nice)


def _start_process(parent: int, nice: int) -> None:
    """The pool processes' initializer."""
    _die_with_parent(parent)
    _lower_priority(nice)


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
                initializer=_start_process,
                initargs=(os.getpid(), shape[1]),
            )
            _shape = shape
        return _pool


async def warm_up(settings: Settings) -> None:
    """Start the pool's processes now (at app start-up), not on the first upload. Submitted from
    the event loop's thread, which starts them (module docstring: PR_SET_PDEATHSIG)."""
    p = pool(settings)
    if p is not None:
        await asyncio.gather(
            *(asyncio.wrap_future(p.submit(os.getpid)) for _ in range(settings.ingest_processes))
        )


def shutdown(timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Stop the pool (if any): uploads still queued are cancelled, its processes get ``timeout``
    seconds to exit and are killed after that. The next ``pool`` call starts a new one."""
    global _pool, _shape
    with _lock:
        p, _pool, _shape = _pool, None, None
    if p is None:
        return
    running = {}  # sentinel -> process; a sentinel is ready once its process has exited
    for proc in list((getattr(p, "_processes", None) or {}).values()):  # gone after p.shutdown
        with contextlib.suppress(ValueError):  # closed
            running[proc.sentinel] = proc
    p.shutdown(wait=False, cancel_futures=True)  # idle processes are told to exit
    deadline = time.monotonic() + timeout
    while running and (left := deadline - time.monotonic()) > 0:
        for sentinel in wait_sentinels(list(running), left):
            running.pop(sentinel)  # type: ignore[call-overload]
    for proc in running.values():  # still busy with an upload: nobody waits for its answer
        with contextlib.suppress(OSError, ValueError):
            proc.kill()


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


# At exit, before concurrent.futures' own hook (threading's exit hooks run last registered first),
# which waits for every running upload to finish.
getattr(threading, "_register_atexit", atexit.register)(shutdown)
