"""Dataset uploads: receive a multipart zip by streaming it to disk, then validate and extract it.

``receive_upload`` parses the request body as it arrives (never whole into memory), writes the
``file`` field to a temp file under ``<data_dir>/tmp`` and stops with 413 as soon as the limit is
passed. ``ingest_zip`` checks every entry (no absolute paths, ``..``, drive letters or symlinks;
limits on entries, total size and compression ratio), reads the layout (ImageFolder, optionally
inside one top folder, or flat images + ``labels.csv``), decodes every image with PIL, and
extracts into a staging directory that is renamed into place only when everything passed.
Nothing is skipped silently: anything unusable is a 4xx that lists what to fix.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, cast

from PIL import Image
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service import cleanup, storage
from service.api.errors import BadRequest, Invalid, TooLarge
from service.settings import Settings

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
LABELS_FILE = "labels.csv"
MAX_RATIO = 100  # uncompressed/compressed size of one entry above which it is treated as a zip bomb
RATIO_MIN_BYTES = 1024 * 1024  # entries smaller than this can't bomb, whatever their ratio
MAX_FIELD_BYTES = 4096  # text form fields (`name`)
MULTIPART_OVERHEAD = 1024 * 1024  # body bytes allowed beyond the file itself (headers, boundaries)
SHOWN = 5  # how many offending entries an error message lists
COPY_CHUNK = 1024 * 1024
_DRIVE = re.compile(r"^[A-Za-z]:")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" (and {len(items) - SHOWN} more)" if len(items) > SHOWN else "")


# ---------------------------------------------------------------------------------------------
# Receiving


@dataclass
class ReceivedUpload:
    path: Path  # the uploaded file, under <data_dir>/tmp; the caller removes it
    filename: str | None
    name: str | None
    size: int


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
            self._out.write(data[start:end])
        elif self._part is not None:
            buf = self.fields[self._part]
            if len(buf) + end - start > MAX_FIELD_BYTES:
                raise Invalid(f"Form field `{self._part}` is longer than {MAX_FIELD_BYTES} bytes.")
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
    try:
        parser = MultipartParser(boundary, cast(Any, receiver.callbacks()))
        body_bytes = 0
        async for chunk in request.stream():
            body_bytes += len(chunk)
            if body_bytes > limit + MULTIPART_OVERHEAD:
                raise TooLarge(f"The request body is larger than the upload limit of {limit} bytes.")
            parser.write(chunk)
        parser.finalize()
    except BaseException:
        receiver.close()
        dest.unlink(missing_ok=True)
        raise
    receiver.close()
    if not receiver.file_seen:
        dest.unlink(missing_ok=True)
        raise Invalid("The multipart form has no `file` field; attach the zip archive as `file`.")
    name_field = receiver.fields.get("name")
    name = name_field.decode("utf-8", "replace").strip() if name_field is not None else None
    return ReceivedUpload(path=dest, filename=receiver.filename, name=name or None, size=receiver.file_size)


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
    """macOS resource forks, .DS_Store and other hidden files/folders are not part of a dataset."""
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def _check_entry(info: zipfile.ZipInfo) -> tuple[str, ...]:
    """The entry's path components, after refusing anything that could escape the target dir."""
    name = info.filename
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise BadRequest(f"Archive entry {name!r} has an absolute path; zip the dataset with relative paths.")
    parts = tuple(p for p in re.split(r"[/\\]", name) if p not in ("", "."))
    if ".." in parts:
        raise BadRequest(f"Archive entry {name!r} contains '..'; zip the dataset without parent references.")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise BadRequest(
            f"Archive entry {name!r} is a symbolic link; replace links with the files themselves."
        )
    return parts


def _check_limits(infos: list[zipfile.ZipInfo], settings: Settings) -> None:
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
    for info in infos:
        if info.file_size >= RATIO_MIN_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise TooLarge(
                f"Archive entry {info.filename!r} expands {info.file_size // max(info.compress_size, 1)}x "
                f"(more than {MAX_RATIO}x) and looks like a zip bomb; images don't compress like that."
            )


