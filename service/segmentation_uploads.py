"""Segmentation dataset uploads: a zip of ``images/<path>.<ext>`` + ``masks/<path>.png`` (+
``classes.json``), validated and extracted in the layout ``kt_train.tasks.segmentation.SegmentationDataset``
reads.

The archive goes through every check of a classification upload first (``service.uploads``:
limits, unsafe paths, zip bombs, overlapping entries, pixel caps, every image decoded). Then the
mask rules of ``kt_train.tasks.segmentation`` (``find_pairs``, ``decode_mask``,
``SegmentationDataset.check``), mirrored here with PIL and numpy because the service never imports
torch: every image has a mask with the same relative stem and every mask an image; a mask is a
single-channel PNG (mode ``L``, a palette PNG whose indices are the classes, or 16-bit with values
< 256), of its image's size, whose values are class indices or the void index. Colour (RGB) masks
are refused: they need a colour-to-class map, which an index mask makes explicit. The messages
match the library's, so a dataset refused here is refused there in the same words
(``tests/service/test_segmentation_uploads.py`` checks both on one damaged dataset).

The class list comes from ``classes.json`` in the archive (``{"classes": [...], "void_index": N}``)
or from the upload's ``classes`` / ``void_index`` form fields (not both). Stored:
``<dest>/images/...``, ``<dest>/masks/...`` and ``<dest>/classes.json``; ``dest`` appears only when
everything passed.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

from PIL import Image

from service import storage
from service.api.errors import Invalid, TooLarge
from service.settings import Settings
from service.uploads import (
    _READ_ERRORS,
    IMAGE_FORMATS,
    NAME_MAX,
    IngestedDataset,
    _check_readable,
    _copy_entry,
    _image_problem,
    _listing,
    _safe_label,
    _short,
    _unreadable,
    open_archive,
    read_entries,
)

# what kt_train.tasks.segmentation reads (IMAGE_EXTS, MASK_EXTS, CLASSES_FILE)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MASK_EXTS = (".png",)
CLASSES_FILE = "classes.json"
MAX_CLASSES_BYTES = 1024 * 1024
MASK_MODES = ("L", "P")  # read as their indices
WIDE_MODES = ("I;16", "I", "I;16B")  # accepted when every value is < 256
LAYOUT_HINT = (
    "a segmentation dataset holds images/<path>.jpg|png, masks/<path>.png (same path and stem) and "
    "classes.json"
)

Parts = tuple[str, ...]


def looks_like_segmentation(entries: dict[Parts, zipfile.ZipInfo]) -> bool:
    """True when the archive's top (or the one folder around everything) is ``images/`` + ``masks/``
    (and maybe ``classes.json``), nothing else."""
    tops = {p[0] for p in _relative(entries)}
    return {"images", "masks"} <= tops <= {"images", "masks", CLASSES_FILE}


def _relative(entries: dict[Parts, zipfile.ZipInfo]) -> dict[Parts, zipfile.ZipInfo]:
    """The entries relative to the dataset's root: one top folder around everything (not itself
    ``images`` or ``masks``) is stripped, as ``kt_train.tasks.segmentation`` does."""
    tops = {parts[0] for parts in entries}
    if len(tops) == 1 and all(len(p) >= 2 for p in entries) and not {"images", "masks"} & tops:
        return {parts[1:]: info for parts, info in entries.items()}
    return dict(entries)


def parse_classes(raw: object, where: str, max_classes: int) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise Invalid(f'{where} must be a list of class names, e.g. ["sky", "road", "car"].')
    classes = [_safe_label(c, where) for c in raw]
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise Invalid(f"{where} names a class twice: {_listing(dupes)}; give each class once.")
    if len(classes) < 2:
        raise Invalid(
            f"{where} has {len(classes)} class(es); a segmentation task needs at least two classes."
        )
    if len(classes) > max_classes:
        raise Invalid(f"{where} has {len(classes)} classes, more than the limit of {max_classes} classes.")
    return classes


def parse_void_index(raw: object, classes: list[str], where: str) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 255:
        raise Invalid(
            f"{where} must be an integer 0..255 (a mask value) or null, not {_short(repr(raw), 40)}."
        )
    if raw < len(classes):
        raise Invalid(
            f"void_index {raw} is the index of class {classes[raw]!r}; the void index must lie outside "
            f"0..{len(classes) - 1}"
        )
    return raw


def classes_from_fields(
    classes_field: str | None, void_field: str | None, max_classes: int
) -> tuple[list[str], int | None] | None:
    """The ``classes`` / ``void_index`` form fields (``None`` when ``classes`` is absent).
    ``classes``: a JSON list or comma-separated names; ``void_index``: an integer or empty."""
    if classes_field is None or not classes_field.strip():
        if void_field is not None and void_field.strip():
            raise Invalid("Form field `void_index` needs `classes` beside it (or a classes.json in the zip).")
        return None
    text = classes_field.strip()
    raw: object
    if text.startswith("["):
        try:
            raw = json.loads(text)
        except ValueError as err:
            raise Invalid(f'Form field `classes` is not a JSON list ({err}); e.g. ["sky", "road"].') from err
    else:
        raw = [c.strip() for c in text.split(",")]
    classes = parse_classes(raw, "Form field `classes`", max_classes)
    void: object = None
    if void_field is not None and void_field.strip():
        try:
            void = int(void_field.strip())
        except ValueError as err:
            raise Invalid(
                f"Form field `void_index` must be an integer 0..255, not {_short(void_field, 40)!r}."
            ) from err
    return classes, parse_void_index(void, classes, "Form field `void_index`")


def _read_classes_file(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, max_classes: int
) -> tuple[list[str], int | None]:
    if info.file_size > MAX_CLASSES_BYTES:
        raise TooLarge(
            f"{CLASSES_FILE} is larger than {MAX_CLASSES_BYTES} bytes; it holds only the class list."
        )
    _check_readable(info)
    try:
        raw = zf.read(info)
    except _READ_ERRORS as err:
        raise _unreadable(info, err) from err
    try:
        meta = json.loads(raw.decode("utf-8-sig"))
    except ValueError as err:
        raise Invalid(
            f"{CLASSES_FILE} is not UTF-8 JSON ({err}); write "
            '{"classes": ["sky", "road", ...], "void_index": 255}.'
        ) from err
    if not isinstance(meta, dict) or "classes" not in meta:
        raise Invalid(
            f'{CLASSES_FILE} needs a \'classes\' list, e.g. {{"classes": ["sky", "road"], "void_index": 255}}.'
        )
    classes = parse_classes(meta["classes"], CLASSES_FILE, max_classes)
    return classes, parse_void_index(meta.get("void_index"), classes, f"{CLASSES_FILE}'s void_index")


def find_pairs(rel: dict[Parts, zipfile.ZipInfo]) -> list[tuple[Parts, Parts]]:
    """(image, mask) paths paired by their relative stem, as ``kt_train``'s ``find_pairs``."""
    images: dict[str, Parts] = {}
    masks: dict[str, Parts] = {}
    for parts in sorted(rel):
        top, rest = parts[0], parts[1:]
        if not rest:
            continue
        stem, ext = os.path.splitext("/".join(rest))
        ext = ext.lower()
        if top == "images" and ext in IMAGE_EXTS:
            if stem in images:
                raise Invalid(
                    f"two images for {stem!r}: {'/'.join(images[stem])} and {'/'.join(parts)}; keep one"
                )
            images[stem] = parts
        elif top == "masks" and ext in MASK_EXTS:
            masks[stem] = parts
    if not images and not masks:
        raise Invalid(
            "no segmentation pairs found: put the images under images/ and their index masks (PNG, same "
            "relative path and stem) under masks/, e.g. images/a.jpg + masks/a.png"
        )
    no_mask = sorted(set(images) - set(masks))
    if no_mask:
        shown = _listing(["/".join(images[s]) for s in no_mask])
        raise Invalid(f"{len(no_mask)} image(s) have no mask, e.g. {shown} (expected masks/{no_mask[0]}.png)")
    no_image = sorted(set(masks) - set(images))
    if no_image:
        shown = _listing(["/".join(masks[s]) for s in no_image])
        raise Invalid(
            f"{len(no_image)} mask(s) have no image, e.g. {shown} (expected images/{no_image[0]}.jpg or .png)"
        )
    return [(images[k], masks[k]) for k in sorted(images)]


