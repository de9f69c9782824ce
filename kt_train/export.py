"""Export a trained timm student to deployable files plus a model card.

Every artifact is derived from one CPU model rebuilt exactly the way a consumer will rebuild it
(``timm.create_model(timm_name, num_classes=..., **model_kwargs)`` + strict ``load_state_dict``), so a
mismatch between the trained model and its recorded recipe fails here, not in production. Each
format is verified against that model before the card, written last, declares it.

Verification is judged as a deployment sees it (``measure_parity``): on realistic inputs (smooth
random images in [0, 1], normalized with the model's mean/std) the format must pick the same class
as torch, give probabilities within ``prob_atol`` and logits within ``logit_rtol`` of the logits'
scale. An absolute logit tolerance alone refuses good files: float32 kernels differ by ~1e-3 on
logits of magnitude ~10, which changes no prediction. The measured numbers go into the card.

With ``strict=False`` a format that fails its check is left out and reported in the card's
``failed_formats`` (with by how much it failed) instead of failing the export, so a finished
training always ends with a model: the other formats are still written, and when none passed the
safetensors weights are written anyway.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kt_train.errors import ConfigError, KTError
from kt_train.formats import not_exported_message
from kt_train.io import is_disk_full

SUPPORTED_FORMATS: tuple[str, ...] = ("safetensors", "onnx", "torchscript")

FILE_NAMES: dict[str, str] = {
    "safetensors": "model.safetensors",
    "onnx": "model.onnx",
    "torchscript": "model.torchscript.pt",
}
CARD_NAME = "model_card.json"

ONNX_INPUT_NAME = "input"
ONNX_OUTPUT_NAME = "logits"

# Batch sizes used to verify exported files: 4 is the traced size, 3 proves the batch axis is dynamic.
_VERIFY_BATCHES = (4, 3)
_VERIFY_SEED = 0
VERIFY_INPUTS = "smooth random RGB images in [0, 1] (8x8 noise upsampled, plus pixel noise), normalized"
# ImageNet statistics: the normalization when neither the caller nor the card's preprocessing gives one.
_DEFAULT_MEAN = (0.485, 0.456, 0.406)
_DEFAULT_STD = (0.229, 0.224, 0.225)

# Tolerances of an exported format, as deployment judges it (see the module docstring).
DEFAULT_LOGIT_RTOL = 1e-3
DEFAULT_PROB_ATOL = 1e-3
# CPU latency on the card: the median of this many batch-1 forward passes (after 2 warm-up passes)
# with one intra-op thread; few, so an export stays quick, and the median shrugs off a busy core.
LATENCY_RUNS = 10
_LATENCY_WARMUP = 2

# The rebuilt torch model against the caller's, both torch on CPU: only memory format may differ, so
# anything above rounding means the recipe (timm_name/model_kwargs) does not rebuild the model.
_RELOAD_RTOL = 1e-4


class ExportError(KTError):
    """An exported file cannot be produced or does not reproduce the torch model's predictions."""


