"""Dataset thumbnails for the ``/ui`` pages: made once, with bounded memory, cached on disk.

Decoding the whole image on every request let 16 concurrent fetches of one 9000×9000 PNG (258 KB
on disk, under the pixel cap) take the API to 9.8 GB of memory, which it kept. So:

- a thumbnail is made once, on its first request, and written atomically (a temp file renamed into
  place) under the dataset's own directory, ``<dataset>/thumbs/<px>/<sha256 of class/name>.jpg``:
  deleting the dataset deletes its thumbnails with it, and a later request just reads the file;
- decodes run on a small pool of threads of their own (``KT_THUMBNAIL_DECODES``, default 1), never
  on the request threads: however many requests come, at most that many images are being decoded,
  and as the same threads do every decode, the memory one decode freed is what the next one reuses
  (every request thread would keep its own malloc arena's worth); waiting requests hold no thread;
- one decode is bounded: an image over ``KT_MAX_IMAGE_PIXELS`` is not decoded at all, a JPEG is
  decoded at a reduced scale (``Image.draft``), any other format once, reduced in place
  (``Image.thumbnail``) without a full-size copy; so one decode needs at most 4 bytes a pixel of the
  cap (~360 MB at the default), and the freed pages are handed back to the system afterwards;
- requests for a thumbnail that is being made wait for that one decode (single flight).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI
from PIL import Image
from starlette.concurrency import run_in_threadpool

from service.settings import Settings
from service.uploads import IMAGE_FORMATS

log = logging.getLogger(__name__)
THUMBS_DIR = "thumbs"
JPEG_QUALITY = 80


def thumb_path(dataset_dir: Path, cls: str, name: str, px: int) -> Path:
    """Where the ``px`` thumbnail of ``images/<cls>/<name>`` is cached: a hash names it, so any
    class or file name (up to the file system's limit, unicode, spaces) gives a short, safe one."""
    digest = hashlib.sha256(f"{cls}/{name}".encode()).hexdigest()
    return dataset_dir / THUMBS_DIR / str(px) / f"{digest}.jpg"


def render(source: Path, px: int, max_pixels: int) -> bytes | None:
    """A JPEG of ``source`` at most ``px`` pixels a side, or ``None`` when it can't be decoded or is
    larger than ``max_pixels`` (then it is never decoded)."""
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as im:
            width, height = im.size
            if width * height > max_pixels:
                return None
            im.draft("RGB", (px, px))  # JPEG: decoded at 1/2, 1/4 or 1/8 scale
            im.thumbnail((px, px))  # the others: decoded once, reduced in place
            thumb = im.convert("RGB")
        buf = io.BytesIO()
        thumb.save(buf, format="JPEG", quality=JPEG_QUALITY)
    except Exception:  # PIL raises many types for a broken file; each means "no thumbnail"
        log.warning("no thumbnail for %s: it does not decode", source, exc_info=True)
        return None
    return buf.getvalue()


def read_cached(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def write_atomically(path: Path, data: bytes) -> None:
    """Cache ``data`` at ``path`` in one step (a reader sees no file or a whole one). The folders are
    made one level at a time below the dataset's directory, never that directory itself: when the
    dataset was deleted meanwhile, nothing is re-created and the thumbnail is just not cached."""
    try:
        for folder in (path.parent.parent, path.parent):
            folder.mkdir(mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".jpg")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        log.warning("thumbnail not cached at %s: %s", path, err)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Hand the pages a decode freed back to the system: glibc keeps large freed blocks in its
    arenas, and the API's resident memory would stay at the decode's peak. No-op without glibc."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def make(source: Path, target: Path, px: int, max_pixels: int) -> bytes | None:
    """Render ``source``'s thumbnail and cache it at ``target`` (one decode; runs on the pool)."""
    cached = read_cached(target)  # made by another request while this one waited for a thread
    if cached is not None:
        return cached
    try:
        data = render(source, px, max_pixels)
    finally:
        release_freed_memory()
    if data is not None:
        write_atomically(target, data)
    return data


class Thumbnails:
    """One API process's thumbnails: cached files read as they are, missing ones made on a pool
    of ``decodes`` threads, one decode per thumbnail however many requests ask for it."""

    def __init__(self, px: int, max_pixels: int, decodes: int) -> None:
        self.px, self.max_pixels = px, max_pixels
        self._pool = ThreadPoolExecutor(max_workers=decodes, thread_name_prefix="kt-thumbnail")
        self._pending: dict[Path, asyncio.Future[bytes | None]] = {}

    async def get(self, source: Path, target: Path) -> bytes | None:
        """The JPEG thumbnail of ``source`` (cached at ``target``), or ``None`` when it has none."""
        cached = await run_in_threadpool(read_cached, target)
        if cached is not None:
            return cached
        pending = self._pending.get(target)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(self._pool, make, source, target, self.px, self.max_pixels)
            self._pending[target] = pending
            pending.add_done_callback(lambda _done: self._pending.pop(target, None))
        # shielded: a client that goes away does not cancel the decode the others wait for
        return await asyncio.shield(pending)


def thumbnails(app: FastAPI, px: int) -> Thumbnails:
    """The app's thumbnails (created on first use from its settings; one per API process)."""
    made: Thumbnails | None = getattr(app.state, "thumbnails", None)
    if made is None:
        settings: Settings = app.state.settings
        made = Thumbnails(px, settings.max_image_pixels, settings.thumbnail_decodes)
        app.state.thumbnails = made
    return made