def _safe_label(label: str, where: str) -> str:
    label = label.strip()
    if not label or label.startswith(".") or "/" in label or "\\" in label or len(label) > 200:
        raise Invalid(
            f"Label {label!r} ({where}) can't be used as a class name: use 1-200 characters, "
            "no '/' or '\\', not starting with '.'."
        )
    return label


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
        labels_info = rel.pop((LABELS_FILE,))
        text = zf.read(labels_info).decode("utf-8-sig", "replace")
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or not {"path", "label"} <= {f.strip() for f in reader.fieldnames}:
            raise Invalid("labels.csv must have a header row `path,label`.")
        listed: set[tuple[str, ...]] = set()
        missing: list[str] = []
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            path = tuple(p for p in row.get("path", "").split("/") if p not in ("", "."))
            if not path:
                continue
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
            raise Invalid(f"labels.csv lists images that are not in the archive: {_listing(missing)}.")
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
        by_class.setdefault(_safe_label(parts[0], f"folder of {info.filename}"), []).append((info, parts[1]))
    # empty class folders (explicit directory entries) are classes without images
    for parts in dirs:
        if len(parts) == strip + 1 and (strip == 0 or parts[0] in tops):
            by_class.setdefault(parts[strip], [])
    return by_class


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    stem, suffix = os.path.splitext(name)
    n = 1
    while f"{stem}_{n}{suffix}" in taken:
        n += 1
    return f"{stem}_{n}{suffix}"


def _copy_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path) -> int:
    """Extract one entry, never writing more than its declared size (headers can lie)."""
    written = 0
    with zf.open(info) as src, open(dest, "wb") as out:
        while chunk := src.read(COPY_CHUNK):
            written += len(chunk)
            if written > info.file_size:
                raise TooLarge(
                    f"Archive entry {info.filename!r} is larger than its header says; re-create the zip."
                )
            out.write(chunk)
    return written


def _image_problem(path: Path, max_pixels: int) -> str | None:
    """Why the image at ``path`` can't be used, or ``None`` when it decodes."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            width, height = im.size
            if width * height > max_pixels:
                return f"{width}x{height} pixels is more than the limit of {max_pixels}"
            im.load()
    except Image.DecompressionBombError:
        return f"more than the limit of {max_pixels} pixels"
    except Exception as err:  # PIL raises many types for a broken file; each means "can't decode"
        return f"can't be decoded ({type(err).__name__}: {err})"
    return None


def ingest_zip(archive: Path, dest: Path, settings: Settings) -> IngestedDataset:
    """Validate ``archive`` and extract it to ``dest/images/<class>/<file>`` (``dest`` must not exist).

    ``dest`` appears (by atomic rename) only when every check passed; on any error nothing is left.
    """
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as err:
        raise BadRequest(f"The upload is not a valid zip archive ({err}); send a .zip file.") from err
    staging = dest.parent / f".staging-{dest.name}"
    with zf:
        infos = zf.infolist()
        _check_limits(infos, settings)
        entries: dict[tuple[str, ...], zipfile.ZipInfo] = {}
        dirs: set[tuple[str, ...]] = set()
        for info in infos:
            parts = _check_entry(info)
            if not parts or _is_ignored(parts):
                continue
            if info.is_dir():
                dirs.add(parts)
            else:
                entries[parts] = info
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
        staging.mkdir(parents=True, exist_ok=False)
        try:
            total = 0
            bad: list[str] = []
            files: dict[str, list[str]] = {}
            for label, items in sorted(by_class.items()):
                class_dir = staging / "images" / label
                class_dir.mkdir(parents=True)
                taken: set[str] = set()
                for info, file_name in items:
                    target = _unique(file_name, taken)
                    taken.add(target)
                    total += _copy_entry(zf, info, class_dir / target)
                    problem = _image_problem(class_dir / target, settings.max_image_pixels)
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
