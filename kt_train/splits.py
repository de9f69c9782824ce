"""Cut train / test / rest zips out of an ImageFolder (a folder or a zip of ``<class>/<image>``).

``kt datasets split SRC --per-class 10 --test-per-class 50 --seed 0 -o OUTDIR`` writes

- ``train.zip``: ``per_class`` labeled images per class,
- ``test.zip``: ``test_per_class`` other images per class (disjoint from train),
- ``rest.zip`` (unless ``rest=False``): every remaining image, e.g. an unlabeled pool for a gallery.

The choice is deterministic: entries sorted by name, then shuffled per class by ``random.Random(seed)``.
A zip whose class folders sit under one top folder (``EuroSAT_RGB/<class>/...``, ``2750/<class>/...``)
is read as if that folder were its root. No torch import: this runs before anything is installed
beyond the package's light dependencies.
"""

from __future__ import annotations

import os
import random
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

__all__ = ["IMAGE_EXTENSIONS", "SplitError", "SplitResult", "split_imagefolder"]

# the same set as kt_train.data.IMAGE_EXTENSIONS (that module imports torch)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class SplitError(ValueError):
    """The source cannot be split as asked; the message says what to fix."""


@dataclass
class SplitResult:
    classes: list[str]
    written: dict[str, Path] = field(default_factory=dict)  # split name -> zip path
    counts: dict[str, int] = field(default_factory=dict)  # split name -> images written

    def summary(self) -> str:
        lines = [f"{len(self.classes)} classes: {', '.join(self.classes)}"]
        for name, path in self.written.items():
            lines.append(f"{path}: {self.counts[name]} images ({name})")
        return "\n".join(lines)


def _ignored(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _is_image(rel: str) -> bool:
    parts = tuple(p for p in rel.split("/") if p)
    return bool(parts) and not _ignored(parts) and os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS


def _list_entries(src: Path) -> list[str]:
    if src.is_dir():
        return sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    if zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as zf:
            return sorted(i.filename.replace("\\", "/").lstrip("/") for i in zf.infolist() if not i.is_dir())
    raise SplitError(f"{src} is neither a folder nor a zip: pass a folder of class folders or a .zip of one")


def _by_class(entries: list[str]) -> tuple[str, dict[str, list[str]]]:
    """(prefix, class -> entries relative to prefix); a single top folder holding class folders is a prefix."""
    images = [e for e in entries if _is_image(e)]
    prefix = ""
    # every image under one top folder and at least two levels below it: that folder is the root
    while (
        images and all(e.count("/") >= 2 for e in images) and len({e.split("/", 1)[0] for e in images}) == 1
    ):
        top = images[0].split("/", 1)[0]
        prefix += top + "/"
        images = [e[len(top) + 1 :] for e in images]
    classes: dict[str, list[str]] = {}
    for e in images:
        if "/" not in e:
            continue  # an image at the root has no class
        cls, rest = e.split("/", 1)
        classes.setdefault(cls, []).append(cls + "/" + rest)
    return prefix, {c: sorted(v) for c, v in sorted(classes.items())}


def split_imagefolder(
    src: str | Path,
    out_dir: str | Path,
    per_class: int,
    test_per_class: int,
    seed: int = 0,
    rest: bool = True,
) -> SplitResult:
    """Write ``train.zip``, ``test.zip`` and (if ``rest``) ``rest.zip`` into ``out_dir``; see the module."""
    src = Path(src)
    out = Path(out_dir)
    if per_class < 1 or test_per_class < 0:
        raise SplitError(
            f"--per-class must be >= 1 and --test-per-class >= 0 (got {per_class}, {test_per_class})"
        )
    if not src.exists():
        raise SplitError(f"{src} does not exist: pass a folder of class folders or a .zip of one")
    prefix, classes = _by_class(_list_entries(src))
    if not classes:
        raise SplitError(
            f"{src} has no class folders with images: expected <class>/<image>.jpg entries "
            f"(or one top folder holding them, e.g. EuroSAT_RGB/<class>/<image>.jpg)"
        )
    need = per_class + test_per_class
    short = {c: len(v) for c, v in classes.items() if len(v) < need}
    if short:
        listed = ", ".join(f"{c}: {n}" for c, n in sorted(short.items()))
        raise SplitError(
            f"{len(short)} class(es) have fewer than --per-class + --test-per-class = {need} images "
            f"({listed}); lower the counts or add images"
        )
    rng = random.Random(seed)
    plan: dict[str, list[str]] = {"train": [], "test": []}
    if rest:
        plan["rest"] = []
    for _, names in classes.items():
        shuffled = list(names)
        rng.shuffle(shuffled)
        plan["train"] += sorted(shuffled[:per_class])
        plan["test"] += sorted(shuffled[per_class:need])
        if rest:
            plan["rest"] += sorted(shuffled[need:])
    out.mkdir(parents=True, exist_ok=True)
    result = SplitResult(classes=list(classes))
    zf_src = zipfile.ZipFile(src) if not src.is_dir() else None
    try:
        for name, entries in plan.items():
            dest = out / f"{name}.zip"
            tmp = dest.with_suffix(".zip.part")
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
                for rel in entries:
                    arc = str(PurePosixPath(rel))
                    if zf_src is None:
                        dst.write(src / prefix / rel, arc)
                    else:
                        with zf_src.open(prefix + rel) as fin, dst.open(arc, "w") as fout:
                            shutil.copyfileobj(fin, fout)
            tmp.replace(dest)
            result.written[name] = dest
            result.counts[name] = len(entries)
    finally:
        if zf_src is not None:
            zf_src.close()
    return result
