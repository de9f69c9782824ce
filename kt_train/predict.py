"""Run an exported model on image files, preprocessed exactly as its model card says (``kt predict``).

The card's ``preprocessing`` is the dict evaluation used to reach the card's test metrics
(``kt_train.models.preprocessing``); this module builds the very same ``EvalTransform`` from it, so
an exported ONNX file run here predicts what the evaluate stage measured.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .curate import CSV_ESCAPED
from .data import load_unlabeled
from .errors import ConfigError, KTError
from .io import atomic_write_text
from .transforms import EvalTransform

log = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "Prediction",
    "card_preprocessing",
    "find_card",
    "format_of",
    "predict_files",
    "preprocess",
    "write_predictions",
]

FORMATS: tuple[str, ...] = ("onnx", "safetensors", "torchscript")
_SUFFIXES = {".onnx": "onnx", ".safetensors": "safetensors", ".pt": "torchscript", ".pth": "torchscript"}
CARD_NAME = "model_card.json"  # what the export writes beside its files (kt_train.export.CARD_NAME)
# what `kt models download` writes beside a downloaded file (not ``<stem>.card.json``: that name is
# a teacher weights file's card, which `kt admin register-model` reads with another schema)
CARD_SUFFIX = ".model_card.json"


@dataclass
class Prediction:
    """The top class of one image, with its probability and the ``top_k`` classes (best first)."""

    path: str
    label: str
    prob: float
    top_k: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "label": self.label,
            "prob": self.prob,
            "top_k": [{"label": c, "prob": p} for c, p in self.top_k],
        }


def format_of(model_path: str | Path, format: str | None = None) -> str:
    """``format`` checked, else the one the file name says (.onnx, .safetensors, .pt)."""
    if format is not None:
        fmt = format.strip().lower()
        if fmt not in FORMATS:
            raise ConfigError(f"unknown model format {format!r}; use one of {', '.join(FORMATS)}")
        return fmt
    fmt_or_none = _SUFFIXES.get(Path(model_path).suffix.lower())
    if fmt_or_none is None:
        raise ConfigError(
            f"cannot tell the format of {model_path} from its name; pass --format {'|'.join(FORMATS)}"
        )
    return fmt_or_none


def find_card(model_path: str | Path, card: str | Path | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model card of ``model_path``: ``card`` (a dict, or a JSON file: a card or the output of
    ``kt models show --json``), else ``<model stem>.model_card.json`` (what ``kt models download``
    writes) or ``model_card.json`` (the export's) beside it."""
    if isinstance(card, Mapping):
        return _check_card(dict(card), "the card given")
    model = Path(model_path)
    if not model.is_file():  # else the missing card would be named, not the missing model
        raise ConfigError(f"model file {model} does not exist; download it with `kt models download`")
    if card is not None:
        candidates = [Path(card)]
    else:
        candidates = [model.with_name(model.stem + CARD_SUFFIX), model.with_name(CARD_NAME)]
    for path in candidates:
        if path.is_file():
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise ConfigError(f"{path} is not JSON: {e}") from e
            if isinstance(obj, dict) and isinstance(obj.get("card"), dict):  # kt models show --json
                obj = obj["card"]
            return _check_card(obj, str(path))
    if card is not None:
        raise ConfigError(f"model card {card} does not exist")
    raise ConfigError(
        f"no model card beside {model} (looked for {candidates[0].name} and {CARD_NAME}); pass --card "
        "CARD (the export's model_card.json, or `kt models show ID --json > card.json`)"
    )


def _check_card(card: Any, where: str) -> dict[str, Any]:
    if not isinstance(card, dict):
        raise ConfigError(f"{where} is not a model card (a JSON object)")
    missing = [k for k in ("classes", "preprocessing") if not card.get(k)]
    if missing:
        raise ConfigError(f"{where} is not a model card: it has no {' and no '.join(missing)}")
    return card