class ParityError(ExportError):
    """An exported file runs but its predictions differ from torch's beyond the tolerances.

    ``parity`` holds the measured numbers (``measure_parity``)."""

    def __init__(self, message: str, parity: dict[str, Any]) -> None:
        super().__init__(message)
        self.parity = parity


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def export_model(
    model: torch.nn.Module,
    *,
    timm_name: str,
    model_kwargs: dict,
    num_classes: int,
    input_size: int,
    out_dir: str | Path,
    formats: Sequence[str] = SUPPORTED_FORMATS,
    card: dict | None = None,
    opset: int = 17,
    logit_rtol: float = DEFAULT_LOGIT_RTOL,
    prob_atol: float = DEFAULT_PROB_ATOL,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    strict: bool = True,
    latency_runs: int = LATENCY_RUNS,
) -> dict[str, Path]:
    """Write the requested formats and ``model_card.json`` to ``out_dir``; return ``{format|"card": path}``.

    ``model`` is a timm classifier producing raw logits from normalized input. It is never modified:
    all work happens on CPU copies, so its device and train/eval mode are unchanged for the caller.
    The card is written last, so its presence means every listed file was written and verified.

    Every format must agree with torch on the verify inputs (``measure_parity``): the same argmax,
    probabilities within ``prob_atol``, logits within ``logit_rtol`` of the logits' scale. The
    inputs are normalized with ``mean``/``std`` (default: the card's ``preprocessing``, else
    ImageNet's). ``strict`` raises ``ExportError`` for a format that fails; otherwise the format is
    left out of the result and listed in the card's ``failed_formats`` with the reason, and when no
    requested format passed, ``model.safetensors`` is written anyway so the weights are never lost.
    Errors that no format can survive (a full disk, a recipe that does not rebuild the model) always raise.

    The card also records ``num_params``, ``file_bytes`` (per written format) and ``cpu_latency``
    (``measure_cpu_latency`` of the rebuilt torch model, ``latency_runs`` passes; 0 leaves it out).
    """
    fmts = _check_formats(formats)
    model_kwargs = dict(model_kwargs or {})
    _check_args(timm_name, model_kwargs, num_classes, input_size, opset, logit_rtol, prob_atol)
    caller_card = dict(card or {})
    _to_json(caller_card)  # fail fast on an unserializable card, before any expensive work
    norm_mean, norm_std = _normalization(caller_card, mean, std)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    model = _unwrap(model)
    state = _cpu_state_dict(model)
    ref = _rebuild(timm_name, model_kwargs, num_classes, state)
    xs = _verify_inputs(input_size, norm_mean, norm_std)
    export_info: dict[str, Any] = {
        "verify_batches": list(_VERIFY_BATCHES),
        "verify_inputs": VERIFY_INPUTS,
        "tolerance": {"logit_rtol": logit_rtol, "prob_atol": prob_atol},
    }
    export_info["torch_reload_max_abs_diff"] = _check_reload_parity(model, ref, xs[0])
    expected = [_ref_logits(ref, x) for x in xs]
    tol = (logit_rtol, prob_atol)

    written: dict[str, Path] = {}
    failed: dict[str, str] = {}
    parity: dict[str, dict[str, Any]] = {}
    for fmt in fmts:
        path = out / FILE_NAMES[fmt]
        try:
            if fmt == "safetensors":
                _export_safetensors(state, path)
            elif fmt == "onnx":
                info = _export_onnx(ref, path, xs, expected, opset, tol)
                parity["onnx"] = info.pop("parity")
                export_info.update(info)
            else:
                parity["torchscript"] = _export_torchscript(ref, path, xs, expected, tol)
                export_info["torchscript_max_abs_diff"] = parity["torchscript"]["max_abs_logit_diff"]
        except ExportError as e:
            if strict or is_disk_full(e):
                raise
            failed[fmt] = str(e)
            if isinstance(e, ParityError):
                parity[fmt] = e.parity
            path.unlink(missing_ok=True)  # an earlier export's file would pass for this model's
            continue
        written[fmt] = path
    if not written:  # strict=False and every requested format failed: keep the weights all the same
        _export_safetensors(state, out / FILE_NAMES["safetensors"])
        written["safetensors"] = out / FILE_NAMES["safetensors"]
        export_info["fallback_format"] = "safetensors"
    export_info["parity"] = {fmt: _json_safe(p) for fmt, p in parity.items()}
    export_info["versions"] = _versions()
    facts: dict[str, Any] = {"num_params": sum(int(p.numel()) for p in ref.parameters())}
    if latency_runs > 0:
        facts["cpu_latency"] = measure_cpu_latency(ref, input_size, runs=latency_runs)

    full_card = _build_card(
        caller_card, timm_name, model_kwargs, num_classes, input_size, written, failed, export_info, facts
    )
    card_path = out / CARD_NAME
    _atomic_write(card_path, lambda tmp: tmp.write_text(_to_json(full_card) + "\n", encoding="utf-8"))
    written["card"] = card_path
    return written


