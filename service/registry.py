"""Registered models: teacher weights an operator adds once, which tenants then name in a spec.

    kt admin register-model proxy w.safetensors --card w.card.json [--tenant acme]
    -> a job or gallery build names it as  timm:mobilenetv2_100@registered:proxy

Registration takes safetensors files only (the header is parsed here, in pure Python: a pickle can
run code when it is loaded, and the API process never imports torch), up to
``KT_MAX_MODEL_BYTES``. Its card gives the timm architecture, ``create_model_kwargs``,
mean/std, input size and ``norm_eval``; the tensor shapes are checked against the architecture
in a subprocess (``python -m kt_train.weights``). The file and the card are copied to
``<data_dir>/registry/<name>/model.{safetensors,card.json}`` (the ``X.card.json`` beside
``X.safetensors`` that kt_train reads) and a ``registered_models`` row records them.

At submit, the service resolves a registered spec for the caller's tenant to the stored file
(``timm:<arch>@<data_dir>/registry/<name>/model.safetensors``): no path a tenant sends is ever
opened. A model registered for another tenant answers exactly like one that does not exist.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.orm import Session

from service.api.errors import Conflict, Invalid
from service.db.models import RegisteredModel, Tenant
from service.model_specs import REGISTERED_NAME_PATTERN, known_names, registered_ref
from service.settings import Settings

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.card.json"
# safetensors' own limit on the JSON header; a bigger "header length" means it is not one
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# create_model kwargs a card may not set: the weights are the registered file, nothing else
FORBIDDEN_KWARGS = frozenset(
    {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"}
)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")
SHAPE_CHECK_TIMEOUT_S = 900.0
COPY_CHUNK = 8 * 1024 * 1024
CONVERT_HOWTO = (
    'convert it where you trust the file: python -c "import torch, safetensors.torch as st; '
    "st.save_file(torch.load('IN.pt', weights_only=True), 'OUT.safetensors')\" and register OUT.safetensors"
)


class RegistrationError(ValueError):
    """A weights file, card or name that cannot be registered; the message says what to fix."""


# --------------------------------------------------------------------------- the safetensors header


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file (name -> dtype, shape), from its header, checked against
    the file's size; ``RegistrationError`` for anything else (a pickle, a zip, garbage)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        kind = _not_safetensors(first)
        if kind is not None:
            raise RegistrationError(f"{path} is {kind}, not a safetensors file; {CONVERT_HOWTO}")
        if len(first) < 8:
            raise RegistrationError(f"{path} has {size} bytes: too short for a safetensors file")
        header_len = int.from_bytes(first, "little")
        if header_len < 2 or header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise RegistrationError(
                f"{path} is not a safetensors file (its first 8 bytes give a header of {header_len} bytes "
                f"in a file of {size}); register a file written by safetensors' save_file"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RegistrationError(
            f"{path} is not a safetensors file (its header is not JSON: {err}); "
            "register a file written by safetensors' save_file"
        ) from err
    if not isinstance(header, dict):
        raise RegistrationError(f"{path} is not a safetensors file (its header is not a JSON object)")
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        info, span = _tensor_entry(path, name, entry)
        tensors[name] = info
        spans.append((*span, name))
    if not tensors:
        raise RegistrationError(f"{path} holds no tensors; register the model's weights")
    spans.sort()
    at = 0
    for begin, end, name in spans:
        if begin != at:
            raise RegistrationError(
                f"{path} is a corrupt safetensors file: tensor {name!r} starts at byte {begin} of the data, "
                f"expected {at} (overlapping or gapped tensors); write the file again with save_file"
            )
        at = end
    if 8 + header_len + at != size:
        raise RegistrationError(
            f"{path} is a corrupt or truncated safetensors file: its tensors need {8 + header_len + at} bytes, "
            f"the file has {size}; copy it again"
        )
    return tensors


def _not_safetensors(first: bytes) -> str | None:
    """What a file that starts with ``first`` is, when that is recognizably not safetensors."""
    if first.startswith(b"PK\x03\x04"):
        return "a zip archive (what torch.save writes to a .pt/.pth/.bin: a pickle inside a zip)"
    if first[:1] == b"\x80" and first[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (torch.save's legacy format), which can run code when loaded"
    if first.startswith((b"\x1f\x8b", b"\x89HDF", b"\x08\x01", b"ustar")):
        return "a compressed archive or another model format"
    return None


def _tensor_entry(path: Path, name: str, entry: Any) -> tuple[TensorInfo, tuple[int, int]]:
    bad = f"{path} is a corrupt safetensors file: the header entry of {name!r}"
    if not isinstance(entry, dict):
        raise RegistrationError(f"{bad} is not an object; write the file again with save_file")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise RegistrationError(f"{bad} has an unknown dtype {dtype!r}; save the tensors as float32/16")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise RegistrationError(f"{bad} has no valid shape; write the file again with save_file")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise RegistrationError(f"{bad} has no valid data_offsets; write the file again with save_file")
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise RegistrationError(
            f"{bad} spans {offsets[1] - offsets[0]} bytes, but {dtype} {shape} needs {nbytes}; "
            "write the file again with save_file"
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape)), (offsets[0], offsets[1])


# --------------------------------------------------------------------------- the card


def card_beside(path: Path) -> Path:
    """``X.card.json`` for ``X.safetensors`` (kt_train's convention)."""
    return path.with_name(
        path.name[: -len(path.suffix)] + ".card.json" if path.suffix else path.name + ".card.json"
    )


def normalize_card(
    raw: dict[str, Any], *, arch: str | None = None, norm_eval: bool | None = None
) -> dict[str, Any]:
    """The card as stored: ``raw`` (kept, e.g. provenance) with ``arch``, ``create_model_kwargs``
    (without ``num_classes``' effect on anything but the check), ``norm_eval``, and mean/std,
    ``input_size`` (``[3, s, s]``), interpolation and crop_pct checked. ``arch`` / ``norm_eval``
    given here override the card's."""
    card = dict(raw)
    arch = str(arch or card.get("arch") or card.get("timm_name") or "").split(".", 1)[0].strip()
    if not arch:
        raise RegistrationError(
            "no architecture: give the card an `arch` (or `timm_name`) such as 'mobilenetv2_100', or pass --arch"
        )
    timm_models = known_names().models["timm"]
    if arch not in timm_models:
        close = difflib.get_close_matches(arch, list(timm_models), n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; timm.list_models() lists them"
        raise RegistrationError(f"timm has no architecture {arch!r}{hint}")
    card["arch"] = arch
    kwargs = card.get("create_model_kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise RegistrationError(
            'the card\'s create_model_kwargs must be a JSON object, e.g. {"pad_type": "same"}'
        )
    forbidden = sorted(set(kwargs) & FORBIDDEN_KWARGS)
    if forbidden:
        raise RegistrationError(
            f"the card's create_model_kwargs may not set {', '.join(forbidden)}: the weights are the "
            "registered file; remove them"
        )
    card["create_model_kwargs"] = kwargs
    for key in ("mean", "std"):
        if key in card:
            value = card[key]
            if (
                not isinstance(value, list)
                or len(value) != 3
                or not all(isinstance(v, int | float) and math.isfinite(v) for v in value)
                or (key == "std" and not all(v > 0 for v in value))
            ):
                raise RegistrationError(f"the card's {key} must be three numbers (RGB), e.g. [0.5, 0.5, 0.5]")
            card[key] = [float(v) for v in value]
    if "input_size" in card:
        card["input_size"] = _input_size(card["input_size"])
    if "interpolation" in card and card["interpolation"] not in INTERPOLATIONS:
        raise RegistrationError(f"the card's interpolation must be one of {', '.join(INTERPOLATIONS)}")
    if "crop_pct" in card:
        crop = card["crop_pct"]
        if not isinstance(crop, int | float) or not 0 < crop <= 1:
            raise RegistrationError("the card's crop_pct must be a number in (0, 1], e.g. 0.875")
    if norm_eval is not None:
        card["norm_eval"] = norm_eval
    card.setdefault("norm_eval", False)
    if not isinstance(card["norm_eval"], bool):
        raise RegistrationError("the card's norm_eval must be true or false")
    return card


def _input_size(value: Any) -> list[int]:
    """``224``, ``[224, 224]`` or ``[3, 224, 224]`` -> ``[3, 224, 224]`` (square inputs only)."""
    sides = [value] if isinstance(value, int) else value
    if isinstance(sides, list) and len(sides) == 3 and sides[0] == 3:
        sides = sides[1:]
    if (
        not isinstance(sides, list)
        or not 1 <= len(sides) <= 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and 8 <= s <= 4096 for s in sides)
        or len(set(sides)) != 1
    ):
        raise RegistrationError("the card's input_size must be a square side, e.g. 224 or [3, 224, 224]")
    return [3, sides[0], sides[0]]


def model_kwargs(card: dict[str, Any]) -> dict[str, Any]:
    """The card's create_model kwargs for a job (the task decides ``num_classes``)."""
    return {k: v for k, v in (card.get("create_model_kwargs") or {}).items() if k != "num_classes"}


def input_side(card: dict[str, Any]) -> int | None:
    size = card.get("input_size")
    return int(size[-1]) if isinstance(size, list) and size else None


# --------------------------------------------------------------------------- registration

ShapeCheck = Callable[[str, dict[str, Any], Path], list[str]]


def check_weights_subprocess(arch: str, kwargs: dict[str, Any], path: Path) -> list[str]:
    """``kt_train.weights.check_weights`` in a child process (this process never imports torch)."""
    cmd = [
        sys.executable,
        "-m",
        "kt_train.weights",
        arch,
        str(path),
        "--kwargs",
        json.dumps(kwargs),
        "--json",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SHAPE_CHECK_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as err:
        raise RegistrationError(f"the shape check did not finish in {SHAPE_CHECK_TIMEOUT_S:g} s") from err
    if proc.returncode in (0, 1):
        try:
            return list(json.loads(proc.stdout.strip().splitlines()[-1])["problems"])
        except (IndexError, KeyError, TypeError, json.JSONDecodeError):
            pass
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:500]
    if "No module named" in proc.stderr:
        raise RegistrationError(
            f"the shape check needs the training dependencies (torch, timm): {tail}; run "
            "`kt admin register-model` where they are installed (e.g. in the worker image)"
        )
    raise RegistrationError(
        f"the shape check `{' '.join(cmd[:5])} ...` failed (exit {proc.returncode}): {tail}"
    )


def registry_dir(settings: Settings, name: str) -> Path:
    return Path(settings.data_dir) / "registry" / name


def registered_weights(settings: Settings, row: RegisteredModel) -> Path:
    return registry_dir(settings, row.name) / WEIGHTS_FILE


def check_name(name: str) -> str:
    if not re.fullmatch(REGISTERED_NAME_PATTERN, name):
        raise RegistrationError(
            f"model name {name!r} must be 1-64 lowercase letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (e.g. 'mobilenet-proxy')"
        )
    return name


def _copy_hashed(src: Path, dest: Path, limit: int) -> tuple[str, int]:
    """Copy ``src`` to ``dest`` (at most ``limit`` bytes); its sha256 and size."""
    digest, total = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while chunk := fin.read(COPY_CHUNK):
            total += len(chunk)
            if total > limit:
                raise RegistrationError(f"{src} grew past the limit of {limit} bytes while being copied")
            digest.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest(), total


def register_model(
    session: Session,
    settings: Settings,
    name: str,
    path: str | Path,
    *,
    card_path: str | Path | None = None,
    tenant_name: str | None = None,
    arch: str | None = None,
    norm_eval: bool | None = None,
    check: ShapeCheck = check_weights_subprocess,
) -> RegisteredModel:
    """Register the safetensors file ``path`` as ``name`` (see the module docstring).

    ``card_path``: the card (default: ``X.card.json`` beside ``X.safetensors``, if there is one);
    ``tenant_name``: only that tenant may use it (default: every tenant); ``arch`` / ``norm_eval``
    override the card's. ``RegistrationError`` (nothing registered) for any problem."""
    check_name(name)
    if session.scalar(select(RegisteredModel.id).where(RegisteredModel.name == name)) is not None:
        raise RegistrationError(f"a model named {name!r} is registered already; choose another name")
    tenant_id: str | None = None
    if tenant_name is not None:
        tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name.strip()))
        if tenant is None:
            raise RegistrationError(
                f"no tenant named {tenant_name!r}; create it with `kt admin create-key --tenant {tenant_name}`"
            )
        tenant_id = tenant.id
    src = Path(path).expanduser().resolve()
    if not src.is_file():
        raise RegistrationError(f"{src} is not a file; pass the .safetensors weights file")
    size = src.stat().st_size
    if size > settings.max_model_bytes:
        raise RegistrationError(
            f"{src} has {size} bytes, over the limit of {settings.max_model_bytes} (KT_MAX_MODEL_BYTES); "
            "raise the limit or register a smaller model"
        )
    read_safetensors_header(src)  # refuse a pickle before copying anything
    card_file = Path(card_path).expanduser() if card_path is not None else card_beside(src)
    raw: dict[str, Any] = {}
    if card_path is not None or card_file.is_file():
        try:
            loaded = json.loads(card_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RegistrationError(f"cannot read the card {card_file}: {err}; pass a JSON file") from err
        if not isinstance(loaded, dict):
            raise RegistrationError(f"the card {card_file} is not a JSON object")
        raw = loaded
    card = normalize_card(raw, arch=arch, norm_eval=norm_eval)

    root = Path(settings.data_dir) / "registry"
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        weights = staging / WEIGHTS_FILE
        sha256, nbytes = _copy_hashed(src, weights, settings.max_model_bytes)
        expected = card.get("weights_sha256")
        if expected and str(expected).lower() != sha256:
            raise RegistrationError(
                f"the card says weights_sha256 {expected}, but {src} has {sha256}: the card belongs to "
                "another file; pass the right --card"
            )
        read_safetensors_header(weights)  # the copy is what jobs read
        problems = check(card["arch"], dict(card["create_model_kwargs"]), weights)
        if problems:
            raise RegistrationError(f"{src} does not fit {card['arch']}: " + "; ".join(problems))
        (staging / CARD_FILE).write_text(json.dumps(card, indent=1, sort_keys=True) + "\n")
        dest = registry_dir(settings, name)
        if dest.exists():  # left by a registration that died before its row was committed
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    row = RegisteredModel(
        name=name, arch=card["arch"], tenant_id=tenant_id, sha256=sha256, bytes=nbytes, card=card
    )
    session.add(row)
    session.commit()
    return row


# --------------------------------------------------------------------------- use at submit


def visible_to(tenant: Tenant) -> ColumnElement[bool]:
    """The registered models ``tenant`` may use: its own and the shared ones."""
    return or_(RegisteredModel.tenant_id.is_(None), RegisteredModel.tenant_id == tenant.id)


def visible_model(session: Session, tenant: Tenant, name: str) -> RegisteredModel:
    """The registered model ``name`` if ``tenant`` may use it; else 422, the same whether it
    belongs to another tenant or does not exist (names don't leak)."""
    row = session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
    if row is None or (row.tenant_id is not None and row.tenant_id != tenant.id):
        visible = session.scalars(select(RegisteredModel.name).where(visible_to(tenant))).all()
        close = difflib.get_close_matches(name, visible, n=1, cutoff=0.6)  # only names it may see
        mean = f" (did you mean {close[0]!r}?)" if close else ""
        raise Invalid(
            f"Unknown registered model {name!r}{mean}; `GET /v1/registered-models` lists the ones you may "
            "use (an operator adds one with `kt admin register-model`)."
        )
    return row


@dataclass(frozen=True)
class ResolvedModel:
    """A registered spec resolved for a job: the stored file as kt_train names it, and its card."""

    spec: str  # timm:<arch>@<data_dir>/registry/<name>/model.safetensors
    model_kwargs: dict[str, Any]
    norm_eval: bool


def resolve_spec(session: Session, settings: Settings, tenant: Tenant, spec: str) -> ResolvedModel | None:
    """The registered model ``spec`` names (None for any other spec); 422 when ``tenant`` may not
    use it or the spec's architecture is not the registered one."""
    ref = registered_ref(spec)
    if ref is None:
        return None
    row = visible_model(session, tenant, ref.name)
    if row.arch != ref.arch:
        raise Invalid(
            f"Registered model {row.name!r} is a {row.arch}, not a {ref.arch}; "
            f"use 'timm:{row.arch}@registered:{row.name}'."
        )
    path = registered_weights(settings, row)
    if not path.is_file():
        raise Conflict(
            f"The weights of registered model {row.name!r} are missing on the server; ask an operator to "
            "register them again."
        )
    return ResolvedModel(
        spec=f"timm:{row.arch}@{path}",
        model_kwargs=model_kwargs(row.card),
        norm_eval=bool(row.card.get("norm_eval")),
    )


def resolve_teacher(session: Session, settings: Settings, tenant: Tenant, teacher: dict[str, Any]) -> None:
    """Point a job config's ``teacher`` section at the stored file when its model is a registered
    spec: ``model`` becomes the server's path, the card's kwargs go under ``model_kwargs`` (the
    section's own win) and its ``norm_eval`` applies unless the section sets one already."""
    resolved = resolve_spec(session, settings, tenant, str(teacher.get("model") or ""))
    if resolved is None:
        return
    teacher["model"] = resolved.spec
    teacher["model_kwargs"] = {**resolved.model_kwargs, **(teacher.get("model_kwargs") or {})}
    teacher.setdefault("norm_eval", resolved.norm_eval)


def resolve_encoder(session: Session, settings: Settings, tenant: Tenant, spec: str) -> str:
    """A gallery encoder spec with a registered model resolved to its stored file (kt_train
    applies the card beside it); any other spec as it is."""
    resolved = resolve_spec(session, settings, tenant, spec)
    return spec if resolved is None else resolved.spec