def card_preprocessing(card: Mapping[str, Any]) -> dict[str, Any]:
    """The card's ``preprocessing``, read the way evaluation applied it.

    A card written before the card described evaluation (no ``resize`` field) carries timm's
    pretrained defaults (e.g. bicubic, crop_pct 0.875), which evaluation never applied: its test
    metrics were measured with the shorter side resized bilinearly and nothing cropped off, so
    that is what such a card gets here (with a warning), to predict what the metrics counted.
    """
    pre = dict(card["preprocessing"])
    if "resize" not in pre:
        log.warning(
            "the model card predates the card's description of evaluation's preprocessing; using "
            "what evaluation did (bilinear, crop_pct 1.0) instead of its interpolation=%s, crop_pct=%s",
            pre.get("interpolation"),
            pre.get("crop_pct"),
        )
        pre.update(
            resize="shorter_side",
            resize_size=pre.get("input_size"),
            interpolation="bilinear",
            crop="center",
            crop_pct=1.0,
        )
    return pre


def preprocess(pre: Mapping[str, Any]) -> Callable[[Any], np.ndarray]:
    """A function PIL image -> float32 [3, size, size] array, normalized as ``pre`` (a card's
    ``preprocessing``) says: evaluation's own transform, then / 255 and (x - mean) / std."""
    transform = EvalTransform.from_preprocessing(pre)
    try:
        mean = np.asarray(pre["mean"], dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(pre["std"], dtype=np.float32).reshape(3, 1, 1)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"the card's preprocessing needs mean and std (3 numbers each): {e}") from e

    def run(img: Any) -> np.ndarray:
        x = transform(img).numpy().astype(np.float32) / np.float32(255.0)
        return (x - mean) / std

    return run


# --------------------------------------------------------------------------- runners


def _onnx_runner(path: Path, threads: int | None) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise KTError(f"onnxruntime cannot load {path}: {e}") from e
    name = session.get_inputs()[0].name
    return lambda x: np.asarray(session.run(None, {name: x})[0])