def load_exported(out_dir: str | Path) -> torch.nn.Module:
    """Rebuild the timm model described by ``out_dir/model_card.json`` from its safetensors, in eval mode.

    Uses the same recipe the card advertises, so this is the reference way to consume an export.
    """
    import safetensors.torch
    import timm

    out = Path(out_dir)
    card_path = out / CARD_NAME
    if not card_path.is_file():
        raise ExportError(f"{card_path} not found; is {out} the out_dir of an export_model call?")
    try:
        meta = json.loads(card_path.read_text(encoding="utf-8"))
        timm_name = meta["timm_name"]
        num_classes = int(meta["num_classes"])
        model_kwargs = dict(meta.get("model_kwargs") or {})
        files = meta.get("files") or {}
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{card_path} is not a valid model card: {e}") from e
    if "safetensors" not in files:
        raise ExportError(
            f"{card_path} lists no safetensors file (files: {sorted(files)}); "
            "re-export with 'safetensors' in formats to make it loadable."
        )
    weights = out / files["safetensors"]
    if not weights.is_file():
        raise ExportError(f"{weights} listed in {card_path} does not exist")
    model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **model_kwargs)
    model.load_state_dict(safetensors.torch.load_file(str(weights)), strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def _check_formats(formats: Sequence[str]) -> list[str]:
    """Normalize ``formats`` to an ordered, de-duplicated list of supported names."""
    if isinstance(formats, str):  # a lone "onnx" would otherwise iterate as characters
        formats = (formats,)
    fmts = list(dict.fromkeys(str(f).strip().lower() for f in formats))
    unknown = [f for f in fmts if f not in SUPPORTED_FORMATS]
    if unknown:
        hints = [m for m in map(not_exported_message, unknown) if m]  # TFLite, Core ML, OpenVINO, ...
        raise ConfigError(
            f"unknown export format(s) {unknown}; supported formats are {list(SUPPORTED_FORMATS)}"
            + "".join(f"; {h}" for h in hints)
        )
    if not fmts:
        raise ConfigError(f"no export format requested; choose from {list(SUPPORTED_FORMATS)}")
    return fmts


def _check_args(
    timm_name: str,
    model_kwargs: dict,
    num_classes: int,
    input_size: int,
    opset: int,
    logit_rtol: float,
    prob_atol: float,
) -> None:
    """Reject arguments that would produce an export that cannot be rebuilt from its card."""
    if not isinstance(timm_name, str) or not timm_name:
        raise ConfigError("timm_name must be a non-empty timm model name, e.g. 'resnet18'")
    for key in ("num_classes", "pretrained"):
        if key in model_kwargs:
            raise ConfigError(
                f"model_kwargs must not contain {key!r}: the export records num_classes separately "
                "and the weights always come from the exported safetensors"
            )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ConfigError(f"input_size must be a positive int (pixels), got {input_size!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 7:
        raise ConfigError(f"opset must be an int ONNX opset version (e.g. 17), got {opset!r}")
    for name, value in (("logit_rtol", logit_rtol), ("prob_atol", prob_atol)):
        if not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value!r}")


def _normalization(
    card: dict, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the verify images are normalized with: given, else the card's, else ImageNet's."""
    pre = card.get("preprocessing")
    if not isinstance(pre, Mapping):
        pre = {}
    m = mean if mean is not None else pre.get("mean", _DEFAULT_MEAN)
    s = std if std is not None else pre.get("std", _DEFAULT_STD)
    try:
        m_t, s_t = tuple(float(v) for v in m), tuple(float(v) for v in s)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"mean/std must be 3 numbers each, got mean={m!r}, std={s!r}") from e
    if len(m_t) != 3 or len(s_t) != 3 or not all(v > 0 for v in s_t):
        raise ConfigError(f"mean/std must be 3 numbers each (std > 0), got mean={m!r}, std={s!r}")
    return m_t, s_t


# --------------------------------------------------------------------------------------------------
# model handling
# --------------------------------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip torch.compile / (Distributed)DataParallel wrappers, whose state-dict key prefixes timm can't load."""
    while True:
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _forward(model: torch.nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    """Run ``model`` without grad; turn a failure (e.g. input_size the model rejects) into an ExportError."""
    try:
        with torch.no_grad():
            return model(x)
    except Exception as e:
        raise ExportError(
            f"{what} failed on a {tuple(x.shape)} input ({type(e).__name__}: {e}); "
            "check input_size and model_kwargs (e.g. img_size for ViTs)"
        ) from e


def _cpu_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of the state dict.

    Cloning also un-ties shared storage, which ``safetensors`` refuses to save.
    """
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _rebuild(
    timm_name: str, model_kwargs: dict, num_classes: int, state: Mapping[str, torch.Tensor]
) -> torch.nn.Module:
    """Rebuild the model the way consumers will; a strict-load failure means the recipe is wrong."""
    import timm

    try:
        model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **model_kwargs)
    except Exception as e:
        raise ExportError(
            f"timm.create_model({timm_name!r}, num_classes={num_classes}, **{model_kwargs!r}) failed: {e}"
        ) from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(
            f"the model's weights do not fit timm.create_model({timm_name!r}, num_classes={num_classes}, "
            f"**{model_kwargs!r}); pass the timm_name/model_kwargs/num_classes it was created with. {e}"
        ) from e
    return model.float().eval()


def _check_reload_parity(model: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor) -> float | None:
    """Compare the caller's model with the rebuilt one on CPU on ``x``; return the max abs diff.

    Catches recipe drift that leaves the state dict intact (e.g. a different ``pad_type`` or
    activation). Runs on a deep copy so the caller's model keeps its device and mode. Returns None when
    the model cannot be deep-copied (the strict state-dict load still guards the weights then).
    """
    try:
        twin = copy.deepcopy(model).to("cpu").float().eval()
    except Exception:
        return None
    expected = _forward(twin, x, "the model's forward pass")
    got = _ref_logits(ref, x)
    if expected.shape != got.shape:
        raise ExportError(
            f"the model's logits have shape {tuple(expected.shape)} but the rebuilt model gives "
            f"{tuple(got.shape)}; check timm_name/num_classes/model_kwargs"
        )
    p = measure_parity([got], [expected], logit_rtol=_RELOAD_RTOL)
    reason = parity_failure(p, logit_rtol=_RELOAD_RTOL, prob_atol=_RELOAD_RTOL)
    if reason:
        raise ExportError(
            f"rebuilding the model from timm_name/model_kwargs changes its logits ({reason}); "
            "model_kwargs must contain every create_model option the model was built with"
        )
    return float(p["max_abs_logit_diff"])


def measure_cpu_latency(
    model: torch.nn.Module, input_size: int, *, runs: int = LATENCY_RUNS, warmup: int = _LATENCY_WARMUP
) -> dict[str, Any]:
    """Median wall time of one batch-1 forward pass of ``model`` (on CPU, eval mode) with one thread.

    One thread, because that is what a deployment on a shared CPU can count on, and the number is
    comparable between machines with different core counts. The caller's thread setting is restored.
    """
    x = torch.rand(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(_VERIFY_SEED))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: list[float] = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            for _ in range(runs):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
    except Exception as e:
        raise ExportError(
            f"timing the model on a {tuple(x.shape)} input failed ({type(e).__name__}: {e})"
        ) from e
    finally:
        torch.set_num_threads(threads)
    return {
        "median_ms": round(statistics.median(times) * 1000, 3),
        "min_ms": round(min(times) * 1000, 3),
        "batch_size": 1,
        "threads": 1,
        "runs": runs,
        "model": "torch, rebuilt from the exported safetensors",
        "machine": platform.machine(),
        "processor": platform.processor() or None,
    }


def _ref_logits(ref: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of the reference model, checked to be (batch, num_classes)."""
    out = _forward(ref, x, "the rebuilt model's forward pass")
    num_classes = getattr(ref, "num_classes", None)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ExportError(f"the model must return (batch, num_classes) logits, got {shape}")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ExportError(f"the model returns {out.shape[1]} logits but num_classes={num_classes}")
    return out


def _verify_inputs(
    input_size: int,
    mean: Sequence[float] = _DEFAULT_MEAN,
    std: Sequence[float] = _DEFAULT_STD,
) -> list[torch.Tensor]:
    """Deterministic batches that look like what the model sees in use: images in [0, 1] with smooth
    regions and edges (random 8x8 colors, upsampled, plus pixel noise), normalized with mean/std.
    Per-pixel N(0, 1) noise would be out of distribution: its logits are unlike a real image's."""
    gen = torch.Generator().manual_seed(_VERIFY_SEED)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    xs = []
    for b in _VERIFY_BATCHES:
        coarse = torch.rand(b, 3, 8, 8, generator=gen)
        img = torch.nn.functional.interpolate(
            coarse, size=(input_size, input_size), mode="bilinear", align_corners=False
        )
        img = (img + 0.05 * torch.randn(b, 3, input_size, input_size, generator=gen)).clamp(0.0, 1.0)
        xs.append(((img - m) / s).contiguous())
    return xs


def _json_safe(numbers: dict[str, Any]) -> dict[str, Any]:
    """``numbers`` with inf/NaN as strings: JSON columns (PostgreSQL) refuse them as numbers."""
    return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in numbers.items()}


def _finite(value: float) -> float:
    """NaN as +inf, so that it can never pass a tolerance check."""
    return float("inf") if math.isnan(value) else float(value)


def measure_parity(
    got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], *, logit_rtol: float = DEFAULT_LOGIT_RTOL
) -> dict[str, Any]:
    """How an exported format's logits ``got`` compare with torch's ``want``, batch by batch.

    ``max_abs_logit_diff``; ``rel_logit_diff``: that over ``logit_scale`` = max(1, max |torch logit|);
    ``max_prob_diff``: of the softmax; ``argmax_agree``: inputs with the same top class, out of
    ``inputs``; ``argmax_near_ties``: disagreements between two classes whose torch logits are
    within ``2 * logit_rtol * logit_scale`` of each other (rounding can flip those; a model is
    not wrong for it).
    """
    g = torch.cat([t.detach().float().cpu().reshape(t.shape[0], -1) for t in got])
    w = torch.cat([t.detach().float().cpu().reshape(t.shape[0], -1) for t in want])
    if g.shape != w.shape:
        raise ExportError(
            f"the exported model returns logits of shape {tuple(g.shape)}, torch {tuple(w.shape)}"
        )
    max_abs = _finite((g - w).abs().max().item())
    scale = max(1.0, _finite(w.abs().max().item()))
    prob = _finite((g.softmax(-1) - w.softmax(-1)).abs().max().item())
    top_w, top_g = w.argmax(-1), g.argmax(-1)
    disagree = top_w != top_g
    margin = w.gather(1, top_w[:, None]) - w.gather(1, top_g[:, None])
    near_tie = disagree & (margin[:, 0] <= 2 * logit_rtol * scale) & torch.isfinite(g).all(-1)
    return {
        "inputs": int(w.shape[0]),
        "argmax_agree": int((~disagree).sum()),
        "argmax_near_ties": int(near_tie.sum()),
        "max_prob_diff": prob,
        "max_abs_logit_diff": max_abs,
        "logit_scale": scale,
        "rel_logit_diff": max_abs / scale,
    }


def parity_failure(
    parity: Mapping[str, Any],
    *,
    logit_rtol: float = DEFAULT_LOGIT_RTOL,
    prob_atol: float = DEFAULT_PROB_ATOL,
) -> str | None:
    """Why ``parity`` (``measure_parity``) is not good enough to deploy, or None when it is."""
    n = parity["inputs"]
    wrong = n - parity["argmax_agree"] - parity["argmax_near_ties"]
    problems = []
    if wrong:
        problems.append(f"argmax disagrees on {wrong}/{n} inputs")
    if wrong or parity["max_prob_diff"] > prob_atol:
        problems.append(f"max prob diff {parity['max_prob_diff']:.3g} (tolerance {prob_atol:g})")
    if wrong or parity["rel_logit_diff"] > logit_rtol:
        problems.append(
            f"max logit diff {parity['max_abs_logit_diff']:.3g} = {parity['rel_logit_diff']:.3g} of the "
            f"logit scale {parity['logit_scale']:.3g} (tolerance {logit_rtol:g})"
        )
    return "; ".join(problems) or None


def _judge(
    what: str, got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], tol: tuple[float, float]
) -> dict[str, Any]:
    """``measure_parity``; raise ``ParityError`` naming ``what`` and by how much when it fails."""
    logit_rtol, prob_atol = tol
    p = measure_parity(got, want, logit_rtol=logit_rtol)
    reason = parity_failure(p, logit_rtol=logit_rtol, prob_atol=prob_atol)
    if reason:
        raise ParityError(f"{what} differs from torch: {reason}", p)
    return p