def mask_problem(
    path: Path, name: str, image: str, image_size: tuple[int, int], num_classes: int, void_index: int | None
) -> tuple[str | None, set[int]]:
    """(why the mask at ``path`` can't be used or ``None``, the class values it holds). The
    reasons are ``kt_train.tasks.segmentation``'s (``decode_mask``, ``SegmentationDataset.check``)."""
    import numpy as np  # here: the API process itself never loads numpy (tests/service/test_db.py)

    try:
        with Image.open(path, formats=("PNG",)) as im:
            im.verify()
        with Image.open(path, formats=("PNG",)) as im:
            im.load()
            mode, size = im.mode, im.size
            arr = np.asarray(im)
    except Image.DecompressionBombError:
        return f"mask {name} is larger than the pixel limit; downscale it with its image", set()
    except Exception as err:  # PIL raises many types for a broken file
        reason = str(err).replace(str(path), name)
        return f"mask {name} is not a readable PNG ({reason})", set()
    if mode in WIDE_MODES:
        if arr.size and int(arr.max()) > 255:
            return f"mask {name} has values up to {int(arr.max())}; class indices must be < 256", set()
    elif mode not in MASK_MODES:
        return (
            f"mask {name} is a {mode} image; masks must be single-channel PNGs of class indices "
            "(mode L or a palette PNG), not colour pictures; convert colours to indices first",
            set(),
        )
    if size != image_size:
        return (
            f"mask {name} is {size[0]}x{size[1]} but its image {image} is {image_size[0]}x{image_size[1]}; "
            "a mask must have its image's size",
            set(),
        )
    values = {int(v) for v in np.unique(arr)}
    bad = sorted(v for v in values if v >= num_classes and v != void_index)
    if bad:
        void = "" if void_index is None else f" or the void index {void_index}"
        return (
            f"mask {name} has values {bad[:5]} outside the {num_classes} classes (0..{num_classes - 1}{void})",
            set(),
        )
    return None, {v for v in values if v < num_classes}


