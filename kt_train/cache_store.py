"""A content-addressed store of cache entries with a size cap and least-recently-used eviction.

A store is a directory; each entry is a sub-directory named by its key (a hash of the bytes that
decide its contents), with a lock file beside it::

    <root>/<key>/            a complete entry (what is in it is the caller's business)
    <root>/<key>.partial/    an entry being built, or a killed build that the next one resumes
    <root>/<key>.lock        flock, exclusive while the entry is checked for, built or deleted
    <root>/<key>.use         flock, shared while the entry is read

Whoever builds or opens an entry holds ``<key>.lock`` exclusively (``exclusive``) to check for it
and build it, takes a ``Lease`` (a shared ``<key>.use`` lock, kept for as long as the entry is
read) before letting ``<key>.lock`` go, and marks it used (``touch``: the directory's mtime is its
last use). ``evict`` deletes complete entries, least recently used first, until the store is under
its cap; an entry whose two locks it cannot take at once (being built or in use, in this process or
another) and every ``.partial`` build are kept. Lock files stay (empty): deleting one could hand
two processes "the" lock on two different files.

Torch-free: the worker and the CLI use it without loading a model. The teacher-output cache
(``kt_train.teacher_cache``) is such a store; the worker gives each tenant one
(``<data_dir>/tenants/<tenant_id>/cache/teacher_outputs``), shared by that tenant's jobs only.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["Entry", "Lease", "entries", "evict", "exclusive", "lock_path", "store_bytes", "touch", "use_path"]

log = logging.getLogger(__name__)

PARTIAL = ".partial"
LOCK = ".lock"


USE = ".use"
EVICTING = ".evicting-"


def lock_path(root: str | Path, key: str) -> Path:
    return Path(root) / f"{key}{LOCK}"


def use_path(root: str | Path, key: str) -> Path:
    return Path(root) / f"{key}{USE}"


def _open_lock(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a+")


class Lease:
    """A shared lock on an entry's ``.use`` file, held while the entry is read: ``evict`` keeps it.
    Take it while holding the entry's ``exclusive`` lock (an evictor holds that one before it
    checks the ``.use`` lock, so none can come between). ``release()`` (or leaving a ``with``) lets
    it go; so does the end of the process."""

    def __init__(self, f: IO[str]) -> None:
        self._f: IO[str] | None = f

    @classmethod
    def take(cls, root: str | Path, key: str) -> Lease:
        f = _open_lock(use_path(root, key))
        fcntl.flock(f, fcntl.LOCK_SH)
        return cls(f)

    @property
    def held(self) -> bool:
        return self._f is not None

    def release(self) -> None:
        if self._f is not None:
            try:
                fcntl.flock(self._f, fcntl.LOCK_UN)
            finally:
                self._f.close()
                self._f = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


@contextmanager
def exclusive(root: str | Path, key: str) -> Iterator[None]:
    """Hold ``<root>/<key>.lock`` exclusively (waiting for it): to check for, build or delete the
    entry; take the entry's ``Lease`` inside the block to read it after."""
    f = _open_lock(lock_path(root, key))
    try:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def touch(path: str | Path) -> None:
    """Mark an entry used now (its directory's mtime is its last use)."""
    with suppress(FileNotFoundError):
        os.utime(path)


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


@dataclass(frozen=True)
class Entry:
    key: str
    path: Path
    bytes: int
    last_used: float  # the directory's mtime
    complete: bool  # False: a .partial build


def entries(root: str | Path) -> list[Entry]:
    """The store's entries, complete and partial, least recently used first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if not p.is_dir() or p.is_symlink() or EVICTING in p.name:
            continue
        complete = not p.name.endswith(PARTIAL)
        key = p.name if complete else p.name[: -len(PARTIAL)]
        try:
            mtime = p.stat().st_mtime
        except FileNotFoundError:
            continue
        out.append(Entry(key, p, _tree_bytes(p), mtime, complete))
    out.sort(key=lambda e: (e.last_used, e.key))
    return out


def store_bytes(root: str | Path) -> int:
    return sum(e.bytes for e in entries(root))


def evict(root: str | Path, max_bytes: int | None) -> list[str]:
    """Delete complete entries of the store at ``root``, least recently used first, until its
    entries hold at most ``max_bytes`` (None or 0: no cap). Entries being built (``.partial``) or
    whose lock is held (being checked, built or read) are kept, so the store may stay over the cap
    while they are. Returns the keys deleted."""
    if not max_bytes:
        return []
    root = Path(root)
    for left in root.glob(f"*{EVICTING}*"):  # a deletion cut short
        shutil.rmtree(left, ignore_errors=True)
    found = entries(root)
    total = sum(e.bytes for e in found)
    evicted: list[str] = []
    for e in found:
        if total <= max_bytes:
            break
        if not e.complete:
            continue
        if not _delete_if_free(root, e):
            continue
        total -= e.bytes
        evicted.append(e.key)
        log.info("cache store %s: evicted %s (%d bytes, least recently used)", root, e.key, e.bytes)
    return evicted


def _delete_if_free(root: Path, e: Entry) -> bool:
    """Delete entry ``e`` if neither of its locks is held (nor taken while this runs)."""
    with _open_lock(lock_path(root, e.key)) as lock, _open_lock(use_path(root, e.key)) as use:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("cache store %s: keeping %s (being checked or built)", root, e.key)
            return False
        try:
            try:
                fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("cache store %s: keeping %s (in use)", root, e.key)
                return False
            try:
                # gone, or used again, since the listing: not this one
                if not e.path.is_dir() or e.path.stat().st_mtime != e.last_used:
                    return False
                doomed = e.path.with_name(f"{e.key}{EVICTING}{os.getpid()}-{time.monotonic_ns()}")
                os.replace(e.path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
                return True
            finally:
                fcntl.flock(use, fcntl.LOCK_UN)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