# --------------------------------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------------------------------


def _export_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    import safetensors.torch

    _atomic_write(path, lambda tmp: safetensors.torch.save_file(state, str(tmp)))


@contextlib.contextmanager
def _quiet_torch_warnings() -> Iterator[None]:
    """Silence deprecation and tracer warnings from torch.jit / torch.onnx.

    Both are deprecated in torch 2.x but still work; the numeric verification below is what decides
    whether an export is usable, so the warnings would only be noise for users.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _export_torchscript(
    ref: torch.nn.Module,
    path: Path,
    xs: list[torch.Tensor],
    expected: list[torch.Tensor],
    tol: tuple[float, float],
) -> dict[str, Any]:
    """Trace in eval mode, save, reload the file and verify it against torch; return its parity."""
    result: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        # Verify the temp file before os.replace, so a bad model never lands at ``path``.
        with _quiet_torch_warnings(), torch.no_grad():
            traced = torch.jit.trace(ref, xs[0], check_trace=False)
            torch.jit.save(traced, str(tmp))
            loaded = torch.jit.load(str(tmp), map_location="cpu")
            got = [loaded(x) for x in xs]
        result.update(_judge(f"TorchScript export of {path.name}", got, expected, tol))

    try:
        _atomic_write(path, write)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"TorchScript export failed with torch {torch.__version__}: {e}") from e
    return result


def _onnx_export_legacy(ref: torch.nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    """TorchScript-based exporter: fast, honors opset <= 17, and handles timm CNNs and ViTs."""
    with _quiet_torch_warnings():
        torch.onnx.export(
            ref,
            (x,),
            str(path),
            dynamo=False,
            input_names=[ONNX_INPUT_NAME],
            output_names=[ONNX_OUTPUT_NAME],
            opset_version=opset,
            dynamic_axes={ONNX_INPUT_NAME: {0: "batch"}, ONNX_OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )


def _onnx_export_dynamo(ref: torch.nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    """torch.export-based exporter (needs onnxscript): the fallback for when the legacy one is gone."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    with _quiet_torch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # it prints progress
        torch.onnx.export(
            ref,
            (x,),
            str(path),
            dynamo=True,
            input_names=[ONNX_INPUT_NAME],
            output_names=[ONNX_OUTPUT_NAME],
            opset_version=opset,
            dynamic_shapes=({0: batch},),
            external_data=False,  # one self-contained file; student models are far below 2 GB
            verbose=False,
        )