def _check_name(parts: Parts, info: zipfile.ZipInfo) -> None:
    """Stored under its own path: each component must be a name this file system takes."""
    for part in parts:
        if len(part.encode()) > NAME_MAX or any(ord(c) < 32 or ord(c) == 127 for c in part):
            raise Invalid(
                f"Archive entry {_short(info.filename)!r} has a path component that can't be a file name "
                f"(control characters, or more than {NAME_MAX} bytes); rename it and its mask/image alike."
            )


def ingest_segmentation_zip(
    archive: Path,
    dest: Path,
    settings: Settings,
    classes_field: str | None = None,
    void_field: str | None = None,
) -> IngestedDataset:
    """Validate ``archive`` as a segmentation dataset and extract it to ``dest`` (module docstring;
    ``dest`` must not exist). ``class_counts``: how many frames each class appears in."""
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    given = classes_from_fields(classes_field, void_field, settings.max_classes)
    zf = open_archive(archive)
    staging = dest.parent / f".staging-{dest.name}"
    with zf:
        entries, _dirs = read_entries(zf, settings)
        if not entries:
            raise Invalid(f"The archive contains no files; {LAYOUT_HINT}.")
        rel = _relative(entries)
        others = sorted(
            info.filename
            for parts, info in rel.items()
            if parts != (CLASSES_FILE,)
            and not (
                len(parts) >= 2
                and parts[0] == "images"
                and os.path.splitext(parts[-1])[1].lower() in IMAGE_EXTS
            )
            and not (
                len(parts) >= 2
                and parts[0] == "masks"
                and os.path.splitext(parts[-1])[1].lower() in MASK_EXTS
            )
        )
        if others:
            raise Invalid(
                f"The archive has files outside the segmentation layout ({_listing(others)}); {LAYOUT_HINT} "
                f"(images: {', '.join(IMAGE_EXTS)}; masks: .png). Remove them."
            )
        classes_info = rel.pop((CLASSES_FILE,), None)
        if classes_info is not None and given is not None:
            raise Invalid(
                f"The classes are given twice: in the form fields `classes`/`void_index` and in {CLASSES_FILE}; "
                "keep one."
            )
        if classes_info is not None:
            classes, void_index = _read_classes_file(zf, classes_info, settings.max_classes)
        elif given is not None:
            classes, void_index = given
        else:
            raise Invalid(
                f'The archive has no {CLASSES_FILE}; add one ({{"classes": ["sky", ...], "void_index": 255}}) '
                "or send the form fields `classes` (and `void_index`)."
            )
        pairs = find_pairs(rel)
        for parts, info in rel.items():
            _check_name(parts, info)
        staging.mkdir(parents=True, exist_ok=False)
        try:
            total = 0
            bad: list[str] = []
            frames = dict.fromkeys(range(len(classes)), 0)
            for image_parts, mask_parts in pairs:
                image_name, mask_name = "/".join(image_parts), "/".join(mask_parts)
                image_path, mask_path = staging.joinpath(*image_parts), staging.joinpath(*mask_parts)
                image_path.parent.mkdir(parents=True, exist_ok=True)
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                total += _copy_entry(zf, rel[image_parts], image_path)
                total += _copy_entry(zf, rel[mask_parts], mask_path)
                problem = _image_problem(image_path, settings.max_image_pixels, rel[image_parts].filename)
                if problem:
                    bad.append(f"image {image_name} {problem}")
                    continue
                if mask_path.stat().st_size == 0:
                    bad.append(f"mask {mask_name} is empty (0 bytes)")
                    continue
                with Image.open(image_path, formats=IMAGE_FORMATS) as im:
                    size = im.size
                reason, values = mask_problem(
                    mask_path, mask_name, image_name, size, len(classes), void_index
                )
                if reason:
                    bad.append(reason)
                for v in values:
                    frames[v] += 1
            if bad:
                raise Invalid(f"{len(bad)} file(s) can't be used; fix or remove them: {_listing(bad)}.")
            (staging / CLASSES_FILE).write_text(
                json.dumps({"classes": classes, "void_index": void_index}, ensure_ascii=False) + "\n"
            )
            storage.publish(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return IngestedDataset(
        num_images=len(pairs),
        classes=classes,
        class_counts={classes[i]: n for i, n in frames.items()},
        bytes=total,
    )
