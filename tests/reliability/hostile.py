"""A corpus of hostile and odd dataset uploads, generated in memory (nothing here is a fixture file).

``corpus(limits, mark)`` returns the ``Case`` list that ``test_hostile_uploads`` sends to a real
server: each case is one HTTP request plus what the service must answer (the status and phrases
of ``docs/uploads.md``). Zip bombs are built by patching the central directory (or by a few MB of
zeros at most), so no test ever writes or holds gigabytes.

``mark`` is a unique string put into every path a zip-slip entry tries to reach, so the test can
look for it everywhere afterwards.
"""

from __future__ import annotations

import io
import random
import stat
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

# --- images ------------------------------------------------------------------------------------


def image(mode: str = "RGB", color: Any = (200, 30, 30), fmt: str = "PNG", size: tuple[int, int] = (16, 16),
          **save: Any) -> bytes:  # fmt: skip
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt, **save)
    return buf.getvalue()


def palette_image(fmt: str = "PNG", **save: Any) -> bytes:
    im = Image.new("P", (16, 16), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


def noisy_jpeg(size: int = 64, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    im = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few hundred bytes that declare ``width`` x ``height`` 1-bit pixels (10 Gpx by default)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096, 9)  # the first rows only: a decoder would ask for the rest
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


# What each odd-mode image must become once the trainer converts it to RGB (``to_rgb``).
ODD_MODES: dict[str, tuple[bytes, tuple[int, int, int]]] = {
    "cmyk/c.jpg": (image("CMYK", (0, 255, 255, 0), "JPEG"), (255, 0, 0)),
    "cmyk/c.tif": (image("CMYK", (0, 255, 255, 0), "TIFF"), (255, 0, 0)),
    "deep/g16.png": (image("I;16", 40000), (156, 156, 156)),  # not clipped to white
    "deep/g16.tif": (image("I;16", 40000, "TIFF"), (156, 156, 156)),
    "palette/p.png": (palette_image(), (10, 200, 30)),
    "palette/pt.png": (palette_image(transparency=0), (10, 200, 30)),
    "palette/p.gif": (palette_image("GIF"), (10, 200, 30)),
    "alpha/rgba.png": (image("RGBA", (200, 10, 10, 128)), (200, 10, 10)),
    "alpha/la.png": (image("LA", (90, 128)), (90, 90, 90)),
    "alpha/rgba.webp": (image("RGBA", (200, 10, 10, 128), "WEBP", lossless=True), (200, 10, 10)),
    "gray/l.jpg": (image("L", 77, "JPEG"), (77, 77, 77)),
    "gray/bw.png": (image("1", 1), (255, 255, 255)),
    "gray/rgb.bmp": (image("RGB", (1, 2, 3), "BMP"), (1, 2, 3)),
}

# --- archives ----------------------------------------------------------------------------------

Entry = tuple[str | zipfile.ZipInfo, bytes]


def make_zip(entries: Iterable[Entry] | dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of ``entries`` in order (duplicate names allowed: zipfile only warns)."""
    items = entries.items() if isinstance(entries, dict) else entries
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name"
        with zipfile.ZipFile(buf, "w", method) as zf:
            for name, data in items:
                zf.writestr(name, data)
    return buf.getvalue()


def special(name: str, mode: int, data: bytes = b"") -> Entry:
    """An entry whose Unix mode (in ``external_attr``) says link, fifo, device, ..."""
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info, data


def good() -> dict[str, bytes]:
    """Two valid classes: what every hostile case hides its payload among."""
    return {"cats/a.png": image(color=(200, 30, 30)), "dogs/b.png": image(color=(30, 30, 200))}


# Central directory record fields: (offset in the 46-byte record, struct format)
_CD = {"flag_bits": (8, "<H"), "compress_type": (10, "<H"), "CRC": (16, "<I"), "compress_size": (20, "<I"),
       "file_size": (24, "<I"), "external_attr": (38, "<I"), "header_offset": (42, "<I")}  # fmt: skip
# Local file header fields (30 bytes)
_LOCAL = {"flag_bits": (6, "<H"), "compress_type": (8, "<H"), "CRC": (14, "<I"), "compress_size": (18, "<I"),
          "file_size": (22, "<I")}  # fmt: skip


def patch(data: bytes, name: str, local: bool = False, **fields: int) -> bytes:
    """``data`` with the central directory record (and, with ``local``, the local header) of entry
    ``name`` rewritten: e.g. ``file_size=`` to lie about the size."""
    out = bytearray(data)
    zf = zipfile.ZipFile(io.BytesIO(data))
    pos = zf.start_dir
    for info in zf.infolist():
        assert out[pos : pos + 4] == b"PK\x01\x02", "not at a central directory record"
        n, m, k = struct.unpack_from("<HHH", out, pos + 28)
        if info.filename == name:
            for key, value in fields.items():
                offset, fmt = _CD[key]
                struct.pack_into(fmt, out, pos + offset, value)
                if local and key in _LOCAL:
                    offset, fmt = _LOCAL[key]
                    struct.pack_into(fmt, out, info.header_offset + offset, value)
            return bytes(out)
        pos += 46 + n + m + k
    raise KeyError(name)


def offset_of(data: bytes, name: str) -> int:
    return zipfile.ZipFile(io.BytesIO(data)).getinfo(name).header_offset


def corrupt_entry(data: bytes, name: str) -> bytes:
    """``data`` with the compressed bytes of ``name`` scrambled (its headers intact)."""
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(name)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    out = bytearray(data)
    for i in range(start + 2, start + min(info.compress_size, 60) - 2):
        out[i] ^= 0x5A
    return bytes(out)


def tar_with_hard_link() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        payload = image()
        member = tarfile.TarInfo("cats/a.png")
        member.size = len(payload)
        tf.addfile(member, io.BytesIO(payload))
        link = tarfile.TarInfo("dogs/b.png")
        link.type = tarfile.LNKTYPE
        link.linkname = "cats/a.png"
        tf.addfile(link)
    return buf.getvalue()


def labels_zip(csv: bytes, files: Iterable[str] = ("a.png", "b.png", "c.png")) -> bytes:
    entries = {name: image(color=(i * 40, 90, 90)) for i, name in enumerate(files)}
    entries["labels.csv"] = csv
    return make_zip(entries)


# --- requests and cases ------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The server's limits, which the corpus goes beyond."""

    max_upload_bytes: int
    max_upload_files: int
    max_image_pixels: int
    max_classes: int
    max_compression_ratio: int


@dataclass
class Send:
    """One HTTP request."""

    method: str = "POST"
    path: str = "/v1/datasets"
    files: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    content: bytes | None = None
    headers: dict[str, str] | None = None

    def kwargs(self) -> dict[str, Any]:
        names = ("files", "data", "content", "headers")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def upload(archive: bytes, filename: str = "dataset.zip", name: str | None = "hostile") -> Send:
    return Send(files={"file": (filename, archive, "application/zip")}, data={"name": name} if name else None)


def job(body: bytes) -> Send:
    return Send(path="/v1/jobs", content=body, headers={"content-type": "application/json"})


@dataclass
class Case:
    id: str
    topic: str  # the item of the list it covers
    policy: str  # the row of the table in docs/uploads.md
    send: Send
    status: int
    needles: tuple[str, ...]  # phrases the `detail` must contain; the first is quoted in the docs
    counts: dict[str, int] | None = None  # class counts of an accepted (201) dataset
    name: str | None = None  # the accepted dataset's name, where the case is about it
    rgb: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # stored file -> RGB once converted
    max_name_bytes: int | None = None  # every stored file name fits in this many bytes


TOPICS = (
    "zip slip", "symlink", "hard link", "zip bomb (ratio)", "zip bomb (total size)", "nested zip",
    "decompression-bomb png", "truncated jpeg", "corrupt jpeg", "non-image named .jpg", "0-byte file",
    "huge dimensions", "odd image modes", "unicode names", "long names", "hidden files", "single class",
    "empty class", "too many classes", "labels.csv missing rows", "labels.csv extra rows",
    "labels.csv duplicate rows", "wrong content type", "oversized request", "malformed json",
    "out-of-range job parameters",
)  # fmt: skip


def corpus(limits: Limits, mark: str) -> list[Case]:
    """Every case, built for a server with ``limits``; slip targets are named ``*{mark}*``."""
    g = good()
    nfd_cafe = "cafe\u0301"  # "café" as macOS writes it
    bad_jpeg = noisy_jpeg()
    over_pixels = int((limits.max_image_pixels * 1.2) ** 0.5) + 1  # a square just over the limit
    zeros_mb = b"\0" * (1024 * 1024 + 512 * 1024)  # 1.5 MiB of zeros: ~1.5 kB deflated
    assert len(zeros_mb) < limits.max_upload_bytes, "the ratio bomb must fit the total-size limit"
    many_zeros = {f"cats/z{i}.png": b"\0" * 200_000 for i in range(limits.max_upload_bytes // 200_000 + 2)}
    overlap = make_zip({**g, "dogs/c.png": image(color=(1, 2, 3)), "dogs/d.png": image(color=(3, 2, 1))})
    lying = make_zip({**g, "dogs/big.png": b"\0" * 3_000_000})
    json_ok = b'{"dataset_id": "0123456789abcdef0123456789abcdef", "teacher": "timm:test_vit", '
    cases = [
        # --- paths that try to leave the dataset directory
        Case("slip-dotdot", "zip slip", "path-escape", upload(make_zip({**g, f"../{mark}-1.png": image()})),
             400, ("contains '..'", f"../{mark}-1.png")),
        Case("slip-deep", "zip slip", "path-escape",
             upload(make_zip({**g, "cats/" + "../" * 12 + f"tmp/{mark}-2.png": image()})), 400, ("contains '..'",)),
        Case("slip-absolute", "zip slip", "path-absolute",
             upload(make_zip({**g, f"/tmp/{mark}-3.png": image()})), 400, ("has an absolute path",)),
        Case("slip-drive-letter", "zip slip", "path-absolute",
             upload(make_zip({**g, f"C:\\{mark}-4.png": image()})), 400, ("has an absolute path", "C:")),
        Case("slip-unc", "zip slip", "path-absolute",
             upload(make_zip({**g, f"\\\\server\\share\\{mark}-5.png": image()})), 400, ("has an absolute path",)),
        Case("slip-backslash", "zip slip", "path-escape",
             upload(make_zip({**g, f"cats\\..\\..\\..\\{mark}-6.png": image()})), 400, ("contains '..'",)),
        # --- links and special files
        Case("symlink-file", "symlink", "symlink",
             upload(make_zip([*g.items(), special("dogs/passwd.png", stat.S_IFLNK | 0o777, b"/etc/passwd")])),
             400, ("is a symbolic link", "dogs/passwd.png")),
        Case("symlink-dir", "symlink", "symlink",
             upload(make_zip([*g.items(), special("evil/", stat.S_IFLNK | 0o777, b"/tmp"),
                              (f"evil/{mark}-7.png", image())])), 400, ("is a symbolic link", "'evil/'")),
        Case("fifo", "hard link", "special-file",
             upload(make_zip([*g.items(), special("dogs/pipe.png", stat.S_IFIFO | 0o644)])),
             400, ("is not a regular file", "named pipe")),
        Case("device", "hard link", "special-file",
             upload(make_zip([*g.items(), special("dogs/sda.png", stat.S_IFBLK | 0o644)])),
             400, ("is not a regular file", "block device")),
        Case("hardlink-same-data", "hard link", "overlap",  # two names, one block of data
             upload(patch(overlap, "dogs/d.png", header_offset=offset_of(overlap, "dogs/c.png"))),
             400, ("share (overlap in) their data", "dogs/c.png")),
        Case("hardlink-duplicate-name", "hard link", "duplicate",
             upload(make_zip([*g.items(), ("dogs/b.png", image(color=(9, 9, 9)))])),
             400, ("name the same file", "dogs/b.png")),
        Case("duplicate-after-normalization", "unicode names", "duplicate",
             upload(make_zip({**g, "dogs/caf\u00e9.png": image(), f"dogs/{nfd_cafe}.png": image()})),
             400, ("name the same file", "differ only in separators or Unicode form")),
        Case("tar-with-hard-link", "hard link", "not-a-zip", upload(tar_with_hard_link(), "dataset.tar"),
             400, ("not a valid zip archive", "it is a tar archive")),
        # --- bombs
        Case("bomb-ratio", "zip bomb (ratio)", "bomb-ratio", upload(make_zip({**g, "dogs/z.png": zeros_mb})),
             413, ("looks like a zip bomb", f"limit of {limits.max_compression_ratio}x")),
        Case("bomb-total", "zip bomb (total size)", "bomb-total", upload(make_zip({**g, **many_zeros})),
             413, ("The archive expands to", f"limit of {limits.max_upload_bytes} bytes")),
        Case("bomb-declared-4gib", "zip bomb (total size)", "bomb-total",  # refused from the central directory
             upload(patch(make_zip(g), "dogs/b.png", file_size=0xFFFFFFF0)), 413, ("The archive expands to",)),
        Case("too-many-entries", "zip bomb (total size)", "too-many-entries",
             upload(make_zip({**g, **{f"dogs/{i}.png": b"" for i in range(limits.max_upload_files)}})),
             413, ("entries, more than the limit of", f"limit of {limits.max_upload_files}")),
        Case("bomb-lying-header", "zip bomb (ratio)", "corrupt-entry",  # says 1000 bytes, holds 3 MB
             upload(patch(lying, "dogs/big.png", local=True, file_size=1000)),
             400, ("is corrupt and can't be read", "dogs/big.png")),
        Case("bomb-overlapping-entries", "zip bomb (ratio)", "overlap",
             upload(patch(overlap, "dogs/c.png", compress_size=len(overlap) // 2)),
             400, ("share (overlap in) their data",)),
        Case("nested-zip", "nested zip", "nested-archive",
             upload(make_zip({**g, "dogs/more.zip": make_zip(good())})), 422, ("contains other archives", "dogs/more.zip")),
        Case("png-bomb", "decompression-bomb png", "too-many-pixels", upload(make_zip({**g, "dogs/bomb.png": bomb_png()})),
             422, ("pixels; downscale it", f"more than the limit of {limits.max_image_pixels} pixels", "dogs/bomb.png")),
        Case("huge-dimensions", "huge dimensions", "too-many-pixels",
             upload(make_zip({**g, "dogs/huge.jpg": image(size=(over_pixels, over_pixels), fmt="JPEG")})),
             422, ("pixels; downscale it", f"{over_pixels}x{over_pixels} pixels is more than the limit of {limits.max_image_pixels}")),
        # --- broken or disguised files
        Case("truncated-jpeg", "truncated jpeg", "bad-image",
             upload(make_zip({**g, "dogs/cut.jpg": bad_jpeg[: len(bad_jpeg) // 2]})),
             422, ("can't be decoded", "dogs/cut.jpg", "1 image(s) can't be used")),
        Case("corrupt-jpeg", "corrupt jpeg", "bad-image",
             upload(make_zip({**g, "dogs/bad.jpg": bad_jpeg[:300] + random.Random(1).randbytes(3000)})),
             422, ("can't be decoded", "dogs/bad.jpg")),
        Case("several-bad-images", "corrupt jpeg", "bad-image",
             upload(make_zip({**g, **{f"dogs/bad{i}.jpg": b"\xff\xd8\xff\xe0garbage" for i in range(7)}})),
             422, ("image(s) can't be used", "7 image(s) can't be used", "(and 2 more)")),
        Case("text-named-jpg", "non-image named .jpg", "not-an-image",
             upload(make_zip({**g, "dogs/notes.jpg": b"these are my notes, not a photo\n" * 20})),
             422, ("is not a readable image", "dogs/notes.jpg")),
        Case("postscript-named-jpg", "non-image named .jpg", "not-an-image",  # never handed to Ghostscript
             upload(make_zip({**g, "dogs/x.jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"})),
             422, ("is not a readable image",)),
        Case("zero-byte-file", "0-byte file", "empty-file", upload(make_zip({**g, "dogs/empty.png": b""})),
             422, ("is empty (0 bytes)", "dogs/empty.png")),
        Case("corrupt-zip-data", "corrupt zip", "corrupt-entry",
             upload(corrupt_entry(make_zip({**g, "dogs/c.jpg": bad_jpeg}), "dogs/c.jpg")),
             400, ("is corrupt and can't be read", "dogs/c.jpg")),
        Case("encrypted-entry", "corrupt zip", "encrypted",
             upload(patch(make_zip(g), "dogs/b.png", flag_bits=0x1)), 400, ("is encrypted", "without a password")),
        Case("unknown-compression", "corrupt zip", "compression-method",
             upload(patch(make_zip(g), "dogs/b.png", compress_type=99)), 400, ("uses compression method", "compression method 99")),
        Case("truncated-zip", "corrupt zip", "not-a-zip", upload(make_zip(g)[:-40]),
             400, ("not a valid zip archive",)),
        # --- accepted after normalization
        Case("odd-modes", "odd image modes", "accepted-modes",
             upload(make_zip({name: data for name, (data, _) in ODD_MODES.items()})), 201, (),
             counts={"alpha": 3, "cmyk": 2, "deep": 2, "gray": 3, "palette": 3},
             rgb={name: rgb for name, (_, rgb) in ODD_MODES.items()}),
        Case("unicode-names", "unicode names", "accepted-unicode",
             upload(make_zip({"猫/😀.png": image(), f"{nfd_cafe}/Ünïcödé name.png": image(),
                              f"{nfd_cafe}/日本語の名前.jpg": image(fmt="JPEG")})),
             201, (), counts={"caf\u00e9": 2, "猫": 1}),
        Case("unicode-labels-csv", "unicode names", "accepted-unicode",  # NFD files, NFC labels.csv
             upload(labels_zip("path,label\ncaf\u00e9.png,chat\nb.png,chien\n".encode(), (f"{nfd_cafe}.png", "b.png"))),
             201, (), counts={"chat": 1, "chien": 1}),
        Case("long-file-names", "long names", "accepted-long-names",
             upload(make_zip({"cats/" + "x" * 300 + "1.png": image(), "cats/" + "x" * 300 + "2.png": image(),
                              "dogs/" + "名" * 120 + ".jpg": image(fmt="JPEG")})),
             201, (), counts={"cats": 2, "dogs": 1}, max_name_bytes=255),
        Case("long-class-name", "long names", "bad-label",
             upload(make_zip({**g, "名" * 100 + "/x.png": image()})), 422, ("at most 255 bytes",)),
        Case("control-characters", "unicode names", "bad-label",
             upload(make_zip({**g, "bad\tname/x.png": image()})), 422, ("control characters",)),
        Case("hidden-files", "hidden files", "accepted-hidden",
             upload(make_zip({"ds/cats/a.png": image(), "ds/dogs/b.png": image(), "ds/dogs/c.png": image(),
                              "ds/.DS_Store": b"\0\0\0\1Bud1", "ds/cats/.DS_Store": b"junk",
                              "__MACOSX/ds/cats/._a.png": b"\0\5\26\7", "__MACOSX/ds/._dogs": b"junk",
                              "ds/cats/.ipynb_checkpoints/a-checkpoint.png": b"not even an image",
                              "ds/.ipynb_checkpoints/": b"", "ds/.hidden/q.png": image(),
                              "ds/dogs/Thumbs.db": b"junk", "ds/desktop.ini": b"[.ShellClassInfo]"})),
             201, (), counts={"cats": 1, "dogs": 2}),
        Case("hostile-form-filename", "zip slip", "accepted-filename",
             upload(make_zip(g), filename=f"../../{mark}-8.zip", name=None), 201, (),
             counts={"cats": 1, "dogs": 1}, name=f"{mark}-8"),
        # --- layouts a dataset can't have
        Case("single-class", "single class", "one-class", upload(make_zip({"only/a.png": image(), "only/b.png": image()})),
             422, ("a dataset needs at least 2 classes", "'only'")),
        Case("empty-class-folder", "empty class", "empty-class",
             upload(make_zip([*g.items(), (zipfile.ZipInfo("birds/"), b"")])), 422, ("Class folders without images", "birds")),
        Case("class-of-hidden-files", "empty class", "empty-class",
             upload(make_zip({**g, "birds/.DS_Store": b"junk", "birds/Thumbs.db": b"junk"})),
             422, ("Class folders without images", "birds")),
        Case("too-many-classes", "too many classes", "too-many-classes",
             upload(make_zip({f"c{i:02d}/x.png": image() for i in range(limits.max_classes + 1)})),
             422, ("classes, more than the limit of", f"Found {limits.max_classes + 1} classes, more than the limit of {limits.max_classes} classes")),
        Case("labels-missing-row", "labels.csv missing rows", "labels-unlisted",
             upload(labels_zip(b"path,label\na.png,x\nb.png,y\n")), 422, ("not listed in labels.csv", "c.png")),
        Case("labels-extra-row", "labels.csv extra rows", "labels-missing-file",
             upload(labels_zip(b"path,label\na.png,x\nb.png,y\nc.png,y\nghost.png,x\n")),
             422, ("not in the archive", "ghost.png")),
        Case("labels-duplicate-row", "labels.csv duplicate rows", "labels-duplicate",
             upload(labels_zip(b"path,label\na.png,x\nb.png,y\nc.png,y\nb.png,x\n")),
             422, ("is listed twice", "line 5")),
        Case("labels-row-without-path", "labels.csv missing rows", "labels-no-path",
             upload(labels_zip(b"path,label\na.png,x\nb.png,y\nc.png,y\n,x\n")), 422, ("has no path", "line 5 has no path")),
        Case("labels-not-utf8", "labels.csv extra rows", "labels-encoding",
             upload(labels_zip("path,label\na.png,chat\nb.png,café\nc.png,café\n".encode("latin-1"))),
             422, ("labels.csv is not UTF-8",)),
        # --- the request itself
        Case("raw-zip-body", "wrong content type", "not-multipart",
             Send(content=make_zip(g), headers={"content-type": "application/zip"}),
             422, ("Send the dataset as multipart/form-data", "curl -F")),
        Case("png-as-the-upload", "wrong content type", "not-a-zip", upload(image(), "photo.png"),
             400, ("not a valid zip archive", "it is a PNG image")),
        Case("malformed-multipart", "malformed multipart", "bad-multipart",
             Send(content=b"this is not multipart at all",
                  headers={"content-type": "multipart/form-data; boundary=xyzzy"}),
             400, ("The multipart body is malformed",)),
        Case("cut-off-multipart", "malformed multipart", "cut-off-multipart",
             Send(content=b'--xyzzy\r\nContent-Disposition: form-data; name="file"; filename="d.zip"\r\n\r\n'
                  + make_zip(g)[:100], headers={"content-type": "multipart/form-data; boundary=xyzzy"}),
             400, ("ended before its closing boundary",)),
        Case("oversized-request", "oversized request", "too-large",
             upload(random.Random(2).randbytes(limits.max_upload_bytes + 1_200_000)),
             413, ("larger than the limit", f"{limits.max_upload_bytes} bytes")),
        # --- JSON routes
        Case("job-malformed-json", "malformed json", "bad-json", job(b'{"dataset_id": "x",'),
             422, ("the body is not valid JSON", "send a JSON object")),
        Case("job-json-array", "malformed json", "json-not-object", job(b'[{"dataset_id": "x"}]'),
             422, ("valid dictionary",)),
        Case("job-negative-steps", "out-of-range job parameters", "job-range",
             job(json_ok + b'"student": "timm:resnet10t", "steps": {"distill": -1, "finetune_teacher": 1000001}}'),
             422, ("Invalid request: body.", "body.steps.distill", "greater than or equal to 0", "body.steps.finetune_teacher")),
        Case("job-zero-batch-and-lr", "out-of-range job parameters", "job-range",
             job(json_ok + b'"student": "timm:resnet10t", "batch_size": {"distill": 0}, "lr": {"distill": 5}}'),
             422, ("Invalid request: body.", "body.batch_size.distill", "body.lr.distill", "less than or equal to 1")),
        Case("job-huge-integer", "out-of-range job parameters", "job-range",
             job(json_ok + b'"student": "timm:resnet10t", "transfer_set_size": 1180591620717411303424}'),
             422, ("Invalid request: body.", "body.transfer_set_size", "less than or equal to 1000000")),
        Case("job-image-size-type", "out-of-range job parameters", "job-range",
             job(json_ok + b'"student": "timm:resnet10t", "image_size": "huge"}'),
             422, ("Invalid request: body.", "body.image_size", "valid integer")),
    ]  # fmt: skip
    return cases