_ONNX_EXPORTERS: tuple[tuple[str, Callable[[torch.nn.Module, torch.Tensor, Path, int], None]], ...] = (
    ("torchscript", _onnx_export_legacy),
    ("dynamo", _onnx_export_dynamo),
)


def _export_onnx(
    ref: torch.nn.Module,
    path: Path,
    xs: list[torch.Tensor],
    expected: list[torch.Tensor],
    opset: int,
    tol: tuple[float, float],
) -> dict[str, Any]:
    """Export with the first exporter whose file onnxruntime runs within the tolerances; raise if none
    does (a ``ParityError`` carrying the closest attempt's numbers when every file ran but differed)."""
    failures: list[str] = []
    closest: dict[str, Any] | None = None
    for name, exporter in _ONNX_EXPORTERS:
        result: dict[str, Any] = {}

        def write(tmp: Path, exporter=exporter, result=result) -> None:
            # Verify the temp file before os.replace, so a bad model never lands at ``path``.
            exporter(ref, xs[0], tmp, opset)
            got, result["onnx_opset"] = _run_onnx(tmp, xs)
            result["parity"] = _judge("onnxruntime", got, expected, tol)

        try:
            _atomic_write(path, write)
        except Exception as e:
            if is_disk_full(e):
                raise
            if isinstance(e, ParityError):
                failures.append(f"{name} exporter: {e}")
                if closest is None or e.parity["rel_logit_diff"] < closest["rel_logit_diff"]:
                    closest = {**e.parity, "exporter": name}
            else:
                failures.append(f"{name} exporter: {type(e).__name__}: {e}")
            continue
        parity = {**result.pop("parity"), "exporter": name}
        return {
            "onnx_exporter": name,
            "onnx_max_abs_diff": parity["max_abs_logit_diff"],
            **result,
            "parity": parity,
        }
    message = f"ONNX export failed with torch {torch.__version__}: " + "; ".join(failures)
    if closest is not None:
        raise ParityError(message, closest)
    raise ExportError(message)


