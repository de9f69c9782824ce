"""Dataset uploads: receive a multipart zip by streaming it to disk, then validate and extract it.

``UploadGate`` admits uploads: a few at a time per API process (``KT_CONCURRENT_UPLOADS``), the
rest waiting their turn or, past the queue, answered 503 with ``Retry-After``. ``UploadPacer``
reads an upload's body at full speed while the process has nothing else to do, and at a shared
budget of bytes a second while it is busy (``KT_UPLOAD_PACE_MS``, ``KT_UPLOAD_BUSY_MB_S``): five
uploaders at full speed took the CPU that 200 status polls a second needed, and the polls waited
(bench/service/run.py --mixed).

``receive_upload`` parses the request body as it arrives (never whole into memory), writes the
``file`` field to a temp file under ``<data_dir>/tmp`` and stops with 413 as soon as the limit is
passed. ``ingest_zip`` checks every entry (no absolute paths, ``..``, drive letters or symlinks;
limits on entries, total size and compression ratio), reads the layout (ImageFolder, optionally
inside one top folder, or flat images + ``labels.csv``), decodes every image with PIL, and
extracts into a staging directory that is renamed into place only when everything passed.
Nothing is skipped silently: anything unusable is a 4xx that lists what to fix.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import csv
import io
import itertools
import lzma
import os
import re
import shutil
import stat
import tempfile
import time
import unicodedata
import zipfile
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, cast

from anyio import to_thread
from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from service import cleanup, storage
from service.api.errors import BadRequest, Invalid, Overloaded, TimedOut, TooLarge
from service.settings import Settings

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# what PIL may decode an upload as, whatever its name (never e.g. EPS, which runs Ghostscript)
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "GIF", "WEBP", "TIFF")
ARCHIVES = frozenset({".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst"})
IGNORED_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini"})  # lower case
LABELS_FILE = "labels.csv"
MAX_LABELS_BYTES = 32 * 1024 * 1024
RATIO_MIN_BYTES = 1024 * 1024  # entries smaller than this can't bomb, whatever their ratio
NAME_MAX = 255  # bytes in one file name (Linux, macOS, Windows)
MAX_LABEL_CHARS = 200
MAX_FIELD_BYTES = 4096  # text form fields (`name`)
MULTIPART_OVERHEAD = 1024 * 1024  # body bytes allowed beyond the file itself (headers, boundaries)
SHOWN = 5  # how many offending entries an error message lists
COPY_CHUNK = 1024 * 1024
UPLOAD_RETRY_AFTER_S = 5  # what a refused upload is told to wait: about one 100 MB upload's turn
MAX_PAUSE_S = 1.0  # the longest pause between two chunks of a paced upload
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_METHODS = {zipfile.ZIP_STORED: "store", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
            zipfile.ZIP_LZMA: "lzma"}  # fmt: skip
# what reading a damaged entry raises: bad CRC or header, broken deflate/bzip2/lzma stream, cut short
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError)
_SPECIAL = {stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
            stat.S_IFSOCK: "a socket"}  # fmt: skip


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" (and {len(items) - SHOWN} more)" if len(items) > SHOWN else "")


# ---------------------------------------------------------------------------------------------
# Admission and pacing


class UploadGate:
    """Admission of uploads in one API process: at most ``slots`` uploads are received and
    validated at once; the others wait for a turn in their order of arrival, their bodies unread
    (the server reads none of it, so the client's connection just pauses), at most ``queue`` of
    them and each at most ``timeout_s``. Past either limit the upload is refused with 503 and
    ``Retry-After`` (``Overloaded``) before a byte of its body is read; nothing is kept.

    Bound to the event loop of the app it belongs to (``upload_gate``); not thread-safe."""

    def __init__(self, slots: int, queue: int, timeout_s: float, busy_bytes_s: float = 0.0) -> None:
        self.slots, self.queue, self.timeout_s = slots, queue, timeout_s
        self.budget = ReadBudget(busy_bytes_s) if busy_bytes_s > 0 else None  # shared by its uploads
        self.active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _busy(self, waited: bool) -> Overloaded:
        if waited:
            how = f"no turn came within {self.timeout_s:g} s"
        elif self.queue == 0 or self.timeout_s <= 0:
            how = "it keeps none waiting"
        else:
            how = f"{self.waiting} more are already waiting for a turn, as many as it keeps"
        return Overloaded(
            f"The server is receiving as many uploads as it takes at once ({self.slots}) and {how}; "
            f"nothing of this upload was read or kept. Send it again in {UPLOAD_RETRY_AFTER_S} s (the "
            "Retry-After header); `kt datasets upload` and the Python client do so by themselves.",
            UPLOAD_RETRY_AFTER_S,
        )

    async def _acquire(self) -> None:
        if self.active < self.slots and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.queue or self.timeout_s <= 0:
            raise self._busy(waited=False)
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await asyncio.wait({turn}, timeout=self.timeout_s)
        except BaseException:  # the request was cancelled while it waited
            self._leave(turn)
            raise
        if not turn.done():
            self._leave(turn)
            raise self._busy(waited=True)

    def _leave(self, turn: asyncio.Future[None]) -> None:
        if turn.done():  # handed a turn as it gave up: pass it on
            self._release()
        else:
            turn.cancel()
            self._waiters.remove(turn)

    def _release(self) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes to the next in line; ``active`` stays
                return
        self.active -= 1

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one upload slot for the ``async with`` block (waiting for it first, or 503)."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()


def upload_gate(request: Request, settings: Settings) -> UploadGate:
    """The app's ``UploadGate``, made on first use from ``settings``."""
    state = request.app.state
    gate: UploadGate | None = getattr(state, "upload_gate", None)
    if gate is None:
        gate = UploadGate(
            settings.concurrent_uploads,
            settings.upload_queue,
            settings.upload_queue_timeout_s,
            settings.upload_busy_mb_s * 1024 * 1024,
        )
        state.upload_gate = gate
    return gate


class ReadBudget:
    """The bytes a second that one API process's uploads read together while it is busy: a token
    bucket holding at most one second's worth; a read past it owes the rest, and waits it off."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.at = time.perf_counter()

    def take(self, n: int) -> float:
        """Take ``n`` bytes; the seconds to wait before reading on (0: none)."""
        now = time.perf_counter()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate) - n
        self.at = now
        # owe at most MAX_PAUSE_S: past it a reader waits that long, and the debt is forgiven
        self.tokens = max(self.tokens, -self.rate * MAX_PAUSE_S)
        return max(0.0, -self.tokens / self.rate)


class UploadPacer:
    """Pacing of one upload's body. After each chunk the upload lets the event loop run whatever
    else is ready. When that came back within ``busy_ms`` and no other request's handler is
    running in the threadpool, the process has nothing better to do, and the upload reads on at
    once (an idle API takes uploads at full speed, for one ``sleep(0)`` a chunk). Otherwise (status
    polls and other requests in progress, or the process short of CPU) the chunk is paid for from
    the process's ``ReadBudget`` of bytes a second while busy, and the upload waits until it is,
    ``MAX_PAUSE_S`` at most a chunk. The unread body waits in the socket meanwhile: the client's
    sending pauses. So short requests go first, and uploads take what the budget leaves them."""

    def __init__(self, busy_ms: float, budget: ReadBudget | None) -> None:
        self.busy_s = busy_ms / 1000
        self.budget = budget if busy_ms > 0 else None
        self.paused_s = 0.0  # in all, for this upload

    async def after_chunk(self, size: int) -> None:
        if self.budget is None:
            return
        # perf_counter, not loop.time(): uvloop's clock moves in whole milliseconds
        start = time.perf_counter()
        await asyncio.sleep(0)
        lag = time.perf_counter() - start
        # other requests' handlers run in the threadpool (a status poll's, for a few ms), where the
        # event loop does not see them
        if lag <= self.busy_s and to_thread.current_default_thread_limiter().borrowed_tokens == 0:
            return
        pause = self.budget.take(size)
        if pause > 0:
            self.paused_s += pause
            await asyncio.sleep(pause)


# ---------------------------------------------------------------------------------------------
# Receiving


@dataclass
class ReceivedUpload:
    path: Path  # the uploaded file, under <data_dir>/tmp; the caller removes it
    filename: str | None
    name: str | None
    size: int
    fields: dict[str, str] = field(default_factory=dict)  # every text field (the web form's `csrf`)


class _FormReceiver:
    """Callbacks for ``MultipartParser``: the ``file`` part goes to disk, small text fields to memory."""

    def __init__(self, dest: Path, max_bytes: int) -> None:
        self.dest = dest
        self.max_bytes = max_bytes
        self.file_seen = False
        self.filename: str | None = None
        self.file_size = 0
        self.fields: dict[str, bytearray] = {}
        self._out: io.BufferedWriter | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._part: str | None = None

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._disposition = b""
        self._part = None

    def _header_end(self) -> None:
        if bytes(self._header_field).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._disposition)
        part = params.get(b"name", b"").decode("utf-8", "replace")
        self._part = part
        if part == "file":
            if self.file_seen:
                raise BadRequest("Send one `file` field per upload; this request has several.")
            self.file_seen = True
            filename = params.get(b"filename")
            self.filename = filename.decode("utf-8", "replace") if filename else None
            self._out = open(self.dest, "wb")  # noqa: SIM115 - closed in _part_end / close()
        else:
            self.fields.setdefault(part, bytearray())

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "file":
            self.file_size += end - start
            if self.file_size > self.max_bytes:
                raise TooLarge(
                    f"The upload is larger than the limit of {self.max_bytes} bytes ({_size(self.max_bytes)}); "
                    "send a smaller archive or split the dataset."
                )
            assert self._out is not None
            self._out.write(memoryview(data)[start:end])  # no copy of the chunk
        elif self._part is not None:
            buf = self.fields[self._part]
            if len(buf) + end - start > MAX_FIELD_BYTES:
                raise Invalid(f"Form field `{self._part}` is longer than {MAX_FIELD_BYTES} bytes.")
            if (
                b"\x00" in data[start:end]
            ):  # PostgreSQL text can't hold it; refused before the archive is read
                raise Invalid(
                    f"Form field `{self._part}` contains a NUL character (\\x00), which no dataset name "
                    "has; remove it and send the upload again."
                )
            buf.extend(data[start:end])

    def _part_end(self) -> None:
        if self._part == "file" and self._out is not None:
            self._out.close()
            self._out = None
        self._part = None

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


async def remove_upload(path: Path) -> None:
    """Delete a received upload's file, in a thread: the kernel takes long enough to free a large
    file's pages (90 ms for 200 MB, 0.5 s for 1 GB) to stall every request on the event loop."""
    await run_in_threadpool(path.unlink, missing_ok=True)


async def receive_upload(request: Request, settings: Settings) -> ReceivedUpload:
    """Stream a ``multipart/form-data`` body with a ``file`` field (and optional ``name``) to disk."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise Invalid(
            "Send the dataset as multipart/form-data with the zip archive in the field `file`, "
            "e.g. `curl -F file=@dataset.zip ...`."
        )
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise TooLarge(
            f"The upload ({declared} bytes) is larger than the limit of {limit} bytes ({_size(limit)}); "
            "send a smaller archive or split the dataset."
        )
    # named after this process, so that a sweep can tell a dead process's leftover (service.cleanup)
    fd, tmp_name = tempfile.mkstemp(
        prefix=cleanup.upload_prefix(), suffix=".zip", dir=storage.tmp_dir(settings.data_dir)
    )
    os.close(fd)
    dest = Path(tmp_name)
    receiver = _FormReceiver(dest, limit)
    pacer = UploadPacer(settings.upload_pace_ms, upload_gate(request, settings).budget)
    try:
        parser = MultipartParser(boundary, cast(Any, receiver.callbacks()))
        body_bytes = 0
        chunks = request.stream()
        while True:
            try:  # a client that stops sending must not keep its turn (UploadGate) for ever
                chunk = await asyncio.wait_for(chunks.__anext__(), settings.upload_idle_timeout_s)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise TimedOut(
                    f"The upload sent nothing for {settings.upload_idle_timeout_s:g} s, so the server "
                    f"stopped waiting for it after {body_bytes} bytes; nothing was kept. Send it again "
                    "(from a connection that keeps up)."
                ) from None
            body_bytes += len(chunk)
            if body_bytes > limit + MULTIPART_OVERHEAD:
                raise TooLarge(f"The request body is larger than the upload limit of {limit} bytes.")
            parser.write(chunk)
            await pacer.after_chunk(len(chunk))
        parser.finalize()
        if parser.state != MultipartState.END:
            raise BadRequest(
                "The multipart body ended before its closing boundary (the upload was cut off); "
                "send the whole request again, e.g. `curl -F file=@dataset.zip ...`."
            )
    except MultipartParseError as err:
        receiver.close()
        await remove_upload(dest)
        raise BadRequest(
            f"The multipart body is malformed ({err}); send the dataset as multipart/form-data, "
            "e.g. `curl -F file=@dataset.zip ...`."
        ) from err
    except Exception:
        receiver.close()
        await remove_upload(dest)
        raise
    except BaseException:  # cancelled: nothing more to await
        receiver.close()
        dest.unlink(missing_ok=True)
        raise
    receiver.close()
    if not receiver.file_seen:
        await remove_upload(dest)
        raise Invalid("The multipart form has no `file` field; attach the zip archive as `file`.")
    name_field = receiver.fields.get("name")
    name = name_field.decode("utf-8", "replace").strip() if name_field is not None else None
    fields = {k: v.decode("utf-8", "replace") for k, v in receiver.fields.items()}
    return ReceivedUpload(
        path=dest, filename=receiver.filename, name=name or None, size=receiver.file_size, fields=fields
    )


# ---------------------------------------------------------------------------------------------
# Validating and extracting


@dataclass
class IngestedDataset:
    num_images: int
    classes: list[str]
    class_counts: dict[str, int]
    bytes: int
    files: dict[str, list[str]] = field(default_factory=dict)


def _is_ignored(parts: tuple[str, ...]) -> bool:
    """macOS resource forks (``__MACOSX/``), hidden files and folders (``.DS_Store``,
    ``.ipynb_checkpoints/``) and Windows thumbnail caches are not part of a dataset."""
    return any(p == "__MACOSX" or p.startswith(".") for p in parts) or parts[-1].lower() in IGNORED_FILES


def _clean_part(part: str) -> str:
    # NFC: macOS writes decomposed names (``e`` + combining accent), labels.csv and people type
    # composed ones; both must name the same class and file
    return unicodedata.normalize("NFC", part)


def _check_entry(info: zipfile.ZipInfo) -> tuple[str, ...]:
    """The entry's path components, after refusing anything that could escape the target dir
    or is not a plain file or folder."""
    name = info.filename
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise BadRequest(f"Archive entry {name!r} has an absolute path; zip the dataset with relative paths.")
    parts = tuple(_clean_part(p) for p in re.split(r"[/\\]", name) if p not in ("", "."))
    if ".." in parts:
        raise BadRequest(f"Archive entry {name!r} contains '..'; zip the dataset without parent references.")
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise BadRequest(
            f"Archive entry {name!r} is a symbolic link; replace links with the files themselves."
        )
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        what = _SPECIAL.get(kind, f"file type {kind:#o}")
        raise BadRequest(
            f"Archive entry {name!r} is not a regular file ({what}); zip only image files and folders."
        )
    return parts


def _check_limits(infos: list[zipfile.ZipInfo], settings: Settings) -> None:
    """Count, declared total size and compression ratio: all from the central directory, before
    anything is decompressed."""
    if len(infos) > settings.max_upload_files:
        raise TooLarge(
            f"The archive has {len(infos)} entries, more than the limit of {settings.max_upload_files}; "
            "split the dataset into smaller uploads."
        )
    total = sum(info.file_size for info in infos)
    if total > settings.max_upload_bytes:
        raise TooLarge(
            f"The archive expands to {total} bytes ({_size(total)}), more than the limit of "
            f"{settings.max_upload_bytes} bytes; send fewer or smaller images."
        )
    ratio = settings.max_compression_ratio
    for info in infos:
        if info.file_size >= RATIO_MIN_BYTES and info.file_size > ratio * max(info.compress_size, 1):
            raise TooLarge(
                f"Archive entry {info.filename!r} expands {info.file_size // max(info.compress_size, 1)}x "
                f"(more than the limit of {ratio}x) and looks like a zip bomb; images don't compress "
                "like that: send the real image files."
            )


def _check_overlaps(infos: list[zipfile.ZipInfo]) -> None:
    """Refuse entries whose data overlap: two names for one block of data (what a hard link would
    be, which zip has not) or the overlapping entries of a crafted zip bomb."""
    spans = sorted((info for info in infos if not info.is_dir()), key=lambda info: info.header_offset)
    for info, following in itertools.pairwise(spans):
        # a local header is at least 30 bytes, followed by the compressed data
        if following.header_offset < info.header_offset + 30 + info.compress_size:
            raise BadRequest(
                f"Archive entries {info.filename!r} and {following.filename!r} share (overlap in) their "
                "data, as in crafted zip bombs or linked files; re-create the zip with a standard tool "
                "from real copies of the files."
            )


def _check_readable(info: zipfile.ZipInfo) -> None:
    if info.flag_bits & 0x1:
        raise BadRequest(f"Archive entry {info.filename!r} is encrypted; zip the dataset without a password.")
    if info.compress_type not in _METHODS:
        raise BadRequest(
            f"Archive entry {info.filename!r} uses compression method {info.compress_type}, which is "
            f"not supported; use {', '.join(_METHODS.values())} (deflate is every zip tool's default)."
        )


def _unreadable(info: zipfile.ZipInfo, err: BaseException) -> BadRequest:
    return BadRequest(
        f"Archive entry {info.filename!r} is corrupt and can't be read ({type(err).__name__}: {err}); "
        "re-create the zip (and check that its upload was complete)."
    )


def _safe_label(label: str, where: str) -> str:
    label = _clean_part(label.strip())
    if (
        not label
        or label.startswith(".")
        or "/" in label
        or "\\" in label
        or len(label) > MAX_LABEL_CHARS
        or len(label.encode()) > NAME_MAX
        or _CONTROL.search(label)
    ):
        raise Invalid(
            f"Label {_short(label, 60)!r} ({where}) can't be used as a class name: use 1-{MAX_LABEL_CHARS} "
            f"characters (at most {NAME_MAX} bytes in UTF-8), no '/', '\\' or control characters, "
            "not starting with '.'."
        )
    return label


def _read_labels(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    if info.file_size > MAX_LABELS_BYTES:
        raise TooLarge(
            f"labels.csv is {_size(info.file_size)}, more than the limit of {_size(MAX_LABELS_BYTES)}; "
            "list only `path,label` for each image."
        )
    _check_readable(info)
    try:
        raw = zf.read(info)
    except _READ_ERRORS as err:
        raise _unreadable(info, err) from err
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise Invalid(
            f'labels.csv is not UTF-8 text (byte {err.start}); save it as UTF-8 (e.g. "CSV UTF-8" in Excel).'
        ) from err


def _read_layout(
    zf: zipfile.ZipFile, entries: dict[tuple[str, ...], zipfile.ZipInfo], dirs: set[tuple[str, ...]]
) -> dict[str, list[tuple[zipfile.ZipInfo, str]]]:
    """Class name → [(entry, file name in the dataset)] for either supported layout."""
    if not entries:
        raise Invalid("The archive contains no images; zip folders of images, one folder per class.")
    # one top folder around everything (e.g. made by zipping the folder itself) is stripped
    tops = {parts[0] for parts in entries}
    strip = 0
    if len(tops) == 1 and all(len(parts) >= 2 for parts in entries):
        only = next(iter(tops))
        if (only, LABELS_FILE) in entries or all(len(parts) >= 3 for parts in entries):
            strip = 1
    rel = {parts[strip:]: info for parts, info in entries.items()}
    by_class: dict[str, list[tuple[zipfile.ZipInfo, str]]] = {}
    archives = [
        info.filename for parts, info in rel.items() if PurePosixPath(parts[-1]).suffix.lower() in ARCHIVES
    ]
    if archives:
        raise Invalid(
            f"The archive contains other archives ({_listing(archives)}); nested archives are not "
            "unpacked: extract them and zip their images directly."
        )
    not_images = [
        info.filename
        for parts, info in rel.items()
        if parts != (LABELS_FILE,) and PurePosixPath(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES
    ]
    if not_images:
        raise Invalid(
            f"The archive has files that are not images ({_listing(not_images)}); accepted: "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}. Remove them (or add labels.csv for a flat layout)."
        )
    if (LABELS_FILE,) in rel:
        text = _read_labels(zf, rel.pop((LABELS_FILE,)))
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or not {"path", "label"} <= {f.strip() for f in reader.fieldnames}:
            raise Invalid("labels.csv must have a header row `path,label`.")
        listed: set[tuple[str, ...]] = set()
        missing: list[str] = []
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not any(row.values()):
                continue  # a blank line
            path = tuple(
                _clean_part(p) for p in re.split(r"[/\\]", row.get("path", "")) if p not in ("", ".")
            )
            if not path:
                raise Invalid(f"labels.csv line {line} has no path; give each row `path,label`.")
            if path not in rel:
                missing.append(row["path"])
                continue
            if path in listed:
                raise Invalid(
                    f"labels.csv line {line}: {row['path']!r} is listed twice; give each image one label."
                )
            listed.add(path)
            label = _safe_label(row.get("label", ""), f"labels.csv line {line}")
            by_class.setdefault(label, []).append((rel[path], path[-1]))
        if missing:
            raise Invalid(
                f"labels.csv lists images that are not in the archive: {_listing(missing)}; "
                "remove those rows or add the images."
            )
        unlisted = sorted(rel[p].filename for p in rel if p not in listed)
        if unlisted:
            raise Invalid(f"Images not listed in labels.csv (add a label for each): {_listing(unlisted)}.")
        return by_class
    deep = sorted(info.filename for parts, info in rel.items() if len(parts) != 2)
    if deep:
        raise Invalid(
            f"Expected `<class>/<image>` (optionally inside one top folder) or flat images with labels.csv; "
            f"these entries don't fit: {_listing(deep)}."
        )
    for parts, info in sorted(rel.items()):
        by_class.setdefault(_safe_label(parts[0], f"folder of {_short(info.filename)}"), []).append(
            (info, parts[1])
        )
    # empty class folders (explicit directory entries, or holding only ignored files) are
    # classes without images
    for parts in dirs:
        if len(parts) == strip + 1 and (strip == 0 or parts[0] in tops):
            by_class.setdefault(_safe_label(parts[strip], f"folder {'/'.join(parts)}/"), [])
    return by_class


def _file_name(name: str) -> str:
    """``name`` as a file name this file system takes: control characters replaced, and cut to
    fit ``NAME_MAX`` bytes (keeping the suffix) with room for a ``_<n>`` de-duplication suffix."""
    name = _CONTROL.sub("_", name)
    budget = NAME_MAX - 16
    if len(name.encode()) <= budget:
        return name
    stem, suffix = os.path.splitext(name)
    suffix = suffix if len(suffix.encode()) <= 16 else ""
    stem = stem.encode()[: budget - len(suffix.encode())].decode("utf-8", "ignore")
    return stem + suffix


def _unique(name: str, taken: set[str]) -> str:
    name = _file_name(name)
    if name not in taken:
        return name
    stem, suffix = os.path.splitext(name)
    n = 1
    while f"{stem}_{n}{suffix}" in taken:
        n += 1
    return f"{stem}_{n}{suffix}"


def _copy_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path) -> int:
    """Extract one entry, never writing more than its declared size (headers can lie)."""
    _check_readable(info)
    written = 0
    try:
        src = zf.open(info)
    except _READ_ERRORS as err:
        raise _unreadable(info, err) from err
    with src, open(dest, "wb") as out:
        while True:
            try:
                chunk = src.read(COPY_CHUNK)
            except _READ_ERRORS as err:  # a bad CRC, a broken stream, data cut short
                raise _unreadable(info, err) from err
            if not chunk:
                break
            written += len(chunk)
            if written > info.file_size:
                raise TooLarge(
                    f"Archive entry {info.filename!r} is larger than its header says; re-create the zip."
                )
            out.write(chunk)
    return written


def _image_problem(path: Path, max_pixels: int, entry: str) -> str | None:
    """Why the image at ``path`` (archive entry ``entry``) can't be used, or ``None`` when it decodes.
    The reason never shows the server's path."""
    if path.stat().st_size == 0:
        return "is empty (0 bytes)"
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            im.verify()
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            width, height = im.size
            if width * height > max_pixels:
                return f"{width}x{height} pixels is more than the limit of {max_pixels} pixels; downscale it"
            im.load()
    except Image.DecompressionBombError:
        return f"its declared size is more than the limit of {max_pixels} pixels; downscale it"
    except UnidentifiedImageError:
        return (
            "is not a readable image (its content is not "
            f"{', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]}, whatever its name says)"
        )
    except Exception as err:  # PIL raises many types for a broken file; each means "can't decode"
        reason = str(err).replace(str(path), entry)
        return f"can't be decoded, it may be truncated or corrupt ({type(err).__name__}: {reason})"
    return None


_MAGIC = ((b"\x1f\x8b", "a gzip file"), (b"7z\xbc\xaf\x27\x1c", "a 7z archive"), (b"Rar!", "a RAR archive"),
          (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"%PDF", "a PDF"))  # fmt: skip


def _sniff(path: Path) -> str | None:
    """What a file that is not a zip looks like, when it is something common."""
    with open(path, "rb") as f:
        head = f.read(512)
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "it is a tar archive"
    return next((f"it is {what}" for magic, what in _MAGIC if head.startswith(magic)), None)


def open_archive(archive: Path) -> zipfile.ZipFile:
    """The upload as a zip, or a 400 saying what it looks like instead."""
    try:
        return zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as err:
        raise BadRequest(
            f"The upload is not a valid zip archive ({_sniff(archive) or err}); send a .zip file."
        ) from err


def read_entries(
    zf: zipfile.ZipFile, settings: Settings
) -> tuple[dict[tuple[str, ...], zipfile.ZipInfo], set[tuple[str, ...]]]:
    """The archive's files by their path components, and its folders, after every check that
    needs no decompression: limits, unsafe paths and file types, duplicate names, overlapping
    data. Ignored files (``_is_ignored``) are left out; their folders are kept."""
    infos = zf.infolist()
    _check_limits(infos, settings)
    entries: dict[tuple[str, ...], zipfile.ZipInfo] = {}
    dirs: set[tuple[str, ...]] = set()
    for info in infos:
        parts = _check_entry(info)
        if not parts:
            continue
        if _is_ignored(parts):
            # the folder around an ignored file (``c/.DS_Store``) was still a folder of the dataset
            keep = next(i for i, p in enumerate(parts) if _is_ignored(parts[: i + 1]))
            if keep:
                dirs.add(parts[:keep])
            continue
        if info.is_dir():
            dirs.add(parts)
        elif parts in entries:
            first = entries[parts].filename
            how = "" if first == info.filename else " (they differ only in separators or Unicode form)"
            raise BadRequest(
                f"Archive entries {first!r} and {info.filename!r} name the same file{how}; a dataset "
                "can't hold two files at one path: re-create the zip."
            )
        else:
            entries[parts] = info
    _check_overlaps(infos)
    return entries, dirs


def _refuse_segmentation_layout(entries: dict[tuple[str, ...], zipfile.ZipInfo]) -> None:
    """An images/ + masks/ archive sent as a classification dataset would become two classes
    named "images" and "masks": say what to send instead."""
    from service.segmentation_uploads import looks_like_segmentation  # it builds on this module

    if looks_like_segmentation(entries):
        raise Invalid(
            "The archive holds images/ and masks/ folders: a segmentation dataset. Send it with the form "
            "field `task=segmentation` (e.g. `curl -F task=segmentation -F file=@dataset.zip ...`)."
        )


def ingest_zip(archive: Path, dest: Path, settings: Settings) -> IngestedDataset:
    """Validate ``archive`` and extract it to ``dest/images/<class>/<file>`` (``dest`` must not exist).

    ``dest`` appears (by atomic rename) only when every check passed; on any error nothing is left.
    """
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    zf = open_archive(archive)
    staging = dest.parent / f".staging-{dest.name}"
    with zf:
        entries, dirs = read_entries(zf, settings)
        _refuse_segmentation_layout(entries)
        by_class = _read_layout(zf, entries, dirs)
        empty = sorted(c for c, items in by_class.items() if not items)
        if empty:
            raise Invalid(
                f"Class folders without images: {_listing(empty)}; add images or remove the folders."
            )
        if len(by_class) < 2:
            found = ", ".join(repr(c) for c in by_class)
            raise Invalid(
                f"Found {len(by_class)} class ({found}); a dataset needs at least 2 classes, "
                "one folder (or labels.csv label) per class."
            )
        if len(by_class) > settings.max_classes:
            raise Invalid(
                f"Found {len(by_class)} classes, more than the limit of {settings.max_classes} classes; "
                "check the layout (one folder per class, `<class>/<image>`) or split the dataset."
            )
        staging.mkdir(parents=True, exist_ok=False)
        try:
            total = 0
            bad: list[str] = []
            files: dict[str, list[str]] = {}
            for label, items in sorted(by_class.items()):
                class_dir = staging / "images" / label
                class_dir.mkdir(parents=True, exist_ok=True)
                taken = set(files.get(label, ()))
                for info, file_name in items:
                    target = _unique(file_name, taken)
                    taken.add(target)
                    total += _copy_entry(zf, info, class_dir / target)
                    problem = _image_problem(class_dir / target, settings.max_image_pixels, info.filename)
                    if problem:
                        bad.append(f"{info.filename} ({problem})")
                    files.setdefault(label, []).append(target)
            if bad:
                raise Invalid(f"{len(bad)} image(s) can't be used; fix or remove them: {_listing(bad)}.")
            storage.publish(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    counts = {label: len(names) for label, names in sorted(files.items())}
    return IngestedDataset(
        num_images=sum(counts.values()), classes=sorted(counts), class_counts=counts, bytes=total, files=files
    )