def _torch_runner(path: Path, fmt: str, card: Mapping[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    if fmt == "torchscript":
        model = torch.jit.load(str(path), map_location="cpu")
    else:
        import safetensors.torch
        import timm

        try:
            name, num_classes = str(card["timm_name"]), int(card["num_classes"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"running a safetensors file needs the card's timm_name and num_classes: {e}"
            ) from e
        model = timm.create_model(
            name, pretrained=False, num_classes=num_classes, **(card.get("model_kwargs") or {})
        )
        model.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
    model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()

    return run


# --------------------------------------------------------------------------- prediction


def _batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def predict_files(
    model_path: str | Path,
    card: str | Path | Mapping[str, Any] | None,
    paths: str | Path | Sequence[str | Path],
    *,
    format: str | None = None,
    top_k: int = 5,
    batch_size: int = 64,
    threads: int | None = None,
) -> list[Prediction]:
    """Predict every image in ``paths`` (image files, folders searched recursively, zips, tar shards,
    manifests) with the exported model at ``model_path``, preprocessed as its card says.

    ``card``: a dict or a JSON file; None looks beside the model (``find_card``). ``format``: onnx
    (onnxruntime), safetensors (timm, the card's timm_name/model_kwargs) or torchscript; default
    from the file name. Predictions come in the order of the images (folders and zips sorted).
    """
    model = Path(model_path)
    if not model.is_file():
        raise ConfigError(f"model file {model} does not exist; download it with `kt models download`")
    fmt = format_of(model, format)
    meta = find_card(model, card)
    classes = [str(c) for c in meta["classes"]]
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    prep = preprocess(card_preprocessing(meta))
    run = _onnx_runner(model, threads) if fmt == "onnx" else _torch_runner(model, fmt, meta)
    ds = load_unlabeled(list(paths) if isinstance(paths, (list, tuple)) else paths)
    k = min(top_k, len(classes))
    out: list[Prediction] = []
    for idx in _batches(len(ds), batch_size):
        x = np.stack([prep(ds.load_image(i)) for i in idx])
        logits = run(x).astype(np.float64)
        if logits.ndim != 2 or logits.shape[1] != len(classes):
            raise KTError(
                f"{model} returns logits of shape {logits.shape}, but its card lists {len(classes)} classes"
            )
        z = np.exp(logits - logits.max(1, keepdims=True))
        probs = z / z.sum(1, keepdims=True)
        for row, i in zip(probs, idx, strict=True):
            order = np.argsort(-row, kind="stable")[:k]
            top = [(classes[j], round(float(row[j]), 6)) for j in order]
            out.append(Prediction(ds.describe(i), top[0][0], top[0][1], top))
    return out


def write_predictions(predictions: Sequence[Prediction], path: str | Path) -> Path:
    """Write ``predictions`` as CSV (path, label, prob, top_k as 'label:prob;...') or JSONL (one
    ``Prediction.to_dict`` a line), as the file name says. CSV text cells are quoted and one that a
    spreadsheet would run as a formula gets a leading quote, like the manifest CSV (``write_manifest``)."""
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix == ".jsonl":
        return atomic_write_text(
            out, "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in predictions)
        )
    if suffix != ".csv":
        raise ConfigError(f"--out {out}: write a .csv or a .jsonl file")

    def cell(value: str) -> str:
        return "'" + value if value.startswith(CSV_ESCAPED) else value

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    w.writerow(["path", "label", "prob", "top_k"])
    for p in predictions:
        top = ";".join(f"{c}:{q:.6f}" for c, q in p.top_k)
        w.writerow([cell(p.path), cell(p.label), p.prob, cell(top)])
    return atomic_write_text(out, buf.getvalue())


# --------------------------------------------------------------------------- segmentation models


@dataclass
class MaskPrediction:
    """One image's predicted index mask (written as a PNG at the image's own size) and the share of
    its pixels per class."""

    path: str
    mask: str
    class_share: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "mask": self.mask, "class_share": self.class_share}


def is_segmentation_card(card: Mapping[str, Any]) -> bool:
    return card.get("task") == "segmentation"


def predict_masks(
    model_path: str | Path,
    card: str | Path | Mapping[str, Any] | None,
    paths: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    format: str | None = None,
    threads: int | None = None,
) -> list[MaskPrediction]:
    """Segment every image in ``paths`` with an exported segmentation model (ONNX in onnxruntime),
    preprocessed as its card says (the whole frame resized to ``input_size``, bilinear, [0, 1]):
    each mask, the argmax at the image's own size, is written to ``out_dir/<name>.png`` (class
    indices; the card's ``palette`` colours them)."""
    from PIL import Image

    model = Path(model_path)
    if not model.is_file():
        raise ConfigError(f"model file {model} does not exist; download it with `kt models download`")
    fmt = format_of(model, format)
    if fmt != "onnx":
        raise ConfigError(
            "segmentation models are predicted from their ONNX file: pass model.onnx (--format onnx)"
        )
    meta = find_card(model, card)
    classes = [str(c) for c in meta["classes"]]
    h, w = (int(v) for v in meta["preprocessing"]["input_size"])
    run = _onnx_runner(model, threads)
    ds = load_unlabeled(list(paths) if isinstance(paths, (list, tuple)) else paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[MaskPrediction] = []
    taken: set[str] = set()
    for i in range(len(ds)):
        img = ds.load_image(i)
        x = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)[None] / 255.0
        logits = run(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        if logits.ndim != 4 or logits.shape[1] != len(classes):
            raise KTError(f"{model} returns {logits.shape}, not (N, {len(classes)}, H, W) class maps")
        small = logits[0].argmax(0).astype(np.uint8)
        mask = np.asarray(Image.fromarray(small).resize(img.size, Image.Resampling.NEAREST))
        name = Path(ds.describe(i)).stem or f"image{i}"
        while name in taken:
            name += "_"
        taken.add(name)
        dest = out / f"{name}.png"
        Image.fromarray(mask, mode="L").save(dest)
        counts = np.bincount(mask.reshape(-1), minlength=len(classes))[: len(classes)]
        share = {c: round(float(n) / mask.size, 4) for c, n in zip(classes, counts, strict=True) if n}
        results.append(MaskPrediction(ds.describe(i), str(dest), share))
    return results