def _run_onnx(path: Path, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], int | None]:
    """Check the graph and run it in onnxruntime on every verify batch: (logits per batch, opset)."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    opsets = {imp.domain: imp.version for imp in proto.opset_import}
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [ONNX_INPUT_NAME] or outputs != [ONNX_OUTPUT_NAME]:
        raise ExportError(
            f"ONNX graph has inputs {inputs} / outputs {outputs}, expected ['input'] / ['logits']"
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = [torch.from_numpy(session.run([ONNX_OUTPUT_NAME], {ONNX_INPUT_NAME: x.numpy()})[0]) for x in xs]
    return got, opsets.get("", opsets.get("ai.onnx"))


# --------------------------------------------------------------------------------------------------
# card and files
# --------------------------------------------------------------------------------------------------


def _build_card(
    caller_card: dict,
    timm_name: str,
    model_kwargs: dict,
    num_classes: int,
    input_size: int,
    written: dict[str, Path],
    failed: dict[str, str],
    export_info: dict[str, Any],
    facts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge the caller's fields with the export facts; the facts win, a caller ``export`` dict is merged."""
    card = dict(caller_card)
    card.update(
        {
            "timm_name": timm_name,
            "model_kwargs": model_kwargs,
            "num_classes": num_classes,
            "input_size": input_size,
            **(facts or {}),
            "files": {fmt: p.name for fmt, p in written.items()},
            "file_bytes": {fmt: p.stat().st_size for fmt, p in written.items()},
            "sha256": {fmt: _sha256(p) for fmt, p in written.items()},
            "failed_formats": dict(failed),
            "export": {**(caller_card.get("export") or {}), **export_info},
        }
    )
    if "safetensors" in written:
        card["load"] = _load_snippet(timm_name, model_kwargs, num_classes, written["safetensors"].name)
    else:
        card.pop("load", None)
    return card


def _load_snippet(timm_name: str, model_kwargs: dict, num_classes: int, weights_name: str) -> str:
    kwargs = "".join(f", {k}={v!r}" for k, v in model_kwargs.items())
    return (
        "import timm, safetensors.torch as st; "
        f"m = timm.create_model({timm_name!r}, num_classes={num_classes}{kwargs}); "
        f"m.load_state_dict(st.load_file({weights_name!r})); m.eval()"
    )


def _versions() -> dict[str, str | None]:
    """Library versions that determine how the files were produced (for reproducing or debugging)."""
    versions: dict[str, str | None] = {"torch": torch.__version__}
    for mod in ("timm", "onnx", "onnxruntime", "safetensors"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    return versions


def _json_default(obj: Any) -> Any:
    """Make common non-JSON card values serializable (paths, numpy/torch scalars and arrays)."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays/scalars, torch tensors
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _to_json(card: dict) -> str:
    try:
        return json.dumps(card, indent=2, sort_keys=False, default=_json_default, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model card is not JSON serializable: {e}") from e


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temp file next to ``path``, then ``os.replace`` it into place.

    Readers therefore see either the old file or the complete new one, never a partial file. The temp
    name keeps the real suffix because some writers (torch.onnx) look at it.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
